// Replays valid agent requests and Firecracker handshakes, and many deterministic mutations of
// them (bit flips, truncations, length rewrites, splices; hostile range values; JSON fields of
// every wrong type), through the agent's decoders: nothing may crash, hang or leak (ASan/UBSan
// in the sanitizer builds), and nothing accepted may break a promise the daemon relies on
// (agent_decoders.h aborts then). The libFuzzer target (agent_fuzz) explores further.
#include <gtest/gtest.h>

#include <random>

#include "agent_decoders.h"
#include "agent_seeds.h"

namespace lazymem {
namespace {

// The requests in `stream`, decoded as the daemon decodes them.
std::vector<agent::ControlRequest> decode_all(const std::vector<uint8_t>& stream) {
  net::FrameBuffer buf;
  auto space = buf.writable(stream.size());
  std::memcpy(space.data(), stream.data(), stream.size());
  buf.commit(stream.size());
  std::vector<agent::ControlRequest> out;
  for (;;) {
    auto f = buf.next();
    EXPECT_TRUE(f.ok());
    if (!f.ok() || !f->has_value()) return out;
    auto h = net::Header::parse((*f)->header);
    EXPECT_TRUE(h.ok());
    if (!h.ok()) return out;
    out.push_back(agent::decode_control_request(**h));
    buf.consume();
  }
}

std::span<const uint8_t> bytes_of(const std::string& s) { return {reinterpret_cast<const uint8_t*>(s.data()), s.size()}; }

TEST(AgentReplay, ValidRequestsDecodeWhole) {
  auto seeds = fuzz::agent_request_seeds();
  ASSERT_EQ(seeds.size(), 4u);
  for (const auto& s : seeds) {
    for (const auto& rq : decode_all(s)) ASSERT_TRUE(rq.body.ok()) << rq.body.error().message();
    EXPECT_NE(fuzz::decode_control_stream(s), 0u);
  }
  auto restore = decode_all(seeds[0]);
  ASSERT_EQ(restore.size(), 1u);
  EXPECT_EQ(restore[0].id, 11u);
  const auto& r = std::get<agent::RestoreRequest>(*restore[0].body);
  EXPECT_EQ(r.snapshot, "/var/lib/lazymem/store/kvs");
  EXPECT_EQ(r.token_file, "/etc/lazymem/token");
  ASSERT_EQ(r.ranges.size(), 3u);
  EXPECT_EQ(r.ranges[2].start, 0x600000000000u);
  EXPECT_EQ(r.ranges[2].region, 2u);
  EXPECT_EQ(r.ranges[2].region_offset, 0x10000u);
  EXPECT_EQ(r.uffd_features, 0x1fu);
  EXPECT_EQ(r.manifest_checksum, 0x0123456789abcdefu);
  EXPECT_TRUE(r.prefetch && r.announces_failures);

  auto fc = decode_all(seeds[2]);
  ASSERT_EQ(fc.size(), 1u);
  const auto& f = std::get<agent::ServeFirecrackerRequest>(*fc[0].body);
  EXPECT_EQ(f.socket_path, "/run/vm1/uffd.sock");
  EXPECT_TRUE(f.cancel_on_close);

  auto small = decode_all(seeds[3]);
  ASSERT_EQ(small.size(), 5u);
  EXPECT_FALSE(std::get<agent::StatusRequest>(*small[0].body).with_stats);
  EXPECT_TRUE(std::get<agent::StatusRequest>(*small[1].body).with_stats);
  EXPECT_EQ(std::get<agent::WaitChangeRequest>(*small[2].body).after_generation, 5u);
  EXPECT_EQ(std::get<agent::FailureSeenRequest>(*small[3].body).session, 3u);
  EXPECT_EQ(std::get<agent::FetchRestRequest>(*small[4].body).session, 3u);
}

// Whole, each handshake is accepted; every proper prefix of it (a message arriving in pieces)
// waits for more, never refused and never taken as whole.
TEST(AgentReplay, HandshakesParseWholeAndWaitWhenPartial) {
  for (const auto& body : fuzz::firecracker_handshake_seeds()) {
    auto whole = agent::parse_guest_regions(body);
    ASSERT_TRUE(whole.ok()) << whole.error().message();
    ASSERT_TRUE(whole->has_value());
    EXPECT_NE(fuzz::decode_handshake(bytes_of(body)), 0u);
    for (size_t n = 0; n < body.size(); ++n) {
      auto part = agent::parse_guest_regions(body.substr(0, n));
      ASSERT_TRUE(part.ok()) << n << ": " << part.error().message();
      EXPECT_FALSE(part->has_value()) << n;
    }
  }
  auto two = agent::parse_guest_regions(fuzz::firecracker_handshake_seeds()[0]);
  ASSERT_EQ((*two)->ranges.size(), 2u);
  EXPECT_EQ((*two)->ranges[1].start, 0x7f0040000000u);
  EXPECT_EQ((*two)->ranges[1].length, 2147483648u);
  EXPECT_EQ((*two)->ranges[1].region_offset, 1073741824u);
}

// Values at the edges of what a range may hold: zero, unaligned, near 2^64 (wrapping when a
// length is added), huge.
constexpr uint64_t kEdges[] = {0, 1, 4095, 4096, 8192, 0x100000, 0x7f0000000000, uint64_t{1} << 63,
                               ~uint64_t{0} - 4095, ~uint64_t{0} - 8191, ~uint64_t{0}};

std::vector<uint8_t> restore_with(std::mt19937_64& rng, unsigned count) {
  capnp::MallocMessageBuilder m;
  auto rq = m.initRoot<proto::agent::Request>();
  auto r = rq.initRestore();
  r.setSnapshot("/store/snap");
  auto ranges = r.initRanges(count);
  auto pick = [&] { return rng() % 3 == 0 ? (rng() % 64) * 4096 : kEdges[rng() % std::size(kEdges)]; };
  for (unsigned i = 0; i < count; ++i) {
    ranges[i].setStart(pick());
    ranges[i].setLength(pick());
    ranges[i].setRegion(static_cast<uint32_t>(rng() % 3 == 0 ? rng() : rng() % 4));
    ranges[i].setRegionOffset(pick());
  }
  return fuzz::agent_frame_of(m);
}

TEST(AgentReplay, HostileRangeValuesAreRefusedOrSound) {
  std::mt19937_64 rng(77);
  size_t accepted = 0;
  for (int iter = 0; iter < 20000; ++iter) {
    auto frame = restore_with(rng, static_cast<unsigned>(rng() % 4));
    for (const auto& rq : decode_all(frame)) accepted += rq.body.ok();
    (void)fuzz::decode_control_stream(frame);  // aborts on a broken promise
  }
  EXPECT_GT(accepted, 0u);  // the sound ones get through: the checks are not refusing everything
}

// Firecracker's JSON with a field replaced by every wrong type and edge value, regions
// duplicated (overlapping) or dropped, characters cut out.
TEST(AgentReplay, HostileHandshakesAreRefusedOrSound) {
  const std::vector<std::string> values = {"0", "1", "4095", "4096", "-4096", "4096.0", "1e300", "-1e300", "1e400",
                                           "18446744073709551615", "18446744073709547520", "18446744073709551616",
                                           "true", "null", "\"4096\"", "[]", "{}", "9223372036854775808"};
  const std::vector<std::string> fields = {"base_host_virt_addr", "size", "offset", "page_size", "page_size_kib"};
  std::mt19937_64 rng(78);
  for (int iter = 0; iter < 20000; ++iter) {
    const auto seeds = fuzz::firecracker_handshake_seeds();
    std::string body = seeds[rng() % seeds.size()];
    for (int k = static_cast<int>(rng() % 3); k >= 0; --k) {
      switch (rng() % 4) {
        case 0:
        case 1: {  // a field's value replaced
          const std::string key = "\"" + fields[rng() % fields.size()] + "\":";
          size_t at = body.find(key);
          if (at == std::string::npos) break;
          at += key.size();
          while (at < body.size() && body[at] == ' ') ++at;
          size_t end = body.find_first_of(",}", at);
          if (end == std::string::npos) break;
          body.replace(at, end - at, values[rng() % values.size()]);
          break;
        }
        case 2: {  // a region repeated: it overlaps itself
          size_t open = body.find('{'), close = body.find('}');
          if (open != std::string::npos && close != std::string::npos && open < close)
            body.insert(close + 1, "," + body.substr(open, close - open + 1));
          break;
        }
        default:  // characters cut out
          if (!body.empty()) body.erase(rng() % body.size(), 1 + rng() % 8);
      }
    }
    auto parsed = agent::parse_guest_regions(body);
    if (parsed.ok() && parsed->has_value()) (void)fuzz::walk_ranges((*parsed)->ranges);
    (void)fuzz::decode_handshake(bytes_of(body));
  }
  SUCCEED();
}

TEST(AgentReplay, MutationsNeverCrash) {
  std::mt19937_64 rng(4321);
  std::vector<std::vector<uint8_t>> base = fuzz::agent_request_seeds();
  for (const auto& s : fuzz::firecracker_handshake_seeds()) base.emplace_back(s.begin(), s.end());
  for (int iter = 0; iter < 20000; ++iter) {
    std::vector<uint8_t> d = base[rng() % base.size()];
    fuzz::mutate(d, rng, base);
    (void)fuzz::decode_control_stream(d);
    (void)fuzz::decode_handshake(d);
  }
  SUCCEED();
}

}  // namespace
}  // namespace lazymem
