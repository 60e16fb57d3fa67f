// lazymem-bench-codec: the chunk codecs a snapshot is written with, on the same heap-like data as
// the other benchmarks, through the runtime's own encoder and decoder. Format 1 stores one zstd
// frame per chunk, so a demand fault decodes and checksums its whole chunk; format 2 stores one
// frame per page with a dictionary trained on the snapshot, so a fault verifies the stored bytes
// and decodes its page alone. Prints, per layout: compression ratio, single-thread encode speed
// (format 2 including the dictionary's training), what a fault decodes before it can install its
// page, and bulk decode speed (prefetch), each next to format 1's 64 KiB chunks measured in the
// same run. Every decoded byte is compared with the original. For format 2 it also sorts the
// pages by what a single-page request (getPage) gets: zero, raw (sent as their whole chunk), or a
// frame small enough for one datagram over a 1500-byte link, or not. `--raw FILE` measures a
// memory image of your own instead of the synthetic heap.
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "cli/options.h"
#include "../common/bench_util.h"
#include "snapshot/chunk_codec.h"
#include "snapshot/dictionary.h"

namespace po = boost::program_options;
using namespace lazymem::bench;
namespace snap = lazymem::snapshot;

namespace {

constexpr uint32_t kPage = 4096;
// The largest page frame one getPage reply datagram carries over a 1500-byte MTU without
// fragments: 1500 - 28 (IPv4 + UDP; IPv6: 48) - ~72 (frame prefix and the Cap'n Proto reply).
constexpr size_t kFrameFitsMtu1500 = 1400;

// Pages of format 2 by what a getPage for them gets.
struct FrameSizes {
  uint64_t zero = 0;       // no frame: the zero page
  uint64_t raw = 0;        // stored raw (alone, or the whole chunk): sent as the whole chunk
  uint64_t fit = 0;        // a zstd frame of at most kFrameFitsMtu1500 bytes
  uint64_t over = 0;       // a zstd frame larger than that: by the connection on a 1500-byte link
  std::vector<double> sizes;  // of every zstd frame
  uint64_t pages() const { return zero + raw + fit + over; }
  double share(uint64_t n) const { return pages() ? 100.0 * double(n) / double(pages()) : 0.0; }
};

struct Layout {
  std::string name;
  uint32_t chunk = 0;
  uint32_t format = 1;
  double ratio = 0;
  double encode_mbps = 0;  // one thread
  double fault_us = 0;     // p50: what a fault decodes and verifies before its page can go in
  double bulk_gbps = 0;    // whole chunks, decoded and verified
};

struct Stored {
  lazymem::ChunkInfo info;
  std::vector<std::byte> bytes;
};

void count_frames(lazymem::Codec codec, std::span<const std::byte> stored, std::span<const std::byte> in,
                  FrameSizes& f) {
  const uint32_t pages = static_cast<uint32_t>(in.size() / kPage);
  for (uint32_t p = 0; p < pages; ++p) {
    if (codec == lazymem::Codec::kZero) {
      ++f.zero;
      continue;
    }
    if (codec != lazymem::Codec::kZstdPages) {  // a raw chunk
      (snap::is_all_zero(in.subspan(size_t{p} * kPage, kPage)) ? f.zero : f.raw) += 1;
      continue;
    }
    auto frame = snap::page_frame(stored, static_cast<uint32_t>(in.size()), kPage, p);
    if (frame.empty()) {
      ++f.zero;
    } else if (!snap::is_compressed_frame(frame, kPage)) {
      ++f.raw;
    } else {
      (frame.size() <= kFrameFitsMtu1500 ? f.fit : f.over) += 1;
      f.sizes.push_back(double(frame.size()));
    }
  }
}

// `frames`, if given, counts format 2's pages by their frames.
bool measure(const std::vector<std::byte>& data, Layout& l, int level, FrameSizes* frames) {
  std::vector<std::byte> dict;
  auto t0 = Clock::now();
  if (l.format == 2) {
    std::span<const std::byte> all(data);
    dict = snap::train_dictionary(std::span(&all, 1), kPage);
  }
  auto cdict = snap::EncodeDictionary::load(dict, level);
  auto ddict = snap::DecodeDictionary::load(dict);
  if (!cdict.ok() || !ddict.ok()) return false;
  snap::ChunkEncoder enc(level, l.chunk, *cdict);
  std::vector<Stored> chunks;
  size_t stored = dict.size();
  for (size_t off = 0; off < data.size(); off += l.chunk) {
    auto in = std::span(data).subspan(off, l.chunk);
    auto e = l.format == 2 ? enc.encode_pages(in, kPage) : enc.encode(in);
    if (!e.ok()) return false;
    chunks.push_back({lazymem::ChunkInfo{e->codec, 0, static_cast<uint32_t>(e->stored.size()), e->checksum,
                                         e->stored_checksum},
                      {e->stored.begin(), e->stored.end()}});
    stored += e->stored.size();
    if (frames) count_frames(chunks.back().info.codec, chunks.back().bytes, in, *frames);
  }
  l.encode_mbps = double(data.size()) / 1e6 / since(t0);
  l.ratio = double(data.size()) / double(stored);

  snap::ChunkDecoder dec;
  snap::ChunkLayout layout{kPage, *ddict ? (*ddict)->get() : nullptr};
  std::vector<std::byte> out(l.chunk);
  std::mt19937_64 rng(3);
  std::vector<double> lat;
  bool ok = true;
  // A fault: a random page of every 16th stored chunk, decoded from cold-ish caches (chunks apart).
  for (size_t c = 0; c < chunks.size(); c += 16) {
    const Stored& s = chunks[c];
    if (s.info.codec == lazymem::Codec::kZero) continue;
    uint32_t page = static_cast<uint32_t>(rng() % (l.chunk / kPage));
    auto t = Clock::now();
    bool good;
    if (s.info.codec == lazymem::Codec::kZstdPages) {
      good = dec.verify_stored(s.info, s.bytes, l.chunk, kPage).ok() &&
             dec.decode_page(s.bytes, l.chunk, page, std::span(out).subspan(size_t{page} * kPage, kPage), layout).ok();
    } else {
      good = dec.decode(s.info, s.bytes, out, layout).ok();
    }
    lat.push_back(since(t) * 1e6);
    ok = ok && good &&
         std::memcmp(out.data() + size_t{page} * kPage, data.data() + c * l.chunk + size_t{page} * kPage, kPage) == 0;
  }
  auto t1 = Clock::now();
  for (size_t c = 0; c < chunks.size(); ++c) {
    ok = ok && dec.decode(chunks[c].info, chunks[c].bytes, out, layout).ok() &&
         std::memcmp(out.data(), data.data() + c * l.chunk, l.chunk) == 0;
  }
  l.bulk_gbps = double(data.size()) / 1e9 / since(t1);
  l.fault_us = lat.empty() ? 0 : percentile(lat, 50);
  return ok;
}

}  // namespace

static int run_bench(int argc, char** argv) {
  po::options_description desc("lazymem-bench-codec [options]");
  desc.add_options()("json", "also print one JSON object on the last line")(
      "mib", po::value<size_t>()->default_value(256), "heap-like data in MiB")(
      "level", po::value<int>()->default_value(1), "zstd compression level")(
      "raw", po::value<std::string>(), "a memory image (raw file) to measure instead of heap-like data");
  auto vm = lazymem::cli::parse({argv + 1, argv + argc}, desc);
  const int level = vm["level"].as<int>();
  if (level < -7 || level > 22) throw std::invalid_argument("--level wants a zstd level, -7 to 22");
  std::vector<std::byte> data;
  std::string what;
  if (vm.count("raw")) {
    const std::string path = vm["raw"].as<std::string>();
    std::ifstream in(path, std::ios::binary | std::ios::ate);
    if (in) {
      data.resize(static_cast<size_t>(in.tellg()));
      in.seekg(0).read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(data.size()));
    }
    what = path;
    if (!in) {
      std::fprintf(stderr, "lazymem-bench-codec: cannot read %s: %s\n", path.c_str(), std::strerror(errno));
      return 2;
    }
    data.resize(data.size() / 65536 * 65536);  // whole chunks of every layout
    if (data.empty()) {
      std::fprintf(stderr, "lazymem-bench-codec: %s is shorter than one 64 KiB chunk\n", path.c_str());
      return 2;
    }
  } else {
    const size_t len = vm["mib"].as<size_t>() << 20;
    if (len == 0) {
      std::fprintf(stderr, "lazymem-bench-codec: --mib must be positive\n");
      return 2;
    }
    data.resize(len);
    lazymem::example::KvTable t(data.data(), len);
    t.fill(7, 0.7);
    what = "heap-like data";
  }

  std::vector<Layout> layouts = {{"format 1, 64 KiB chunks", 65536, 1},
                                 {"format 1, 16 KiB chunks", 16384, 1},
                                 {"format 2, 64 KiB chunks of page frames", 65536, 2}};
  FrameSizes frames;  // of format 2
  for (auto& l : layouts) {
    if (!measure(data, l, level, l.format == 2 ? &frames : nullptr)) {
      std::fprintf(stderr, "%s: a chunk did not decode to its bytes\n", l.name.c_str());
      return 1;
    }
  }
  const Layout& base = layouts[0];
  std::printf("lazymem-bench-codec: %.1f MiB of %s, zstd-%d, one thread, every decoded byte checked\n\n",
              double(data.size()) / (1 << 20), what.c_str(), level);
  std::printf("%-40s %7s %13s %15s %9s %12s %9s\n", "layout", "ratio", "encode", "fault decode", "vs f1", "bulk", "vs f1");
  nlohmann::json j;
  j["level"] = level;
  for (const auto& l : layouts) {
    std::printf("%-40s %6.2fx %8.0f MB/s %12.1f us %8.2fx %7.2f GB/s %8.2fx\n", l.name.c_str(), l.ratio, l.encode_mbps,
                l.fault_us, l.fault_us / base.fault_us, l.bulk_gbps, l.bulk_gbps / base.bulk_gbps);
    j["layouts"].push_back({{"name", l.name}, {"format", l.format}, {"chunk", l.chunk}, {"ratio", l.ratio},
                            {"encode_mbps", l.encode_mbps}, {"fault_decode_us", l.fault_us}, {"bulk_gbps", l.bulk_gbps},
                            {"fault_decode_vs_format1", l.fault_us / base.fault_us},
                            {"bulk_vs_format1", l.bulk_gbps / base.bulk_gbps}});
  }
  const FrameSizes& f = frames;
  const std::vector<double>& sizes = f.sizes;
  std::printf("\nformat 2 pages, by what a single-page request (getPage) gets:\n"
              "  zero %.1f%%, raw (sent as the whole chunk) %.1f%%, a zstd frame of <= %zu B (one datagram over a "
              "1500-byte link) %.1f%%, larger %.1f%%\n",
              f.share(f.zero), f.share(f.raw), kFrameFitsMtu1500, f.share(f.fit), f.share(f.over));
  if (!sizes.empty()) {
    std::printf("  zstd frame size p50 %.0f B, p90 %.0f B, p99 %.0f B\n", percentile(sizes, 50), percentile(sizes, 90),
                percentile(sizes, 99));
  }
  j["input"] = what;
  j["format2_pages"] = {{"zero", f.zero}, {"raw", f.raw}, {"frame_fits_mtu1500", f.fit}, {"frame_over_mtu1500", f.over}};
  if (vm.count("json")) std::printf("%s\n", j.dump().c_str());
  return 0;
}

int main(int argc, char** argv) {
  return lazymem::cli::run("lazymem-bench-codec", "", [&] { return run_bench(argc, argv); });
}
