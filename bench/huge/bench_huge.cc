// lazymem-bench-huge: one snapshot restored by the fault engine into memory of 2 MiB huge pages
// (hugetlbfs, as a VM backed by huge pages) and into memory of 4 KiB pages, interleaved in one
// run: touch-all time with prefetch, single-fault latency without prefetch (each fault on a
// page of its own: a huge page brings 2 MiB, a 4 KiB one its 64 KiB chunk), and what the memory
// is restored for: random reads over all of it afterwards (TLB reach). Every byte checked.
#include <sys/mman.h>
#include <xxhash.h>

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>

#include "../../tests/common/huge_pages.h"
#include "../common/bench_util.h"
#include "cli/options.h"
#include "core/log.h"
#include "fault/fault_engine.h"
#include "lazymem/kernel_features.h"
#include "source.h"
#include "sys/uffd.h"

namespace po = boost::program_options;
using namespace lazymem::bench;
using lazymem::testing::kHugePage;

namespace {

struct Run {
  double touch_all_s = 0;
  double p50_us = 0, p99_us = 0;
  double reads_s = 0;
  uint64_t faults = 0;      // in the touch-all run
  double blocked_s = 0;     // the faulting thread's wait, summed
  uint64_t hash = 0;
  int ok = 0;
};

constexpr size_t kReads = size_t{1} << 24;

// Restores `loc` into fresh memory of huge or 4 KiB pages, then either touches every page or
// times `faults` single touches, each in a huge page of its own; then the random reads.
Run restore_run(const std::string& loc, size_t len, bool huge, int faults) {
  Run out;
  void* m = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | (huge ? MAP_HUGETLB : 0), -1, 0);
  if (m == MAP_FAILED) {
    std::fprintf(stderr, "mapping %zu MiB of %s pages: %s\n", len >> 20, huge ? "huge" : "4 KiB", std::strerror(errno));
    return out;
  }
  auto* p = static_cast<unsigned char*>(m);
  auto uffd = lazymem::sys::Uffd::open(0);
  auto source = lazymem::open_chunk_source(loc, lazymem::RestoreOptions{});
  if (!uffd.ok() || !uffd->register_missing(reinterpret_cast<uintptr_t>(p), len).ok() || !source.ok()) return out;
  lazymem::fault::FaultEngine engine(lazymem::probe_kernel());
  if (!engine.start().ok()) return out;
  lazymem::fault::SessionSpec spec;
  spec.name = huge ? "huge" : "4k";
  spec.uffd = std::move(*uffd);
  spec.source = std::move(*source);
  spec.ranges = {lazymem::fault::MappedRange{reinterpret_cast<uint64_t>(p), len, 0, 0}};
  spec.page_size = huge ? kHugePage : 4096;
  spec.pid = ::getpid();
  spec.prefetch = faults == 0;
  auto t0 = Clock::now();
  auto id = engine.add_session(std::move(spec));
  if (!id.ok()) {
    std::fprintf(stderr, "session: %s\n", id.error().message().c_str());
    return out;
  }
  if (faults == 0) {
    (void)touch_all(p, len);
    out.touch_all_s = since(t0);
    if (auto info = engine.session_info(*id)) {
      for (const auto& r : info->stats.regions) {
        out.faults += r.faults;
        out.blocked_s += static_cast<double>(r.blocked_us) / 1e6;
      }
    }
  } else {
    std::mt19937_64 rng(99);
    std::vector<size_t> order(len / kHugePage);
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), rng);
    std::vector<double> lat;
    const volatile unsigned char* vp = p;
    for (size_t i = 0; i < order.size() && i < static_cast<size_t>(faults); ++i) {
      auto t = Clock::now();
      (void)vp[order[i] * kHugePage + (rng() % (kHugePage / kPage)) * kPage];
      lat.push_back(since(t) * 1e6);
    }
    out.p50_us = percentile(lat, 50);
    out.p99_us = percentile(lat, 99);
    (void)touch_all(p, len);
  }
  out.hash = XXH3_64bits(p, len);
  std::mt19937_64 rng(7);
  uint64_t sum = 0;
  auto t1 = Clock::now();
  for (size_t i = 0; i < kReads; ++i) sum += reinterpret_cast<const volatile uint64_t*>(p)[rng() % (len / 8)];
  out.reads_s = since(t1);
  out.ok = sum != 1;  // keeps the reads
  engine.remove_session(*id);
  engine.stop();
  ::munmap(p, len);
  return out;
}

}  // namespace

static int run_bench(int argc, char** argv) {
  po::options_description desc("lazymem-bench-huge [options]");
  desc.add_options()("json", "also print one JSON object on the last line")(
      "mib", po::value<size_t>()->default_value(512), "snapshot size in MiB (a multiple of 2)")(
      "rounds", po::value<int>()->default_value(3), "runs of each mode (median reported)")(
      "faults", po::value<int>()->default_value(200), "single faults timed per latency run (one per huge page)")(
      "dir", po::value<std::string>()->default_value("/var/tmp"), "where to put the store");
  auto vm = lazymem::cli::parse({argv + 1, argv + argc}, desc);
  const size_t len = vm["mib"].as<size_t>() << 20;
  const int rounds = vm["rounds"].as<int>(), faults = vm["faults"].as<int>();
  if (len % kHugePage != 0) {
    std::fprintf(stderr, "lazymem-bench-huge: --mib must be a multiple of 2\n");
    return 2;
  }
  const std::string work = make_work_dir(vm["dir"].as<std::string>(), "huge",
                                         {{"mib", static_cast<long>(len >> 20)}, {"rounds", rounds}, {"faults", faults}});
  // Set aside, as on a host serving huge-page VMs (see huge_pages.h).
  lazymem::testing::HugePages pages(len / kHugePage, lazymem::testing::HugePages::How::kSetAside);
  if (!pages.unavailable().empty()) {
    std::fprintf(stderr, "lazymem-bench-huge: %s\n", pages.unavailable().c_str());
    return 1;
  }
  // Each page of the pool used once before the runs: the first use of pages just set aside cost
  // the kernel 0.5-0.9 s more system time per 512 MiB here (a VM: the host backs them then),
  // which went to whichever run came first. A host serving VMs has used its pool before.
  if (void* warm = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
      warm != MAP_FAILED) {
    std::memset(warm, 1, len);
    ::munmap(warm, len);
  }
  lazymem::log::set_level("warn");
  const std::string loc = work + "/store/heap";
  MadeSnapshot made = make_heap_snapshot(loc, len);
  if (!made.ok) return 1;

  std::vector<double> all[2], p50[2], p99[2], reads[2], nfaults[2], blocked[2];
  bool bad = false;
  for (int round = 0; round < rounds; ++round) {
    for (int mode = 0; mode < 2; ++mode) {  // 0: 4 KiB pages, 1: huge pages; interleaved
      Run a = in_child<Run>([&] { return restore_run(loc, len, mode == 1, 0); });
      Run f = in_child<Run>([&] { return restore_run(loc, len, mode == 1, faults); });
      if (!a.ok || !f.ok || a.hash != made.hash || f.hash != made.hash) {
        std::fprintf(stderr, "%s pages, run %d: %s\n", mode ? "huge" : "4 KiB", round,
                     a.ok && f.ok ? "restored WRONG bytes" : "failed");
        bad = true;
        continue;
      }
      all[mode].push_back(a.touch_all_s);
      p50[mode].push_back(f.p50_us);
      p99[mode].push_back(f.p99_us);
      reads[mode].push_back(a.reads_s);
      nfaults[mode].push_back(static_cast<double>(a.faults));
      blocked[mode].push_back(a.blocked_s);
    }
  }
  std::filesystem::remove_all(work);
  if (bad) return 1;

  std::printf("lazymem-bench-huge: %zu MiB heap-like snapshot (zstd-1, %.2fx), median of %d runs, every byte checked\n\n",
              len >> 20, made.ratio, rounds);
  std::printf("%-10s %16s %22s %14s %14s %20s\n", "pages", "touch all (pf)", "its faults (waited)", "fault p50",
              "fault p99", "random reads after");
  const char* names[] = {"4 KiB", "2 MiB"};
  for (int m = 0; m < 2; ++m) {
    std::printf("%-10s %13.1f ms %9.0f (%6.1f ms) %11.0f us %11.0f us %14.1f ns/read\n", names[m], median(all[m]) * 1e3,
                median(nfaults[m]), median(blocked[m]) * 1e3, median(p50[m]), median(p99[m]),
                median(reads[m]) * 1e9 / kReads);
  }
  const double touch = median(all[1]) / median(all[0]), fault = median(p50[1]) / median(p50[0]),
               after = median(reads[1]) / median(reads[0]);
  std::printf("\nhuge pages vs 4 KiB pages: touch-all %.3fx, fault p50 %.2fx (2 MiB against a 64 KiB chunk), "
              "random reads after the restore %.3fx\n",
              touch, fault, after);
  if (vm.count("json")) {
    nlohmann::json j;
    j["mib"] = len >> 20;
    j["rounds"] = rounds;
    j["compression_ratio"] = made.ratio;
    for (int m = 0; m < 2; ++m) {
      j[m ? "huge" : "small"] = {{"touch_all_s", median(all[m])}, {"touch_all_faults", median(nfaults[m])},
                                 {"touch_all_waited_s", median(blocked[m])}, {"fault_p50_us", median(p50[m])},
                                 {"fault_p99_us", median(p99[m])}, {"random_read_ns", median(reads[m]) * 1e9 / kReads}};
    }
    j["touch_all_huge_vs_small"] = touch;
    j["fault_p50_huge_vs_small"] = fault;
    j["random_reads_huge_vs_small"] = after;
    std::printf("%s\n", j.dump().c_str());
  }
  return 0;
}

int main(int argc, char** argv) {
  return lazymem::cli::run("lazymem-bench-huge", "", [&] { return run_bench(argc, argv); });
}
