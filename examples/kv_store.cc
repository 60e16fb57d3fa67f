// lazymem-example-kv: builds a hash table of customer records, snapshots it, and restores it
// lazily in a new process, checking every record. The demo and the benchmarks run it.
//
//   lazymem-example-kv fill --mib 512 --snapshot /tmp/store/kv [--live-inserts-per-sec 2000]
//   lazymem-example-kv restore --snapshot /tmp/store/kv [--no-prefetch] [--eager] [--json]
//   lazymem-example-kv migrate --mib 512 --snapshot lazymem://dst:7070/kv --listen 0.0.0.0:7071 --advertise src
//       [--live-inserts-per-sec 2000]: pre-copy to the base, then serve what is left; prints
//       "source: lazymem://src:PORT/kv", to restore from with --base lazymem://dst:7070/kv
//   lazymem-example-kv serve --mib 128 --live-inserts-per-sec 2000
//       fills the table and inserts on until killed, knowing nothing of lazymem: what the agent's
//       `migrate --pid` moves (restore then checks the table as that stop left it)
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <nlohmann/json.hpp>
#include <thread>

#include "cli/options.h"
#include "kv_table.h"
#include "lazymem/agent_client.h"
#include "lazymem/kernel_features.h"
#include "lazymem/migrate.h"
#include "lazymem/pause_gate.h"
#include "lazymem/restore.h"
#include "lazymem/snapshot.h"
#include "lazymem/stats.h"

namespace po = boost::program_options;
using lazymem::example::KvTable;
using Clock = std::chrono::steady_clock;

namespace {

// Where the table lives: fixed, so a restore puts it back where its pointers expect it.
constexpr uintptr_t kArenaAddress = 0x5a0000000000;

// The arena's last eighth is kept free for the table to grow into, as an allocator keeps the
// untouched tail of its arena: never written, so the snapshot stores nothing for it and a
// restore installs it as zero pages.
size_t table_bytes_of(size_t arena_bytes) { return arena_bytes - arena_bytes / 8; }

struct AppState {  // the snapshot's application blob
  uint64_t arena_address;
  uint64_t arena_bytes;
  uint64_t table_bytes;
  uint64_t records;
  uint64_t digest;
  uint64_t seed;
};

bool all_zero(const char* p, size_t n) {
  uint64_t any = 0;
  for (size_t i = 0; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    any |= w;
  }
  return any == 0;
}

double ms_since(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }

// A service taking new customers while its table is captured live: a thread inserting records
// at a steady rate (a real insert: slot, count, digest), parked at the capture's pause through
// `gate`, between two inserts.
class Inserter {
 public:
  Inserter(KvTable& table, double per_sec, uint64_t max_records)
      : table_(table), per_sec_(per_sec), max_records_(max_records), thread_([this] { run(); }) {}
  ~Inserter() {
    stop_ = true;
    thread_.join();
  }

  lazymem::PauseGate gate;

 private:
  void run() {
    gate.enter();
    const auto start = Clock::now();
    for (uint64_t done = 0; !stop_.load(std::memory_order_relaxed);) {
      // What the rate allows by now, then a millisecond's rest (a pause waits at most that).
      const double due = per_sec_ * std::chrono::duration<double>(Clock::now() - start).count();
      for (; static_cast<double>(done) < due && table_.header().records < max_records_; ++done) {
        gate.checkpoint();
        table_.add();
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    gate.leave();
  }

  KvTable& table_;
  const double per_sec_;
  const uint64_t max_records_;
  std::atomic<bool> stop_{false};
  std::thread thread_;  // last: it starts running at construction
};

// Pre-copies the table to the base (--snapshot) while `inserter` runs, switches over, serves
// what is left until the destination has it, and reports each phase.
int migrate(const po::variables_map& vm, lazymem::CaptureRegion region, const lazymem::CaptureOptions& opts,
            Inserter& inserter, std::function<std::vector<std::byte>()> state_at_pause) {
  const auto kf = lazymem::probe_kernel();
  lazymem::MigrationOptions mo;
  mo.listen = vm["listen"].as<std::string>();
  if (vm.count("advertise")) mo.advertise = vm["advertise"].as<std::string>();
  mo.precopy.pause = [&] { inserter.gate.pause(); };
  mo.precopy.resume = [&] { inserter.gate.resume(); };
  mo.precopy.app_state = std::move(state_at_pause);
  const auto t0 = Clock::now();
  auto src = lazymem::MigrationSource::start(vm["snapshot"].as<std::string>(), std::span(&region, 1), opts, mo, kf);
  if (!src.ok()) {
    std::fprintf(stderr, "migration failed: %s\n", src.error().message().c_str());
    return 1;
  }
  const lazymem::MigrationReport& r = (*src)->report();
  std::printf("pre-copy: %.1f MiB stored in %u passes, %.0f ms; switch-over: %.2f ms paused before serving; "
              "%llu chunks (%.1f MiB) written since are served from here\n",
              r.precopy.stored_bytes / 1048576.0, r.precopy.rounds, r.precopy_seconds * 1e3, r.switch_seconds * 1e3,
              static_cast<unsigned long long>(r.postcopy_chunks), r.postcopy_bytes / 1048576.0);
  std::printf("source: %s\n", (*src)->location().c_str());
  std::fflush(stdout);
  auto done = (*src)->wait_postcopy(std::chrono::seconds(vm["postcopy-timeout-sec"].as<unsigned>()));
  if (done.ok()) {
    std::printf("post-copy: %llu chunk replies (%.1f MiB) served in %.0f ms; migration took %.0f ms in all\n",
                static_cast<unsigned long long>(done->served_chunks), done->served_bytes / 1048576.0,
                done->postcopy_seconds * 1e3, ms_since(t0));
  } else {
    std::fprintf(stderr, "migration failed: %s\n", done.error().message().c_str());
    if ((*src)->abort().ok()) std::fprintf(stderr, "migration called off: no destination came; the table is this process's again\n");
  }
  // The table is the destination's now: this process ends without running it again (its
  // inserter stays parked; unwinding would join it).
  std::fflush(stdout);
  std::_Exit(done.ok() ? 0 : 1);
}

int fill(const po::variables_map& vm, bool migrating) {
  const size_t mib = vm["mib"].as<size_t>();
  if (mib == 0 || mib > (size_t{1} << 30)) throw std::invalid_argument("--mib wants 1 or more (MiB)");
  const size_t bytes = mib << 20;
  const uint32_t chunk_size = lazymem::cli::chunk_bytes(vm, "chunk-kib");  // refused before the work, not after
  void* arena = ::mmap(reinterpret_cast<void*>(kArenaAddress), bytes, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
  if (arena == MAP_FAILED) {
    std::perror("mmap arena");
    return 1;
  }
  KvTable table(arena, table_bytes_of(bytes));
  auto t0 = Clock::now();
  uint64_t seed = vm["seed"].as<uint64_t>();
  table.fill(seed, 0.7);
  std::printf("filled %zu MiB: %llu records in %llu slots, %zu MiB free tail (%.0f ms)\n", bytes >> 20,
              static_cast<unsigned long long>(table.header().records),
              static_cast<unsigned long long>(table.header().slots), (bytes - table_bytes_of(bytes)) >> 20, ms_since(t0));

  if (vm["command"].as<std::string>() == "serve") {
    // A service that knows nothing of lazymem: it inserts on until killed.
    Inserter inserter(table, vm["live-inserts-per-sec"].as<double>(),
                      static_cast<uint64_t>(static_cast<double>(table.header().slots) * 0.85));
    std::printf("serving: pid %d, table at %lx-%lx\n", static_cast<int>(::getpid()), static_cast<unsigned long>(kArenaAddress),
                static_cast<unsigned long>(kArenaAddress + bytes));
    std::fflush(stdout);
    for (;;) ::pause();
  }
  AppState st{kArenaAddress, bytes, table_bytes_of(bytes), table.header().records, table.header().digest, seed};
  lazymem::CaptureOptions opts;
  opts.zstd_level = vm["zstd-level"].as<int>();
  opts.chunk_size = chunk_size;
  opts.replace = true;
  opts.app_state.resize(sizeof st);
  std::memcpy(opts.app_state.data(), &st, sizeof st);
  lazymem::CaptureRegion region{"kv-table", arena, bytes, PROT_READ | PROT_WRITE};
  const double live_rate = vm["live-inserts-per-sec"].as<double>();
  if (vm.count("token-file")) opts.token_file = vm["token-file"].as<std::string>();
  lazymem::Result<lazymem::CaptureReport> rep = lazymem::Error(lazymem::Errc::kCancelled, "not captured");
  if (live_rate > 0 || migrating) {
    const auto kf = lazymem::probe_kernel();
    if (!kf.has_dirty_tracking()) {
      std::fprintf(stderr, "live snapshot or migration skipped: this kernel cannot track dirty pages (userfaultfd write-protect faults: Linux 5.13)\n");
      return 3;
    }
    const uint64_t before = table.header().records;
    Inserter inserter(table, live_rate, static_cast<uint64_t>(static_cast<double>(table.header().slots) * 0.85));
    lazymem::LiveCaptureOptions live;
    live.pause = [&] { inserter.gate.pause(); };
    live.resume = [&] { inserter.gate.resume(); };
    auto state_at_pause = [&] {  // the table as the pause found it
      AppState now = st;
      now.records = table.header().records;
      now.digest = table.header().digest;
      std::vector<std::byte> blob(sizeof now);
      std::memcpy(blob.data(), &now, sizeof now);
      std::printf("paused with %llu records (%llu inserted since the capture began)\n",
                  static_cast<unsigned long long>(now.records), static_cast<unsigned long long>(now.records - before));
      return blob;
    };
    if (migrating) return migrate(vm, region, opts, inserter, state_at_pause);
    live.app_state = state_at_pause;
    rep = lazymem::capture_regions_live(vm["snapshot"].as<std::string>(), std::span(&region, 1), opts, live, kf);
  } else {
    rep = lazymem::capture_regions(vm["snapshot"].as<std::string>(), std::span(&region, 1), opts);
  }
  if (!rep.ok()) {
    std::fprintf(stderr, "snapshot failed: %s\n", rep.error().message().c_str());
    return 1;
  }
  if (live_rate > 0) {
    std::printf("live snapshot, %.0f inserts a second going on: the table was paused %.1f ms, for the last of %u passes "
                "(%.1f MiB stored again)\n",
                live_rate, rep->paused_seconds * 1e3, rep->rounds, rep->superseded_bytes / 1048576.0);
  }
  std::printf("snapshot %s: %.1f MiB stored of %.1f MiB (%.2fx), %llu chunks (%llu zero, %llu raw, %llu zstd), %.2f s\n",
              rep->location.c_str(), rep->stored_bytes / 1048576.0, rep->total_bytes / 1048576.0,
              double(rep->total_bytes) / double(std::max<uint64_t>(1, rep->stored_bytes)),
              static_cast<unsigned long long>(rep->chunks), static_cast<unsigned long long>(rep->zero_chunks),
              static_cast<unsigned long long>(rep->raw_chunks), static_cast<unsigned long long>(rep->zstd_chunks),
              rep->seconds);
  return 0;
}

// What restore needs from either way of restoring (in-process or through the agent).
struct Restored {
  std::unique_ptr<lazymem::LazyRestore> local;
  std::unique_ptr<lazymem::AgentRestore> agent;
  const std::vector<std::byte>& app_state() const { return local ? local->app_state() : agent->app_state(); }
  const std::vector<lazymem::RestoredRegion>& regions() const { return local ? local->regions() : agent->regions(); }
};

int restore(const po::variables_map& vm) {
  std::string loc = vm["snapshot"].as<std::string>();
  bool json = vm.count("json") > 0;
  std::string token = vm.count("token-file") ? vm["token-file"].as<std::string>() : "";
  auto t0 = Clock::now();
  Restored r;
  if (vm.count("agent")) {
    lazymem::AgentRestoreOptions opts;
    opts.prefetch = !vm.count("no-prefetch");
    opts.token_file = token;
    auto a = lazymem::AgentRestore::start(vm["agent"].as<std::string>(), loc, opts);
    if (!a.ok()) {
      std::fprintf(stderr, "restore failed: %s\n", a.error().message().c_str());
      return 1;
    }
    r.agent = std::move(*a);
  } else {
    lazymem::RestoreOptions opts;
    opts.prefetch = !vm.count("no-prefetch");
    opts.token_file = token;
    if (vm.count("base")) opts.base = vm["base"].as<std::string>();
    auto l = lazymem::LazyRestore::start(loc, opts);
    if (!l.ok()) {
      std::fprintf(stderr, "restore failed: %s\n", l.error().message().c_str());
      return 1;
    }
    r.local = std::move(*l);
  }
  double started_ms = ms_since(t0);
  AppState st{};
  // Captured from outside (the agent's migrate --pid of `serve`): no state blob; the table is
  // checked as the stop left it, one insert possibly in flight.
  const bool from_outside = r.app_state().empty() && r.regions().size() == 1;
  if (from_outside) {
    const lazymem::RestoredRegion& arena = r.regions()[0];
    st.arena_address = reinterpret_cast<uintptr_t>(arena.address);
    st.arena_bytes = arena.length;
    st.table_bytes = table_bytes_of(arena.length);
    const auto* header = static_cast<const lazymem::example::TableHeader*>(arena.address);
    st.seed = header->seed;
    st.records = header->records;  // for the first lookup; verify_stopped() counts them
  } else if (r.app_state().size() != sizeof st) {
    std::fprintf(stderr, "restore: snapshot %s was not made by lazymem-example-kv\n", loc.c_str());
    return 1;
  } else {
    std::memcpy(&st, r.app_state().data(), sizeof st);
  }
  if (st.records == 0) {
    std::fprintf(stderr, "restore: the table in %s is empty\n", loc.c_str());
    return 1;
  }
  KvTable table(reinterpret_cast<void*>(st.arena_address), st.table_bytes);

  // The application is running: answer a first lookup, then check everything.
  uint64_t key = lazymem::example::key_of(st.seed, 12345 % st.records);
  const auto* rec = table.find(key);
  double first_ms = ms_since(t0);
  lazymem::example::Record want = lazymem::example::make_record(key);
  if (rec == nullptr || std::memcmp(rec, &want, sizeof want) != 0) {
    std::fprintf(stderr, "restore: first lookup returned a wrong record\n");
    return 1;
  }
  std::string bad = from_outside ? table.verify_stopped(st.records) : table.verify(st.records, st.digest);
  if (bad.empty() && !all_zero(reinterpret_cast<const char*>(st.arena_address) + st.table_bytes, st.arena_bytes - st.table_bytes))
    bad = "the arena's free tail is not zero";
  double verified_ms = ms_since(t0);
  if (!bad.empty()) {
    std::fprintf(stderr, "restore: verification FAILED: %s\n", bad.c_str());
    return 1;
  }
  const char* via = r.agent ? " through lazymem-agent" : "";
  if (r.local) {
    lazymem::RestoreStats stats = r.local->stats();
    if (json) {
      nlohmann::json j = nlohmann::json::parse(lazymem::format_stats_json(stats));
      j["restore_started_ms"] = started_ms;
      j["first_lookup_ms"] = first_ms;
      j["verified_ms"] = verified_ms;
      j["records"] = st.records;
      std::printf("%s\n", j.dump().c_str());
    } else {
      std::printf("restored %s: first lookup after %.2f ms; all %llu records verified after %.0f ms\n", loc.c_str(),
                  first_ms, static_cast<unsigned long long>(st.records), verified_ms);
      std::printf("%s", lazymem::format_stats_table(stats).c_str());
    }
    lazymem::Status done = r.local->finish();
    if (!done.ok()) {
      std::fprintf(stderr, "restore: %s\n", done.error().message().c_str());
      return 1;
    }
  } else {
    std::printf("restored %s%s: first lookup after %.2f ms; all %llu records verified after %.0f ms\n", loc.c_str(), via,
                first_ms, static_cast<unsigned long long>(st.records), verified_ms);
    lazymem::Status done = r.agent->wait_complete();
    if (!done.ok()) {
      std::fprintf(stderr, "restore: %s\n", done.error().message().c_str());
      return 1;
    }
  }
  return 0;
}

}  // namespace

static int run_example(int argc, char** argv) {
  po::options_description desc("lazymem-example-kv {fill|restore|migrate|serve} [options]");
  desc.add_options()("command", po::value<std::string>(), "fill, restore, migrate or serve (the first argument)")("snapshot", po::value<std::string>(),
                                                  "snapshot location: STORE/NAME or lazymem://HOST:PORT/NAME")(
      "mib", po::value<size_t>()->default_value(256), "fill: arena size in MiB (the table takes 7/8)")(
      "seed", po::value<uint64_t>()->default_value(42), "fill: key seed")(
      "zstd-level", po::value<int>()->default_value(1), "fill: zstd level")(
      "chunk-kib", po::value<uint32_t>()->default_value(64), "fill: chunk size in KiB")(
      "live-inserts-per-sec", po::value<double>()->default_value(0),
      "fill: snapshot live while a thread inserts this many records a second (0: the table is idle)")(
      "no-prefetch", "restore: fetch only what is touched")("token-file", po::value<std::string>(),
                                                            "restore: page-server token file")(
      "json", "restore: print figures as JSON")("agent", po::value<std::string>(),
                                                 "restore: through the lazymem-agent at this socket")(
      "base", po::value<std::string>(), "restore: the pre-copy of a migration (its unchanged chunks are read there)")(
      "listen", po::value<std::string>()->default_value("0.0.0.0:0"), "migrate: where the destination fetches what is left")(
      "advertise", po::value<std::string>(), "migrate: the host name the destination dials (default: --listen's)")(
      "postcopy-timeout-sec", po::value<unsigned>()->default_value(300), "migrate: how long to serve the destination");
  po::positional_options_description pos;
  pos.add("command", 1);
  auto vm = lazymem::cli::parse({argv + 1, argv + argc}, desc, &pos);
  const std::string cmd = vm.count("command") ? vm["command"].as<std::string>() : "";
  if (cmd != "fill" && cmd != "restore" && cmd != "migrate" && cmd != "serve") {
    throw std::invalid_argument("give the command: fill, restore, migrate or serve");
  }
  if (!vm.count("snapshot") && cmd != "serve") throw std::invalid_argument("--snapshot is required");
  if (cmd == "restore") return restore(vm);
  return fill(vm, cmd == "migrate");
}

int main(int argc, char** argv) {
  return lazymem::cli::run("lazymem-example-kv", "", [&] { return run_example(argc, argv); });
}
