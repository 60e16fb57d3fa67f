// lazymem-bench-dirty: what a pre-copy round's question ("which pages changed since the last
// round?") costs with DirtyTracker, next to the way to answer it without the kernel's help,
// measured in the same run: hash every page (xxh3) and compare with the last round's hashes.
// Per write fraction: the time to answer, and what the tracked memory's writer pays (the first
// write to a page after each collect() takes a fault the kernel resolves by itself) next to the
// same writes to untracked memory. Both answers are compared: every page whose contents changed
// must be reported.
//
// Then what it buys: a live capture (capture_regions_live) of a 1 GiB hash table of records
// while a thread keeps rewriting records of a hot set, against the stop-the-world capture of the
// same memory (capture_regions with the writer parked throughout): the pause each one costs the
// process, measured in the same run. And a migration's switch-over (MigrationSource::start) of
// the same memory with the same writer: its pause, from pause() to serving what was written
// since from memory, which copies nothing (the destination's part is measured by the demo and
// the tests, not here: no destination restores). And the same switch-over of another process
// (LiveCaptureOptions::pid, the agent's `migrate --pid`), stopped with SIGSTOP.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <xxhash.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <thread>
#include <cstring>
#include <nlohmann/json.hpp>
#include <random>
#include <vector>

#include "../common/bench_util.h"
#include "cli/options.h"
#include "lazymem/dirty.h"
#include "lazymem/migrate.h"
#include "lazymem/pause_gate.h"
#include "lazymem/snapshot.h"
#include "sys/cgroup_freeze.h"
#include "sys/uapi_compat.h"

namespace po = boost::program_options;
using namespace lazymem::bench;

namespace {

struct Row {
  double fraction = 0;     // of the pages written per round
  size_t changed = 0;      // pages per round (median)
  double collect_ms = 0;   // DirtyTracker::collect()
  double hash_ms = 0;      // hash every page and compare
  double tracked_ns = 0;   // per write, tracked memory (the first write to a page faults)
  double untracked_ns = 0; // per write, the same writes to untracked memory
};

std::byte* map_filled(size_t len, uint64_t seed) {
  void* p = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("mmap of the benchmark's memory failed");
  ::madvise(p, len, MADV_NOHUGEPAGE);  // as most of a workload's heap (THP is opt-in here)
  auto* b = static_cast<std::byte*>(p);
  std::mt19937_64 rng(seed);
  for (size_t i = 0; i < len; i += 8) {
    uint64_t v = rng();
    std::memcpy(b + i, &v, 8);
  }
  return b;
}

// One word in each of `n` random pages, from the same sequence for both memories.
double write_pages(std::byte* m, size_t pages, size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const auto t = Clock::now();
  for (size_t i = 0; i < n; ++i) {
    const uint64_t v = rng() | 1;
    std::memcpy(m + (rng() % pages) * kPage + 64, &v, 8);
  }
  return since(t) * 1e9 / static_cast<double>(n ? n : 1);
}

// The pages whose hash changed since `hashes` was taken; `hashes` updated.
std::vector<size_t> hash_compare(const std::byte* m, size_t pages, std::vector<uint64_t>& hashes) {
  std::vector<size_t> changed;
  for (size_t i = 0; i < pages; ++i) {
    const uint64_t h = XXH3_64bits(m + i * kPage, kPage);
    if (h != hashes[i]) changed.push_back(i);
    hashes[i] = h;
  }
  return changed;
}

// A thread rewriting records of the table's first `hot` bytes nonstop (a service's working
// set), parked at the capture's pause through `gate`.
class RecordWriter {
 public:
  RecordWriter(lazymem::example::Record* slots, uint64_t n) : thread_([this, slots, n] { run(slots, n); }) {}
  ~RecordWriter() {
    stop_ = true;
    thread_.join();
  }
  uint64_t writes() const { return writes_.load(std::memory_order_relaxed); }

  lazymem::PauseGate gate;

 private:
  void run(lazymem::example::Record* slots, uint64_t n) {
    gate.enter();
    std::mt19937_64 rng(3);
    for (uint64_t i = 1; !stop_.load(std::memory_order_relaxed); ++i) {
      gate.checkpoint();
      lazymem::example::Record& r = slots[rng() % n];
      if (r.key != 0) r = lazymem::example::make_record(r.key);  // the same record, written again
      writes_.store(i, std::memory_order_relaxed);
    }
    gate.leave();
  }
  std::atomic<uint64_t> writes_{0};
  std::atomic<bool> stop_{false};
  std::thread thread_;  // last: it starts running at construction
};

struct LiveFigures {
  double stop_the_world_s = 0;  // capture_regions, the writer parked throughout
  double live_pause_s = 0;      // capture_regions_live's pause
  double live_total_s = 0;
  unsigned rounds = 0;
  uint64_t superseded = 0;
  double migration_pause_s = 0;     // MigrationSource: pause() to serving
  uint64_t migration_left = 0;      // bytes left at the source, served from memory
  double process_pause_s = 0;       // the same of another process (LiveCaptureOptions::pid): SIGSTOP to serving
  uint64_t process_left = 0;
  double frozen_pause_s = 0;        // the same, frozen with its cgroup (freeze_cgroup); 0: not measured
  uint64_t frozen_left = 0;
  std::string frozen_skipped;       // why not
};

// The switch-over of a migration of another process, as `lazymem-agent migrate --pid` runs it:
// a child holding the same table, its writer never parked (it links nothing of ours), stopped
// with SIGSTOP; what it wrote since the last round is copied out of it, then served.
// With `freeze`, it is paused by freezing a cgroup made for it instead (a cgroup2 mount needed).
void other_process_migration(const lazymem::KernelFeatures& kf, const std::string& store, size_t len, size_t hot,
                             bool freeze, LiveFigures& f) {
  // An address free here too: the copy of the child's memory goes to the same one.
  void* probe = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (probe == MAP_FAILED) throw std::runtime_error("mmap of the table failed");
  ::munmap(probe, len);
  // Removed once the child is gone: declared before `reap`, so destroyed after it (a cgroup
  // with a process in it cannot be removed).
  struct Cgroup {
    std::string dir;
    ~Cgroup() {
      if (!dir.empty()) ::rmdir(dir.c_str());
    }
  } cgroup;
  int ready[2];
  if (::pipe(ready) != 0) throw std::runtime_error("pipe failed");
  const pid_t child = ::fork();  // no thread of this process runs now
  if (child < 0) throw std::runtime_error("fork failed");
  if (child == 0) {
    void* a = ::mmap(probe, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (a == MAP_FAILED) _exit(3);
    lazymem::example::KvTable table(a, len);
    table.fill(7, 0.7);
    auto* slots = reinterpret_cast<lazymem::example::Record*>(static_cast<char*>(a) + 4096);
    RecordWriter writer(slots, std::max<uint64_t>(1, (hot - 4096) / sizeof(lazymem::example::Record)));
    while (writer.writes() == 0) std::this_thread::yield();
    (void)!::write(ready[1], "r", 1);
    for (;;) ::pause();  // until killed; the writer writes on
  }
  ::close(ready[1]);
  char r = 0;
  const bool started = ::read(ready[0], &r, 1) == 1;
  ::close(ready[0]);
  struct Reap {
    pid_t pid;
    ~Reap() {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
  } reap{child};
  if (!started) throw std::runtime_error("the child holding the table did not start");
  if (freeze) {
    auto mount = lazymem::sys::cgroup2_mount_point();
    if (!mount.ok()) {
      f.frozen_skipped = mount.error().message();
      return;
    }
    const std::string dir = *mount + "/lazymem-bench-" + std::to_string(child);
    if (::mkdir(dir.c_str(), 0755) != 0) {
      f.frozen_skipped = "cannot make a cgroup " + dir + ": " + std::strerror(errno);
      return;
    }
    cgroup.dir = dir;
    const std::string pid = std::to_string(child);
    const int fd = ::open((dir + "/cgroup.procs").c_str(), O_WRONLY | O_CLOEXEC);
    const bool moved = fd >= 0 && ::write(fd, pid.data(), pid.size()) == static_cast<ssize_t>(pid.size());
    if (fd >= 0) ::close(fd);
    if (!moved) {
      f.frozen_skipped = "cannot move a process into " + dir + ": " + std::strerror(errno);
      return;
    }
  }
  const lazymem::CaptureRegion region{"heap", probe, len, PROT_READ | PROT_WRITE};
  lazymem::MigrationOptions mo;
  mo.listen = "127.0.0.1:0";
  mo.precopy.pid = child;
  mo.precopy.freeze_cgroup = freeze;
  auto mig = lazymem::MigrationSource::start(store + (freeze ? "/process-frozen" : "/process-migrated"),
                                             std::span(&region, 1), {}, mo, kf);
  if (!mig.ok()) throw std::runtime_error(mig.error().message());
  (freeze ? f.frozen_pause_s : f.process_pause_s) = (*mig)->report().switch_seconds;
  (freeze ? f.frozen_left : f.process_left) = (*mig)->report().postcopy_bytes;
  mig->reset();
}

LiveFigures live_capture(const lazymem::KernelFeatures& kf, const std::string& store, size_t len, size_t hot) {
  void* a = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (a == MAP_FAILED) throw std::runtime_error("mmap of the table failed");
  lazymem::example::KvTable table(a, len);
  table.fill(7, 0.7);
  auto* slots = reinterpret_cast<lazymem::example::Record*>(static_cast<char*>(a) + 4096);
  LiveFigures f;
  {
    RecordWriter writer(slots, std::max<uint64_t>(1, (hot - 4096) / sizeof(lazymem::example::Record)));
    const lazymem::CaptureRegion region{"heap", a, len, PROT_READ | PROT_WRITE};
    writer.gate.pause();
    auto t = Clock::now();
    auto stw = lazymem::capture_regions(store + "/stop-the-world", std::span(&region, 1), {});
    f.stop_the_world_s = since(t);
    writer.gate.resume();
    if (!stw.ok()) throw std::runtime_error(stw.error().message());
    lazymem::LiveCaptureOptions live;
    live.pause = [&] { writer.gate.pause(); };
    live.resume = [&] { writer.gate.resume(); };
    t = Clock::now();
    auto lc = lazymem::capture_regions_live(store + "/live", std::span(&region, 1), {}, live, kf);
    f.live_total_s = since(t);
    if (!lc.ok()) throw std::runtime_error(lc.error().message());
    if (writer.writes() == 0) throw std::runtime_error("the writer never ran");
    f.live_pause_s = lc->paused_seconds;
    f.rounds = lc->rounds;
    f.superseded = lc->superseded_bytes;
    lazymem::MigrationOptions mo;
    mo.listen = "127.0.0.1:0";
    mo.precopy.pause = [&] { writer.gate.pause(); };
    mo.precopy.resume = [&] { writer.gate.resume(); };
    auto mig = lazymem::MigrationSource::start(store + "/migrated", std::span(&region, 1), {}, mo, kf);
    if (!mig.ok()) throw std::runtime_error(mig.error().message());
    f.migration_pause_s = (*mig)->report().switch_seconds;
    f.migration_left = (*mig)->report().postcopy_bytes;
    mig->reset();
    writer.gate.resume();  // nobody took the table over: the bench's writer goes on, to be stopped
  }
  ::munmap(a, len);
  other_process_migration(kf, store, len, hot, false, f);
  other_process_migration(kf, store, len, hot, true, f);
  return f;
}

}  // namespace

static int run_bench(int argc, char** argv) {
  po::options_description desc("lazymem-bench-dirty [options]");
  desc.add_options()("json", "also print one JSON object on the last line")(
      "mib", po::value<size_t>()->default_value(1024), "tracked memory in MiB")(
      "rounds", po::value<unsigned>()->default_value(5), "rounds per write fraction (medians are printed)")(
      "hot-mib", po::value<size_t>()->default_value(64), "live capture: the records the writer keeps rewriting, MiB")(
      "dir", po::value<std::string>()->default_value("/var/tmp"), "live capture: where to put the store")(
      "write-faults", "track as on a kernel before 6.7: write-protect faults taken by the tracker's thread");
  auto vm = lazymem::cli::parse({argv + 1, argv + argc}, desc);
  const size_t mib = vm["mib"].as<size_t>();
  const unsigned rounds = vm["rounds"].as<unsigned>();
  if (mib == 0 || mib > (size_t{1} << 20)) throw std::invalid_argument("--mib wants 1 to 1048576");
  if (rounds == 0) throw std::invalid_argument("--rounds wants at least 1");
  auto kf = lazymem::probe_kernel();
  if (vm.count("write-faults")) {  // what DirtyMethod::kAuto takes without the 6.7 features
    kf.uffd_features &= ~(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED);
    kf.pagemap_scan = false;
  }
  if (!kf.has_dirty_tracking()) {
    std::fprintf(stderr, "lazymem-bench-dirty: this kernel cannot track dirty pages (userfaultfd write-protect faults: Linux 5.13)\n");
    return 1;
  }
  const size_t len = mib << 20, pages = len / kPage;
  std::byte* tracked = map_filled(len, 1);
  std::byte* untracked = map_filled(len, 1);
  std::vector<uint64_t> hashes(pages);
  (void)hash_compare(tracked, pages, hashes);
  auto tracker = lazymem::DirtyTracker::start({{reinterpret_cast<uintptr_t>(tracked), len}}, kf);
  if (!tracker.ok()) throw std::runtime_error(tracker.error().message());

  std::vector<Row> rows;
  uint64_t seed = 100;
  for (double fraction : {0.001, 0.01, 0.1}) {
    std::vector<double> collect_ms, hash_ms, tracked_ns, untracked_ns, changed;
    for (unsigned r = 0; r < rounds; ++r, ++seed) {
      const size_t n = static_cast<size_t>(static_cast<double>(pages) * fraction);
      untracked_ns.push_back(write_pages(untracked, pages, n, seed));
      tracked_ns.push_back(write_pages(tracked, pages, n, seed));
      auto t = Clock::now();
      auto dirty = (*tracker)->collect();
      collect_ms.push_back(since(t) * 1e3);
      if (!dirty.ok()) throw std::runtime_error(dirty.error().message());
      t = Clock::now();
      const std::vector<size_t> by_hash = hash_compare(tracked, pages, hashes);
      hash_ms.push_back(since(t) * 1e3);
      // Every changed page reported; nothing reported that was not written (a write of the
      // value a word already held would be the only exception, and `| 1` into random data
      // makes it one in 2^63).
      std::vector<size_t> reported;
      for (const auto& d : *dirty) {
        for (uintptr_t a = d.start; a < d.end(); a += kPage) reported.push_back((a - reinterpret_cast<uintptr_t>(tracked)) / kPage);
      }
      if (reported != by_hash) {
        std::fprintf(stderr, "lazymem-bench-dirty: the tracker reported %zu pages, hashing found %zu changed\n",
                     reported.size(), by_hash.size());
        return 1;
      }
      changed.push_back(static_cast<double>(reported.size()));
    }
    rows.push_back({fraction, static_cast<size_t>(median(changed)), median(collect_ms), median(hash_ms),
                    median(tracked_ns), median(untracked_ns)});
  }

  const bool marks = (*tracker)->method() == lazymem::DirtyMethod::kKernelMarks;
  std::printf("lazymem-bench-dirty: %zu MiB tracked by %s, %u rounds per fraction, medians; every changed page checked\n",
              mib, marks ? "kernel marks" : "write faults", rounds);
  std::printf("%-9s %10s %12s %14s %8s %18s %18s\n", "written", "pages", "collect ms", "hash-all ms", "ratio",
              "write ns tracked", "write ns untracked");
  for (const Row& r : rows) {
    std::printf("%7.1f%% %10zu %12.2f %14.1f %7.3fx %18.0f %18.0f\n", r.fraction * 100, r.changed, r.collect_ms,
                r.hash_ms, r.collect_ms / r.hash_ms, r.tracked_ns, r.untracked_ns);
  }
  const Row& one = rows[1];  // 1% of the pages per round
  (*tracker).reset();
  ::munmap(tracked, len);
  ::munmap(untracked, len);

  const size_t hot = std::min(len, vm["hot-mib"].as<size_t>() << 20);
  if (hot < 8192) throw std::invalid_argument("--hot-mib wants 1 or more");
  const std::string work = make_work_dir(vm["dir"].as<std::string>(), "dirty", {});
  LiveFigures live;
  try {
    live = live_capture(kf, work + "/store", len, hot);
  } catch (...) {
    std::filesystem::remove_all(work);
    throw;
  }
  std::filesystem::remove_all(work);
  std::printf("at 1%% written per round: collect() %.3fx hashing every page; the workload pays %.2f us per page it "
              "dirties in a round\n",
              one.collect_ms / one.hash_ms, (one.tracked_ns - one.untracked_ns) / 1e3);
  std::printf("live capture of a %zu MiB table, a writer rewriting records of its first %zu MiB nonstop: paused %.1f ms "
              "(%u rounds, %.1f s in all, %.0f MiB stored again) vs %.1f ms stop-the-world: %.3fx\n",
              mib, hot >> 20, live.live_pause_s * 1e3, live.rounds, live.live_total_s, double(live.superseded) / (1 << 20),
              live.stop_the_world_s * 1e3, live.live_pause_s / live.stop_the_world_s);
  std::printf("migration switch-over of the same table and writer: paused %.2f ms before serving the %.1f MiB written "
              "since from memory vs %.1f ms for the live capture's last round: %.3fx\n",
              live.migration_pause_s * 1e3, double(live.migration_left) / (1 << 20), live.live_pause_s * 1e3,
              live.migration_pause_s / live.live_pause_s);
  std::printf("the same migration of another process (lazymem-agent migrate --pid: SIGSTOP, what it wrote since copied "
              "out of it): paused %.2f ms before serving %.1f MiB vs %.2f ms in-process: %.2fx\n",
              live.process_pause_s * 1e3, double(live.process_left) / (1 << 20), live.migration_pause_s * 1e3,
              live.process_pause_s / live.migration_pause_s);
  if (live.frozen_skipped.empty()) {
    std::printf("the same, paused by freezing its cgroup instead (--freeze: nothing seen by its parent): paused %.2f ms "
                "before serving %.1f MiB vs %.2f ms with SIGSTOP: %.2fx\n",
                live.frozen_pause_s * 1e3, double(live.frozen_left) / (1 << 20), live.process_pause_s * 1e3,
                live.frozen_pause_s / live.process_pause_s);
  } else {
    std::printf("the same, frozen with its cgroup: not measured (%s)\n", live.frozen_skipped.c_str());
  }
  if (vm.count("json")) {
    nlohmann::json j{{"mib", mib},
                     {"collect_vs_hash_compare", one.collect_ms / one.hash_ms},
                     {"first_write_cost_us", (one.tracked_ns - one.untracked_ns) / 1e3},
                     {"live_pause_vs_stop_the_world", live.live_pause_s / live.stop_the_world_s},
                     {"live_pause_ms", live.live_pause_s * 1e3},
                     {"stop_the_world_ms", live.stop_the_world_s * 1e3},
                     {"migration_pause_ms", live.migration_pause_s * 1e3},
                     {"migration_pause_vs_live_pause", live.migration_pause_s / live.live_pause_s},
                     {"process_migration_pause_ms", live.process_pause_s * 1e3},
                     {"process_migration_pause_vs_in_process", live.process_pause_s / live.migration_pause_s}};
    if (live.frozen_skipped.empty()) {
      j["frozen_process_migration_pause_ms"] = live.frozen_pause_s * 1e3;
      j["frozen_vs_stopped_process_migration_pause"] = live.frozen_pause_s / live.process_pause_s;
    }
    j["method"] = lazymem::dirty_method_name(marks ? lazymem::DirtyMethod::kKernelMarks : lazymem::DirtyMethod::kWriteFaults);
    for (const Row& r : rows) {
      j["rows"].push_back({{"fraction", r.fraction},
                           {"pages", r.changed},
                           {"collect_ms", r.collect_ms},
                           {"hash_compare_ms", r.hash_ms},
                           {"tracked_write_ns", r.tracked_ns},
                           {"untracked_write_ns", r.untracked_ns}});
    }
    std::printf("%s\n", j.dump().c_str());
  }
  return 0;
}

int main(int argc, char** argv) {
  return lazymem::cli::run("lazymem-bench-dirty", "", [&] { return run_bench(argc, argv); });
}
