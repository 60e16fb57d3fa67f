// lazymem-bench-agent: the same snapshot restored in-process and through lazymem-agent, in one
// run: touch-all time with prefetch, and single-fault latency without prefetch (random pages,
// each in its own chunk). The agent runs as a separate process, as in production.
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <random>

#include "cli/options.h"
#include "../common/bench_util.h"
#include "core/log.h"
#include "daemon.h"
#include "lazymem/agent_client.h"
#include "lazymem/kernel_features.h"
#include "lazymem/restore.h"

namespace po = boost::program_options;
using namespace lazymem::bench;

namespace {

struct Run {
  double touch_all_s = 0;
  double p50_us = 0, p99_us = 0;
  uint64_t hash = 0;
  int ok = 0;
};

// Restores (in-process, or through the agent at `socket`), then either touches every page or
// times `faults` single touches of random chunks.
Run restore_run(const std::string& loc, const std::string& socket, size_t len, bool prefetch, int faults) {
  Run out;
  auto t0 = Clock::now();
  std::unique_ptr<lazymem::LazyRestore> local;
  std::unique_ptr<lazymem::AgentRestore> agent;
  const unsigned char* p = nullptr;
  if (socket.empty()) {
    lazymem::RestoreOptions o;
    o.prefetch = prefetch;
    auto r = lazymem::LazyRestore::start(loc, o);
    if (!r.ok()) return out;
    local = std::move(*r);
    p = static_cast<const unsigned char*>(local->regions()[0].address);
  } else {
    lazymem::AgentRestoreOptions o;
    o.prefetch = prefetch;
    auto r = lazymem::AgentRestore::start(socket, loc, o);
    if (!r.ok()) {
      std::fprintf(stderr, "agent restore: %s\n", r.error().message().c_str());
      return out;
    }
    agent = std::move(*r);
    p = static_cast<const unsigned char*>(agent->regions()[0].address);
  }
  if (faults == 0) {
    (void)touch_all(p, len);
    out.touch_all_s = since(t0);
  } else {
    std::mt19937_64 rng(99);
    size_t chunks = len / lazymem::kDefaultChunkSize;
    std::vector<size_t> order(chunks);
    for (size_t i = 0; i < chunks; ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), rng);
    std::vector<double> lat;
    volatile const unsigned char* vp = p;
    for (int i = 0; i < faults && i < static_cast<int>(chunks); ++i) {
      auto t = Clock::now();
      (void)vp[order[static_cast<size_t>(i)] * lazymem::kDefaultChunkSize + (rng() % 16) * kPage];
      lat.push_back(since(t) * 1e6);
    }
    out.p50_us = percentile(lat, 50);
    out.p99_us = percentile(lat, 99);
    (void)touch_all(p, len);
  }
  out.hash = XXH3_64bits(p, len);
  out.ok = 1;
  if (local) out.ok = local->finish().ok();
  return out;
}

}  // namespace

static int run_bench(int argc, char** argv) {
  po::options_description desc("lazymem-bench-agent [options]");
  desc.add_options()("json", "also print one JSON object on the last line")(
      "mib", po::value<size_t>()->default_value(1024), "snapshot size in MiB")(
      "rounds", po::value<int>()->default_value(3), "runs of each mode (median reported)")(
      "faults", po::value<int>()->default_value(2000), "single faults timed per latency run")(
      "dir", po::value<std::string>()->default_value("/var/tmp"), "where to put the store");
  auto vm = lazymem::cli::parse({argv + 1, argv + argc}, desc);
  const size_t len = vm["mib"].as<size_t>() << 20;
  const int rounds = vm["rounds"].as<int>(), faults = vm["faults"].as<int>();
  const std::string work = make_work_dir(vm["dir"].as<std::string>(), "agent",
                                         {{"mib", static_cast<long>(len >> 20)}, {"rounds", rounds}, {"faults", faults}});
  const std::string loc = work + "/store/heap", socket = work + "/agent.sock";
  MadeSnapshot made = make_heap_snapshot(loc, len);
  if (!made.ok) return 1;

  // The agent: its own process, started before this one has any threads.
  int ready[2];
  if (::pipe(ready) != 0) return 1;
  pid_t agent_pid = ::fork();
  if (agent_pid == 0) {
    lazymem::log::set_level("warn");  // keep the report readable
    lazymem::agent::DaemonOptions o;
    o.socket_path = socket;
    auto d = lazymem::agent::Daemon::start(o, lazymem::probe_kernel());
    char c = d.ok() ? 1 : 0;
    (void)!::write(ready[1], &c, 1);
    if (d.ok()) (void)(*d)->run();
    _exit(0);
  }
  char c = 0;
  if (::read(ready[0], &c, 1) != 1 || c != 1) {
    std::fprintf(stderr, "lazymem-bench-agent: the agent did not start\n");
    return 1;
  }

  std::vector<double> all[2], p50[2], p99[2];
  bool bad = false;
  for (int round = 0; round < rounds; ++round) {
    for (int mode = 0; mode < 2; ++mode) {  // 0: in-process, 1: agent; interleaved
      std::string sock = mode == 1 ? socket : "";
      Run a = in_child<Run>([&] { return restore_run(loc, sock, len, true, 0); });
      Run f = in_child<Run>([&] { return restore_run(loc, sock, len, false, faults); });
      if (!a.ok || !f.ok || a.hash != made.hash || f.hash != made.hash) {
        std::fprintf(stderr, "%s run %d: %s\n", mode ? "agent" : "in-process", round,
                     a.ok && f.ok ? "restored WRONG bytes" : "failed");
        bad = true;
        continue;
      }
      all[mode].push_back(a.touch_all_s);
      p50[mode].push_back(f.p50_us);
      p99[mode].push_back(f.p99_us);
    }
  }
  ::kill(agent_pid, SIGTERM);
  ::waitpid(agent_pid, nullptr, 0);
  std::filesystem::remove_all(work);
  if (bad) return 1;

  double ratio = median(all[1]) / median(all[0]);
  std::printf("lazymem-bench-agent: %zu MiB heap-like snapshot (zstd-1, %.2fx), median of %d runs, every byte checked\n\n",
              len >> 20, made.ratio, rounds);
  std::printf("%-12s %16s %14s %14s\n", "mode", "touch all (pf)", "fault p50", "fault p99");
  const char* names[] = {"in-process", "agent"};
  for (int m = 0; m < 2; ++m) {
    std::printf("%-12s %13.1f ms %11.0f us %11.0f us\n", names[m], median(all[m]) * 1e3, median(p50[m]), median(p99[m]));
  }
  std::printf("\ntarget: agent touch-all within 1.2x of in-process: %.3fx %s\n", ratio, ratio <= 1.2 ? "(met)" : "(MISSED)");
  if (vm.count("json")) {
    nlohmann::json j;
    j["mib"] = len >> 20;
    j["rounds"] = rounds;
    j["compression_ratio"] = made.ratio;
    j["inprocess"] = {{"touch_all_s", median(all[0])}, {"fault_p50_us", median(p50[0])}, {"fault_p99_us", median(p99[0])}};
    j["agent"] = {{"touch_all_s", median(all[1])}, {"fault_p50_us", median(p50[1])}, {"fault_p99_us", median(p99[1])}};
    j["agent_vs_inprocess_touch_all"] = ratio;
    j["agent_vs_inprocess_fault_p50"] = median(p50[1]) / median(p50[0]);
    std::printf("%s\n", j.dump().c_str());
  }
  return 0;
}

int main(int argc, char** argv) {
  return lazymem::cli::run("lazymem-bench-agent", "", [&] { return run_bench(argc, argv); });
}
