// Replays valid frames of every kind and many deterministic mutations of them (bit flips,
// truncations, length rewrites) through the decoders: nothing may crash, hang or leak (run
// under ASan/UBSan in the sanitizer builds). The libFuzzer target explores further.
#include <gtest/gtest.h>

#include <random>

#include "wire_decoders.h"

namespace lazymem {
namespace {

std::vector<uint8_t> frame_of(capnp::MessageBuilder& m, std::span<const std::byte> payload = {}) {
  auto f = net::encode_frame(m, static_cast<uint32_t>(payload.size()));
  std::vector<uint8_t> out(f.size() + payload.size());
  std::memcpy(out.data(), f.data(), f.size());
  if (!payload.empty()) std::memcpy(out.data() + f.size(), payload.data(), payload.size());
  return out;
}

std::vector<std::vector<uint8_t>> seeds() {
  std::vector<std::vector<uint8_t>> out;
  {
    capnp::MallocMessageBuilder m;
    auto r = m.initRoot<proto::wire::Request>();
    r.initHello().setVersion(1);
    out.push_back(frame_of(m));
  }
  {
    capnp::MallocMessageBuilder m;
    auto g = m.initRoot<proto::wire::Request>().initGetChunks();
    g.setSnapshot("snap");
    auto l = g.initChunks(3);
    for (unsigned i = 0; i < 3; ++i) l[i].setChunk(i);
    out.push_back(frame_of(m));
  }
  {
    capnp::MallocMessageBuilder m;
    auto g = m.initRoot<proto::wire::Request>().initGetPage();
    g.setSnapshot("snap");
    g.setRegion(1);
    g.setChunk(2);
    g.setPage(3);
    g.setTag(4);
    out.push_back(frame_of(m));
  }
  {
    Manifest man;
    RegionInfo r;
    r.name = "heap";
    r.start_address = 0x10000000;
    r.length = 2 * kDefaultChunkSize;
    r.chunks = {ChunkInfo{Codec::kZstd, 0, 100, 1}, ChunkInfo{Codec::kZero, 0, 0, 0}};
    man.regions.push_back(r);
    man.data_length = 100;
    auto bytes = snapshot::encode_manifest(man);
    capnp::MallocMessageBuilder m;
    m.initRoot<proto::wire::Reply>().setManifest();
    out.push_back(frame_of(m, bytes));
  }
  {
    // A chunk reply carrying real page frames (text: compressed; a zero page; a random page).
    std::vector<std::byte> chunk(kDefaultChunkSize);
    std::mt19937_64 rng(9);
    for (size_t i = 0; i < chunk.size(); ++i) chunk[i] = std::byte("lazymem page frames "[i % 20]);
    std::memset(chunk.data() + 4096, 0, 4096);
    for (size_t i = 8192; i < 12288; ++i) chunk[i] = static_cast<std::byte>(rng());
    snapshot::ChunkEncoder enc(1, kDefaultChunkSize);
    auto e = enc.encode_pages(chunk, 4096);
    EXPECT_TRUE(e.ok() && e->codec == Codec::kZstdPages);
    capnp::MallocMessageBuilder m;
    m.initRoot<proto::wire::Reply>().initChunk().setTag(1);
    out.push_back(frame_of(m, e->stored));
    EXPECT_EQ(fuzz::decode_page_frames(e->stored), 1u + kDefaultChunkSize / 4096);  // every page decodes
  }
  {
    capnp::MallocMessageBuilder m;
    auto e = m.initRoot<proto::wire::Reply>().initError();
    e.setMessage("nope");
    out.push_back(frame_of(m));
  }
  return out;
}

// The header words of a message, as a reply frame carries them (segment table first).
kj::Array<capnp::word> words_of(capnp::MessageBuilder& m) { return capnp::messageToFlatArray(m); }

uint64_t get_word(const kj::Array<capnp::word>& w, size_t i) {
  uint64_t v;
  std::memcpy(&v, &w[i], sizeof v);
  return v;
}
void set_word(kj::Array<capnp::word>& w, size_t i, uint64_t v) { std::memcpy(static_cast<void*>(&w[i]), &v, sizeof v); }
std::span<const std::byte> bytes_of(const kj::Array<capnp::word>& w) {
  return {reinterpret_cast<const std::byte*>(w.begin()), w.size() * sizeof(capnp::word)};
}

kj::Array<capnp::word> page_reply() {
  capnp::MallocMessageBuilder m;
  auto r = m.initRoot<proto::wire::Reply>();
  r.setId(7);
  auto p = r.initPage();
  p.setRegion(1);
  p.setChunk(2);
  p.setPage(3);
  p.setTag(7);
  return words_of(m);
}

TEST(WireReplay, ShallowCheckPassesRealReplies) {
  EXPECT_TRUE(net::shallow_structs_in_bounds(page_reply()));
  capnp::MallocMessageBuilder m;
  auto e = m.initRoot<proto::wire::Reply>().initError();
  e.setCode(proto::wire::ErrorCode::IO_ERROR);
  e.setMessage("stored chunk is corrupt");
  EXPECT_TRUE(net::shallow_structs_in_bounds(words_of(m)));
  EXPECT_EQ(fuzz::read_checked_reply(bytes_of(page_reply())) & ~uint64_t{1},
            (7u + proto::wire::Reply::PAGE + 1 + 2 + 3 + 7) & ~uint64_t{1});
}

TEST(WireReplay, ShallowCheckRefusesWhatWouldThrow) {
  // Word 0: the segment table; word 1: the root pointer; the root struct's pointer follows its
  // data section.
  auto w = page_reply();
  const uint64_t root = get_word(w, 1);
  const size_t data_words = (root >> 32) & 0xffff, page_ptr = 2 + (root >> 2 & 0x3fffffff) + data_words;
  ASSERT_NE(get_word(w, page_ptr), 0u);

  auto two_segments = page_reply();
  set_word(two_segments, 0, get_word(two_segments, 0) | 1);
  EXPECT_FALSE(net::shallow_structs_in_bounds(two_segments));
  auto long_segment = page_reply();
  set_word(long_segment, 0, get_word(long_segment, 0) + (uint64_t{1} << 32));
  EXPECT_FALSE(net::shallow_structs_in_bounds(long_segment));
  auto root_out = page_reply();
  set_word(root_out, 1, root + (uint64_t{100} << 2));  // the root struct past the segment's end
  EXPECT_FALSE(net::shallow_structs_in_bounds(root_out));
  auto root_before = page_reply();
  set_word(root_before, 1, (root & ~uint64_t{0xfffffffc}) | (uint64_t{0x3fffffff} << 2));  // offset -1: before it
  EXPECT_FALSE(net::shallow_structs_in_bounds(root_before));
  auto page_out = page_reply();
  set_word(page_out, page_ptr, get_word(page_out, page_ptr) + (uint64_t{100} << 2));
  EXPECT_FALSE(net::shallow_structs_in_bounds(page_out));
  auto page_list = page_reply();
  set_word(page_list, page_ptr, get_word(page_list, page_ptr) | 1);  // a list pointer where a struct is read
  EXPECT_FALSE(net::shallow_structs_in_bounds(page_list));
  auto far = page_reply();
  set_word(far, 1, root | 2);
  EXPECT_FALSE(net::shallow_structs_in_bounds(far));
  EXPECT_FALSE(net::shallow_structs_in_bounds({}));

  // Every single-bit flip of a real reply: either refused, or read without a throw.
  for (size_t bit = 0; bit < w.size() * 64; ++bit) {
    auto m = page_reply();
    set_word(m, bit / 64, get_word(m, bit / 64) ^ (uint64_t{1} << (bit % 64)));
    (void)fuzz::read_checked_reply(bytes_of(m));
  }
}

TEST(WireReplay, ValidFramesDecode) {
  for (const auto& s : seeds()) EXPECT_NE(fuzz::decode_stream(s), ~uint64_t{0});
}

TEST(WireReplay, MutationsNeverCrash) {
  std::mt19937_64 rng(1234);
  auto base = seeds();
  for (int iter = 0; iter < 20000; ++iter) {
    std::vector<uint8_t> d = base[rng() % base.size()];
    fuzz::mutate(d, rng, base);
    (void)fuzz::decode_stream(d);
    (void)fuzz::decode_datagram(d);
  }
  SUCCEED();
}

}  // namespace
}  // namespace lazymem
