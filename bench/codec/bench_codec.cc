// lazymem-bench-codec: what a demand fault pays to decode its page, by chunk layout, on the
// same heap-like data as the other benchmarks. Today a fault decodes and checksums its whole
// 64 KiB chunk (the checksum covers it); the alternatives timed against it here: smaller
// chunks, and pages compressed one by one with a dictionary trained on the snapshot, which a
// fault could decode alone. Prints compression ratio and decode time per block, and each
// layout's ratios against the 64 KiB baseline measured in the same run.
#include <xxhash.h>
#include <zdict.h>
#include <zstd.h>

#include <boost/program_options.hpp>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "../common/bench_util.h"

namespace po = boost::program_options;
using namespace lazymem::bench;

namespace {

struct Layout {
  std::string name;
  size_t block = 0;
  size_t dict_bytes = 0;  // 0: no dictionary
  double ratio = 0;
  double decode_us = 0;   // to have one faulting page: decode + xxh3 of its block
  double bulk_gbps = 0;   // decode throughput, for prefetch
};

// Compresses every block of `data` (zstd-1, with the dictionary if any) and decodes a sample of
// them, checking every decoded byte.
bool measure(const std::vector<char>& data, Layout& l, const std::vector<char>& dict) {
  ZSTD_CCtx* cc = ZSTD_createCCtx();
  ZSTD_DCtx* dc = ZSTD_createDCtx();
  ZSTD_CDict* cd = dict.empty() ? nullptr : ZSTD_createCDict(dict.data(), dict.size(), 1);
  ZSTD_DDict* dd = dict.empty() ? nullptr : ZSTD_createDDict(dict.data(), dict.size());
  std::vector<char> out(ZSTD_compressBound(l.block)), back(l.block);
  size_t stored = dict.size();
  std::vector<double> lat;
  double decode_s = 0;
  size_t decoded = 0;
  bool ok = true;
  for (size_t off = 0; off + l.block <= data.size(); off += l.block) {
    const char* in = data.data() + off;
    size_t n = cd ? ZSTD_compress_usingCDict(cc, out.data(), out.size(), in, l.block, cd)
                  : ZSTD_compressCCtx(cc, out.data(), out.size(), in, l.block, 1);
    if (ZSTD_isError(n)) {
      ok = false;
      break;
    }
    stored += std::min(n, l.block);
    if (n >= l.block || (off / l.block) % 16 != 0) continue;
    auto t = Clock::now();
    size_t m = dd ? ZSTD_decompress_usingDDict(dc, back.data(), l.block, out.data(), n, dd)
                  : ZSTD_decompressDCtx(dc, back.data(), l.block, out.data(), n);
    volatile uint64_t sum = XXH3_64bits(back.data(), l.block);
    (void)sum;
    double s = since(t);
    lat.push_back(s * 1e6);
    decode_s += s;
    decoded += l.block;
    ok = ok && m == l.block && std::memcmp(back.data(), in, l.block) == 0;
  }
  l.ratio = double(data.size()) / double(stored);
  l.decode_us = lat.empty() ? 0 : percentile(lat, 50);
  l.bulk_gbps = decode_s > 0 ? double(decoded) / decode_s / 1e9 : 0;
  ZSTD_freeCDict(cd);
  ZSTD_freeDDict(dd);
  ZSTD_freeCCtx(cc);
  ZSTD_freeDCtx(dc);
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  po::options_description desc("lazymem-bench-codec [options]");
  desc.add_options()("help,h", "show this help")("json", "also print one JSON object on the last line")(
      "mib", po::value<size_t>()->default_value(256), "heap-like data in MiB");
  po::variables_map vm;
  try {
    po::store(po::parse_command_line(argc, argv, desc), vm);
    po::notify(vm);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "lazymem-bench-codec: %s\n", e.what());
    return 2;
  }
  if (vm.count("help")) {
    std::cout << desc;
    return 0;
  }
  const size_t len = vm["mib"].as<size_t>() << 20;
  std::vector<char> data(len);
  lazymem::example::KvTable t(data.data(), len);
  t.fill(7, 0.7);

  std::vector<Layout> layouts = {{"64 KiB chunks (today)", 65536}, {"16 KiB chunks", 16384}, {"4 KiB pages", 4096},
                                 {"4 KiB pages + dictionary", 4096, 16384}, {"4 KiB pages + dictionary", 4096, 65536}};
  for (auto& l : layouts) {
    std::vector<char> dict;
    if (l.dict_bytes) {
      // Trained on every 97th page, as a capture could do before compressing.
      std::vector<char> samples;
      std::vector<size_t> sizes;
      for (size_t off = 0; off + 4096 <= len; off += 4096 * 97) {
        samples.insert(samples.end(), data.data() + off, data.data() + off + 4096);
        sizes.push_back(4096);
      }
      dict.resize(l.dict_bytes);
      size_t n = ZDICT_trainFromBuffer(dict.data(), dict.size(), samples.data(), sizes.data(), static_cast<unsigned>(sizes.size()));
      if (ZDICT_isError(n)) {
        std::fprintf(stderr, "dictionary: %s\n", ZDICT_getErrorName(n));
        return 1;
      }
      dict.resize(n);
      l.name += " (" + std::to_string(n / 1024) + " KiB)";
    }
    if (!measure(data, l, dict)) {
      std::fprintf(stderr, "%s: a block did not decode to its bytes\n", l.name.c_str());
      return 1;
    }
  }
  const Layout& base = layouts[0];
  std::printf("lazymem-bench-codec: %zu MiB heap-like data, zstd-1, every decoded byte checked\n\n", len >> 20);
  std::printf("%-38s %8s %16s %12s %12s %12s\n", "layout", "ratio", "fault decode", "vs today", "bulk", "vs today");
  nlohmann::json j;
  for (const auto& l : layouts) {
    std::printf("%-38s %7.2fx %13.1f us %11.2fx %8.2f GB/s %11.2fx\n", l.name.c_str(), l.ratio, l.decode_us,
                l.decode_us / base.decode_us, l.bulk_gbps, l.bulk_gbps / base.bulk_gbps);
    j["layouts"].push_back({{"name", l.name}, {"block", l.block}, {"dictionary", l.dict_bytes}, {"ratio", l.ratio},
                            {"fault_decode_us", l.decode_us}, {"bulk_gbps", l.bulk_gbps}});
  }
  if (vm.count("json")) std::printf("%s\n", j.dump().c_str());
  return 0;
}
