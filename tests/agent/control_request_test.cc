// What the agent refuses of a peer before acting on it: range tables (agent/range_table.h),
// control requests (agent/control_request.h) and Firecracker handshakes
// (agent/firecracker_handshake.h), each refusal with its reason.
#include <gtest/gtest.h>

#include <capnp/message.h>

#include <cstring>

#include "agent.capnp.h"
#include "control_request.h"
#include "firecracker_handshake.h"
#include "range_table.h"

namespace lazymem::agent {
namespace {

using fault::MappedRange;
constexpr uint64_t kTop = ~uint64_t{0} - 4095;  // the last page of the address space

std::string refusal(const std::vector<MappedRange>& ranges) {
  Status st = check_range_table(ranges);
  return st.ok() ? "accepted" : st.error().message();
}

TEST(RangeTableTest, SoundTablesPass) {
  EXPECT_EQ(refusal({{0x10000, 0x4000, 0, 0}}), "accepted");
  // Adjoining, given in any order, in several regions, one ending a page short of 2^64.
  EXPECT_EQ(refusal({{0x20000, 0x1000, 1, 0x3000}, {0x10000, 0x10000, 0, 0}, {kTop - 4096, 4096, 2, 0}}), "accepted");
  std::vector<MappedRange> most;  // kMaxRanges, with gaps between them
  for (uint64_t i = 0; i < kMaxRanges; ++i) most.push_back({i * 8192, 4096, 0, i * 4096});
  EXPECT_EQ(refusal(most), "accepted");
}

TEST(RangeTableTest, HostileTablesAreRefusedWithTheReason) {
  EXPECT_EQ(refusal({}), "an empty region table");
  std::vector<MappedRange> too_many;
  for (uint64_t i = 0; i <= kMaxRanges; ++i) too_many.push_back({i * 8192, 4096, 0, 0});
  EXPECT_NE(refusal(too_many).find("at most 4096"), std::string::npos) << refusal(too_many);
  EXPECT_NE(refusal({{0x10000, 0, 0, 0}}).find("is empty"), std::string::npos);
  for (const MappedRange& r : {MappedRange{0x10001, 4096, 0, 0}, MappedRange{0x10000, 4097, 0, 0},
                               MappedRange{0x10000, 4096, 0, 12}}) {
    EXPECT_NE(refusal({r}).find("not page-aligned"), std::string::npos) << refusal({r});
  }
  EXPECT_NE(refusal({{kTop, 8192, 0, 0}}).find("wraps past the end of the address space"), std::string::npos);
  // Ending at 2^64 exactly: its end() is 0, and the address map would never find it.
  EXPECT_NE(refusal({{kTop, 4096, 0, 0}}).find("wraps past the end of the address space"), std::string::npos);
  // Offset + length wraps to a small number: it would pass a region-length check written as a
  // sum, and a fault would index chunks past the region's end.
  EXPECT_NE(refusal({{0x10000, 8192, 0, kTop}}).find("offset 0xfffffffffffff000 + length wraps"), std::string::npos)
      << refusal({{0x10000, 8192, 0, kTop}});
  EXPECT_NE(refusal({{0x20000, 0x10000, 0, 0}, {0x10000, 0x11000, 1, 0}}).find("overlap"), std::string::npos);
  EXPECT_NE(refusal({{0x10000, 0x1000, 0, 0}, {0x10000, 0x1000, 0, 0}}).find("overlap"), std::string::npos);
}

Result<std::optional<GuestMemory>> handshake(const std::string& fields) {
  return parse_guest_regions("[{" + fields + "}]");
}
std::string handshake_refusal(const std::string& fields) {
  auto r = handshake(fields);
  if (!r.ok()) return r.error().message();
  return r->has_value() ? "accepted" : "incomplete";
}

TEST(FirecrackerHandshakeTest, FieldsOfAnyOtherTypeAreRefused) {
  const std::string good = R"("base_host_virt_addr": 4096, "offset": 0, "page_size": 4096, "size": )";
  EXPECT_EQ(handshake_refusal(good + "8192"), "accepted");
  // A float past 2^64 was converted by a cast that is undefined (UBSan: float-cast-overflow);
  // a negative one, a bool or a string was taken as some number.
  for (const char* v : {"1e300", "8192.0", "-8192", "true", "\"8192\"", "null", "[8192]"}) {
    EXPECT_NE(handshake_refusal(good + v).find("\"size\" is a"), std::string::npos) << v << ": " << handshake_refusal(good + v);
  }
  EXPECT_NE(handshake_refusal(R"("base_host_virt_addr": 4096, "offset": 0, "page_size": 4096)").find("without \"size\""),
            std::string::npos);
  EXPECT_NE(parse_guest_regions("[4096]").error().message().find("not an object"), std::string::npos);
}

// nlohmann's parser throws out_of_range, not parse_error, for a number past what a double holds:
// it went uncaught, and the agent (root) ended on a VM's handshake. (Found by agent_fuzz.)
TEST(FirecrackerHandshakeTest, NumbersPastADoubleAreRefusedNotThrown) {
  for (const char* v : {"1e400", "-1e400", "139e222222222222222"}) {
    EXPECT_NE(handshake_refusal(std::string(R"("base_host_virt_addr": 4096, "offset": 0, "size": )") + v).find("bad JSON"),
              std::string::npos)
        << v;
  }
}

uint64_t page_size_of(const std::string& fields) {
  auto r = handshake(fields);
  return r.ok() && r->has_value() ? (*r)->page_size : 0;
}

TEST(FirecrackerHandshakeTest, PageSizes) {
  const std::string rest = R"("base_host_virt_addr": 4096, "offset": 0, "size": 8192)";
  EXPECT_EQ(page_size_of(rest), 4096u);  // neither field: 4 KiB, as Firecracker's default
  EXPECT_EQ(page_size_of(rest + R"(, "page_size_kib": 4)"), 4096u);
  // Huge pages: in bytes, in KiB (older Firecrackers), or both.
  const std::string huge = R"("base_host_virt_addr": 2097152, "offset": 4194304, "size": 6291456)";
  EXPECT_EQ(page_size_of(huge + R"(, "page_size": 2097152)"), 2097152u);
  EXPECT_EQ(page_size_of(huge + R"(, "page_size_kib": 2048)"), 2097152u);
  EXPECT_EQ(page_size_of(huge + R"(, "page_size": 2097152, "page_size_kib": 2048)"), 2097152u);
  EXPECT_NE(handshake_refusal(huge + R"(, "page_size": 2097152, "page_size_kib": 4)").find("disagree"), std::string::npos);
  // Not on its huge pages' boundaries: the kernel would refuse every install.
  for (const char* r : {R"("base_host_virt_addr": 4096, "offset": 0, "size": 2097152)",
                        R"("base_host_virt_addr": 2097152, "offset": 0, "size": 4096)",
                        R"("base_host_virt_addr": 2097152, "offset": 4096, "size": 2097152)"}) {
    EXPECT_NE(handshake_refusal(std::string(r) + R"(, "page_size": 2097152)").find("not on its 2048 KiB page boundaries"),
              std::string::npos)
        << r;
  }
  // Not a page size, or past what is gathered whole (1 GiB pages).
  for (const char* p : {R"("page_size": 8191)", R"("page_size": 2048)", R"("page_size_kib": 1048576)",
                        R"("page_size": 1073741824)"}) {
    EXPECT_NE(handshake_refusal(rest + ", " + p).find("not supported"), std::string::npos) << p;
  }
  // 2^54 + 4 KiB is 4096 bytes once multiplied out in 64 bits: it must not pass as 4 KiB.
  EXPECT_NE(handshake_refusal(rest + R"(, "page_size_kib": 18014398509481988)").find("not supported"), std::string::npos);
  // One page size per VM.
  auto mixed = parse_guest_regions(R"([{"base_host_virt_addr": 4096, "offset": 0, "size": 8192},
                                       {"base_host_virt_addr": 2097152, "offset": 2097152, "size": 2097152,
                                        "page_size": 2097152}])");
  ASSERT_FALSE(mixed.ok());
  EXPECT_NE(mixed.error().message().find("one page size is served per VM"), std::string::npos) << mixed.error().message();
}

TEST(FirecrackerHandshakeTest, RegionsPassTheRangeTableChecks) {
  EXPECT_NE(handshake_refusal(R"("base_host_virt_addr": 4096, "offset": 18446744073709547520, "size": 8192)").find("wraps"),
            std::string::npos);
  EXPECT_NE(handshake_refusal(R"("base_host_virt_addr": 4097, "offset": 0, "size": 8192)").find("not page-aligned"),
            std::string::npos);
  auto overlap = parse_guest_regions(R"([{"base_host_virt_addr": 4096, "offset": 0, "size": 8192},
                                         {"base_host_virt_addr": 8192, "offset": 8192, "size": 4096}])");
  ASSERT_FALSE(overlap.ok());
  EXPECT_NE(overlap.error().message().find("overlap"), std::string::npos) << overlap.error().message();
}

// A Request header as the daemon gets it off the wire.
std::unique_ptr<net::Header> header_of(capnp::MessageBuilder& m) {
  auto words = capnp::messageToFlatArray(m);
  auto h = net::Header::parse(std::as_bytes(std::span(words.begin(), words.size())));
  EXPECT_TRUE(h.ok());
  return std::move(*h);
}

std::string decode_refusal(capnp::MessageBuilder& m) {
  auto h = header_of(m);
  ControlRequest rq = decode_control_request(*h);
  return rq.body.ok() ? "accepted" : rq.body.error().message();
}

TEST(ControlRequestTest, PathsAreAbsoluteAndWhole) {
  auto restore = [](const std::string& snapshot, const std::string& token) {
    capnp::MallocMessageBuilder m;
    auto r = m.initRoot<proto::agent::Request>().initRestore();
    r.setSnapshot(capnp::Text::Reader(snapshot.data(), snapshot.size()));
    r.setTokenFile(capnp::Text::Reader(token.data(), token.size()));
    auto ranges = r.initRanges(1);
    ranges[0].setStart(0x10000);
    ranges[0].setLength(0x10000);
    return decode_refusal(m);
  };
  EXPECT_EQ(restore("/store/snap", ""), "accepted");
  EXPECT_EQ(restore("lazymem://pages:7070/snap", "/etc/token"), "accepted");
  EXPECT_NE(restore("store/snap", "").find("snapshot path 'store/snap' is relative"), std::string::npos);
  EXPECT_NE(restore("/store/snap", "token").find("token file 'token' is relative"), std::string::npos);
  // Checked as "/store/snap\0..." but opened as "/store/snap": refused.
  EXPECT_NE(restore(std::string("/store/snap\0/../other", 21), "").find("snapshot location holds a NUL byte"),
            std::string::npos);
  EXPECT_NE(restore("/store/snap", std::string("/etc/token\0x", 12)).find("token file holds a NUL byte"), std::string::npos);

  capnp::MallocMessageBuilder m;
  auto f = m.initRoot<proto::agent::Request>().initServeFirecracker();
  f.setSocketPath("vm.sock");
  f.setSnapshot("/store/vm");
  EXPECT_NE(decode_refusal(m).find("socket path 'vm.sock' is relative"), std::string::npos);
  f.setSocketPath("");
  EXPECT_EQ(decode_refusal(m), "need a socket path and a snapshot");
}

TEST(ControlRequestTest, RangesAreCheckedAndCountedBeforeBeingRead) {
  capnp::MallocMessageBuilder m;
  auto rq = m.initRoot<proto::agent::Request>();
  rq.setId(9);
  auto r = rq.initRestore();
  r.setSnapshot("/store/snap");
  auto ranges = r.initRanges(2);
  ranges[0].setStart(0x10000);
  ranges[0].setLength(0x2000);
  ranges[1].setStart(0x11000);
  ranges[1].setLength(0x1000);
  EXPECT_NE(decode_refusal(m).find("overlap"), std::string::npos);
  // kMaxRanges of them do not fit in a header as a client writes them (24 bytes each), but a
  // list of empty elements costs no bytes: Cap'n Proto reads it as that many all-zero ranges.
  // The token file pads the header so that the reader's traversal limit lets the list through.
  r.setTokenFile(std::string(16 * 1024, '/'));
  capnp::AnyStruct::Builder(kj::mv(r)).getPointerSection()[1].initAs<capnp::List<capnp::Void>>(kMaxRanges + 1);
  EXPECT_EQ(decode_refusal(m), "4097 ranges; at most 4096 are served per session");
}

TEST(ControlRequestTest, MalformedRequestsAreRefusedNotThrown) {
  // One segment of one word, the root pointer: a list pointer where a struct is expected.
  const uint32_t segment_table[2] = {0, 1};  // segment count - 1, the segment's size in words
  const uint64_t list_pointer = 1;
  std::byte message[16];
  std::memcpy(message, segment_table, 8);
  std::memcpy(message + 8, &list_pointer, 8);
  auto h = net::Header::parse(message);
  ASSERT_TRUE(h.ok()) << h.error().message();
  ControlRequest rq = decode_control_request(**h);
  ASSERT_FALSE(rq.body.ok());
  EXPECT_NE(rq.body.error().message().find("malformed request"), std::string::npos) << rq.body.error().message();
}

}  // namespace
}  // namespace lazymem::agent
