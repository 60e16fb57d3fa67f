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

TEST(WireReplay, ValidFramesDecode) {
  for (const auto& s : seeds()) EXPECT_NE(fuzz::decode_stream(s), ~uint64_t{0});
}

TEST(WireReplay, MutationsNeverCrash) {
  std::mt19937_64 rng(1234);
  auto base = seeds();
  for (int iter = 0; iter < 20000; ++iter) {
    std::vector<uint8_t> d = base[rng() % base.size()];
    switch (rng() % 4) {
      case 0:  // flip bits
        for (int k = 0; k < 4; ++k) d[rng() % d.size()] ^= static_cast<uint8_t>(1u << (rng() % 8));
        break;
      case 1:  // truncate
        d.resize(rng() % d.size());
        break;
      case 2: {  // rewrite the header or payload length
        uint32_t v = static_cast<uint32_t>(rng());
        size_t at = (rng() % 2) * 4;
        if (d.size() >= at + 4) std::memcpy(d.data() + at, &v, 4);
        break;
      }
      default: {  // splice two frames
        const auto& o = base[rng() % base.size()];
        d.insert(d.end(), o.begin(), o.begin() + static_cast<long>(rng() % o.size()));
      }
    }
    (void)fuzz::decode_stream(d);
  }
  SUCCEED();
}

}  // namespace
}  // namespace lazymem
