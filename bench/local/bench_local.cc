// lazymem-bench-local: restore a 1 GiB heap-like snapshot from the local store four ways, in
// one run, and print each against eager restore:
//   eager           read + decompress everything into place, then touch (what a non-lazy restorer does)
//   eager 2 thr     the same on both cores: two halves of the same heap, restored at once
//   lazy+prefetch   userfaultfd; pages on first touch, the rest prefetched in the background
//   lazy            userfaultfd; demand faults only
//   kernel-mmap     the kernel's own lazy restore: MAP_PRIVATE of the uncompressed image, page cache dropped
// Each run is a fresh child process (the snapshot's address must be free) that reports its
// timings and a hash of every byte it saw, checked against the captured memory.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "cli/options.h"
#include "../common/bench_util.h"
#include "lazymem/restore.h"
#include "lazymem/snapshot.h"

namespace po = boost::program_options;
using Clock = std::chrono::steady_clock;

namespace {

using namespace lazymem::bench;

struct Sample {
  double first_s = 0;   // start → first byte readable
  double all_s = 0;     // start → every page touched
  double cpu_s = 0;     // CPU time of the whole process (all threads, user + system) over all_s
  double resident = 0;  // kernel-mmap: fraction of the image in the page cache when it starts
  uint64_t hash = 0;    // xxh3 of the whole region, computed after timing
  int ok = 0;
};

// CPU seconds used so far by this process, every thread: a restore that finishes sooner by
// keeping both cores busy shows it here.
double cpu_seconds() {
  rusage u{};
  ::getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) * 1e-6;
}

Sample run_eager(const std::string& loc, size_t len) {
  double c0 = cpu_seconds();
  auto t0 = Clock::now();
  auto r = lazymem::restore_eager(loc);
  if (!r.ok()) {
    std::fprintf(stderr, "eager: %s\n", r.error().message().c_str());
    return {};
  }
  Sample s;
  auto* p = static_cast<const unsigned char*>((*r)[0].address);
  s.first_s = since(t0);
  (void)touch_all(p, len);
  s.all_s = since(t0);
  s.cpu_s = cpu_seconds() - c0;
  s.hash = XXH3_64bits(p, len);
  s.ok = 1;
  return s;
}

// Both cores decoding, as an eager restorer that parallelises would: the same heap captured as
// two snapshots of one half each, restored by two threads at once. restore_eager() itself decodes
// on one thread; without this row a lazy restore that decodes prefetches on both cores would be
// compared only with a one-core baseline.
Sample run_eager_two(const std::string (&halves)[2], size_t len) {
  double c0 = cpu_seconds();
  auto t0 = Clock::now();
  bool ok[2] = {false, false};
  void* base = nullptr;
  auto restore = [&](int i) {
    auto r = lazymem::restore_eager(halves[i]);
    if (!r.ok()) {
      std::fprintf(stderr, "eager 2 thr: %s\n", r.error().message().c_str());
      return;
    }
    if (i == 0) base = (*r)[0].address;
    ok[i] = true;
  };
  std::thread other(restore, 1);
  restore(0);
  other.join();
  if (!ok[0] || !ok[1]) return {};
  Sample s;
  auto* p = static_cast<const unsigned char*>(base);
  s.first_s = since(t0);
  (void)touch_all(p, len);
  s.all_s = since(t0);
  s.cpu_s = cpu_seconds() - c0;
  s.hash = XXH3_64bits(p, len);
  s.ok = 1;
  return s;
}

// The same heap as make_heap_snapshot() builds (the fill is deterministic; the hash check proves
// it), captured as two snapshots, one per half.
bool make_half_snapshots(const std::string (&halves)[2], size_t len, uint64_t want_hash) {
  return in_child<int>([&] {
    void* a = ::mmap(reinterpret_cast<void*>(kArena), len, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (a == MAP_FAILED) return 0;
    lazymem::example::KvTable t(a, len);
    t.fill(7, 0.7);
    if (XXH3_64bits(a, len) != want_hash) return 0;
    for (int i = 0; i < 2; ++i) {
      lazymem::CaptureRegion r{"heap", static_cast<char*>(a) + i * (len / 2), i == 0 ? len / 2 : len - len / 2,
                               PROT_READ | PROT_WRITE};
      auto rep = lazymem::capture_regions(halves[i], std::span(&r, 1), {});
      if (!rep.ok()) {
        std::fprintf(stderr, "capture: %s\n", rep.error().message().c_str());
        return 0;
      }
    }
    return 1;
  }) == 1;
}

Sample run_lazy(const std::string& loc, size_t len, bool prefetch) {
  double c0 = cpu_seconds();
  auto t0 = Clock::now();
  lazymem::RestoreOptions o;
  o.prefetch = prefetch;
  auto r = lazymem::LazyRestore::start(loc, o);
  if (!r.ok()) {
    std::fprintf(stderr, "lazy: %s\n", r.error().message().c_str());
    return {};
  }
  Sample s;
  auto* p = static_cast<const volatile unsigned char*>((*r)->regions()[0].address);
  (void)p[len / 2];  // the application's first access lands somewhere in the middle
  s.first_s = since(t0);
  (void)touch_all(p, len);
  s.all_s = since(t0);
  s.cpu_s = cpu_seconds() - c0;
  s.hash = XXH3_64bits(const_cast<const unsigned char*>(p), len);
  s.ok = (*r)->finish().ok() ? 1 : 0;
  return s;
}

// Fraction of the file's pages in the page cache (mincore on a throw-away mapping, which does
// not fault anything in).
double resident_fraction(int fd, size_t len) {
  void* m = ::mmap(nullptr, len, PROT_READ, MAP_SHARED, fd, 0);
  if (m == MAP_FAILED) return 1;
  std::vector<unsigned char> v((len + kPage - 1) / kPage);
  size_t in = 0;
  if (::mincore(m, len, v.data()) == 0)
    for (unsigned char b : v) in += b & 1;
  else
    in = v.size();
  ::munmap(m, len);
  return static_cast<double>(in) / static_cast<double>(v.size());
}

Sample run_kernel_mmap(const std::string& image, size_t len) {
  int fd = ::open(image.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return {};
  // Cold, like a restore on a fresh host. The image was written and fsync'ed, so its pages are
  // clean and DONTNEED drops them (no drop_caches: that would cool the whole machine).
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  Sample s;
  s.resident = resident_fraction(fd, len);
  double c0 = cpu_seconds();
  auto t0 = Clock::now();
  void* m = ::mmap(reinterpret_cast<void*>(kArena), len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED_NOREPLACE, fd, 0);
  ::close(fd);
  if (m == MAP_FAILED) return {};
  auto* p = static_cast<const volatile unsigned char*>(m);
  (void)p[len / 2];
  s.first_s = since(t0);
  (void)touch_all(p, len);
  s.all_s = since(t0);
  s.cpu_s = cpu_seconds() - c0;
  s.hash = XXH3_64bits(const_cast<const unsigned char*>(p), len);
  s.ok = 1;
  return s;
}

}  // namespace

static int run_bench(int argc, char** argv) {
  po::options_description desc("lazymem-bench-local [options]");
  desc.add_options()("json", "also print one JSON object on the last line")(
      "mib", po::value<size_t>()->default_value(1024), "snapshot size in MiB")(
      "rounds", po::value<int>()->default_value(3), "runs of each mode (the median is reported)")(
      "dir", po::value<std::string>()->default_value("/var/tmp"), "where to put the store (disk, for O_DIRECT)");
  auto vm = lazymem::cli::parse({argv + 1, argv + argc}, desc);
  const size_t len = vm["mib"].as<size_t>() << 20;
  const int rounds = vm["rounds"].as<int>();
  const std::string work = make_work_dir(vm["dir"].as<std::string>(), "local",
                                         {{"mib", static_cast<long>(len >> 20)}, {"rounds", rounds}});
  const std::string loc = work + "/store/heap";
  const std::string image = work + "/heap.raw";

  // The heap (a hash table of records, ~5x with zstd-1), snapshotted, plus a raw image for the
  // kernel-mmap baseline; made in a child so the address stays free here.
  const std::string halves[2] = {work + "/store/heap-lo", work + "/store/heap-hi"};
  MadeSnapshot made = make_heap_snapshot(loc, len, image);
  if (!made.ok || !make_half_snapshots(halves, len, made.hash)) {
    std::fprintf(stderr, "lazymem-bench-local: could not build the snapshot in %s\n", work.c_str());
    std::filesystem::remove_all(work);
    return 1;
  }

  enum Mode { kEager, kEagerTwo, kLazyPrefetch, kLazy, kKernelMmap, kModes };
  const char* names[kModes] = {"eager", "eager 2 thr", "lazy+prefetch", "lazy", "kernel-mmap"};
  const char* keys[kModes] = {"eager", "eager_two_threads", "lazy_prefetch", "lazy_no_prefetch", "kernel_mmap"};
  std::vector<double> first[kModes], all[kModes], cpu[kModes];
  double max_resident = 0;
  bool bad = false;
  for (int round = 0; round < rounds; ++round) {
    for (int m = 0; m < kModes; ++m) {  // interleaved, so drift hits every mode alike
      Sample s = in_child<Sample>([&] {
        switch (m) {
          case kEager: return run_eager(loc, len);
          case kEagerTwo: return run_eager_two(halves, len);
          case kLazyPrefetch: return run_lazy(loc, len, true);
          case kLazy: return run_lazy(loc, len, false);
          default: return run_kernel_mmap(image, len);
        }
      });
      if (!s.ok || s.hash != made.hash) {
        std::fprintf(stderr, "%s: run %d %s\n", names[m], round, s.ok ? "restored WRONG bytes" : "failed");
        bad = true;
        continue;
      }
      first[m].push_back(s.first_s);
      all[m].push_back(s.all_s);
      cpu[m].push_back(s.cpu_s);
      if (m == kKernelMmap) max_resident = std::max(max_resident, s.resident);
    }
  }
  std::filesystem::remove_all(work);
  if (bad) return 1;

  double ef = median(first[0]), ea = median(all[0]);
  std::printf("lazymem-bench-local: %zu MiB heap-like snapshot (zstd-1, %.2fx), median of %d runs, every byte checked\n\n",
              len >> 20, made.ratio, rounds);
  std::printf("%-14s %14s %14s %16s %16s %12s %6s\n", "mode", "first access", "touch all", "first vs eager", "all vs eager",
              "CPU", "cores");
  nlohmann::json j;
  j["mib"] = len >> 20;
  j["compression_ratio"] = made.ratio;
  j["rounds"] = rounds;
  for (int m = 0; m < kModes; ++m) {
    double f = median(first[m]), a = median(all[m]), c = median(cpu[m]);
    std::printf("%-14s %11.2f ms %11.1f ms %15.4fx %15.3fx %9.0f ms %6.2f\n", names[m], f * 1e3, a * 1e3, f / ef, a / ea,
                c * 1e3, c / a);
    j[keys[m]] = {{"first_access_s", f}, {"touch_all_s", a},  {"first_vs_eager", f / ef},
                  {"touch_all_vs_eager", a / ea}, {"cpu_s", c}, {"cpu_vs_eager", c / median(cpu[0])}};
  }
  std::printf("(CPU: user + system time of the restoring process, all threads; cores: CPU / touch all)\n");
  // The kernel-mmap baseline is only a cold-start figure if DONTNEED really emptied the cache.
  j["kernel_mmap"]["resident_at_start"] = max_resident;
  if (max_resident > 0.01)
    std::printf("note: kernel-mmap started with %.0f%% of the image still cached; its figures are warm\n",
                max_resident * 100);
  double touch_ratio = median(all[kLazyPrefetch]) / ea;
  double first_ratio = ef / median(first[kLazyPrefetch]);
  double touch_ratio_two = median(all[kLazyPrefetch]) / median(all[kEagerTwo]);
  j["touch_all_lazy_prefetch_vs_eager"] = touch_ratio;
  j["first_access_eager_vs_lazy"] = first_ratio;
  j["touch_all_lazy_prefetch_vs_eager_two_threads"] = touch_ratio_two;
  std::printf("\ntargets: lazy+prefetch touch-all <= 1.0x eager: %.3fx %s; first access >= 100x sooner than eager: %.0fx %s\n",
              touch_ratio, touch_ratio <= 1.0 ? "(met)" : "(MISSED)", first_ratio, first_ratio >= 100 ? "(met)" : "(MISSED)");
  std::printf("         against eager on both cores: lazy+prefetch touch-all %.3fx\n", touch_ratio_two);
  if (vm.count("json")) std::printf("%s\n", j.dump().c_str());
  return 0;
}

int main(int argc, char** argv) {
  return lazymem::cli::run("lazymem-bench-local", "", [&] { return run_bench(argc, argv); });
}
