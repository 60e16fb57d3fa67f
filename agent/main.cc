// lazymem-agent: the per-host daemon and its CLI. This file only parses options and runs.
#include <cstdio>
#include <iostream>

#include <grp.h>
#include <sys/stat.h>
#include <pthread.h>
#include <unistd.h>

#include <csignal>
#include <functional>
#include <memory>
#include <thread>

#include "check.h"
#include "cli/options.h"
#include "cli_format.h"
#include "commands.h"
#include "daemon.h"
#include "lazymem/agent_client.h"
#include "lazymem/kernel_features.h"
#include "lazymem/snapshot.h"

namespace po = boost::program_options;

namespace {

// Ctrl-C or SIGTERM during a migration or live capture of another process: the first asks the
// command to stop where that is safe (before the pause; calling a migration off while no
// destination has come), never in the middle of the pause; a second ends the agent at once.
// Both are blocked in every thread (call this before any is made) and taken by the command's
// thread when it asks.
sigset_t stop_signal_set() {
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  return stop_signals;
}

std::function<bool()> catch_interrupts() {
  const sigset_t stop_signals = stop_signal_set();
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  return [stop_signals, taken = std::make_shared<bool>(false)] {
    if (*taken) return true;
    const timespec now{0, 0};
    if (sigtimedwait(&stop_signals, nullptr, &now) < 0) return false;
    *taken = true;
    // A second one is not blocked in this thread: its default action ends the agent.
    pthread_sigmask(SIG_UNBLOCK, &stop_signals, nullptr);
    std::fprintf(stderr, "interrupted: stopping where it is safe (again to end it at once)\n");
    return true;
  };
}

constexpr const char* kUsage =
    "usage: lazymem-agent <command> [options]     (--socket PATH, default /run/lazymem/agent.sock)\n"
    "commands:\n"
    "  check    what this kernel offers lazymem (userfaultfd, io_uring, O_DIRECT, MSG_ZEROCOPY)\n"
    "  run      the daemon: serves the faults of processes that restore through it\n"
    "  status   sessions being served\n"
    "  regions  per process and region: size, fetched and zero pages, source\n"
    "  stats    per region and totals: faults, pages, bytes, compression, latency\n"
    "  snapshot capture a raw memory file (--raw FILE) or ranges of a process (--pid PID --region A-B)\n"
    "  migrate  move a running process's memory to another host (pre-copy, then post-copy from here)\n"
    "  restore  serve a Firecracker VM's memory: the agent makes the UFFD handshake socket\n"
    "every command: --help for its options\n";

int run_daemon(const std::vector<std::string>& args) {
  po::options_description desc("lazymem-agent run");
  desc.add_options()(
      "socket", po::value<std::string>()->default_value(lazymem::kDefaultAgentSocket), "control socket (0600)")(
      "group", po::value<std::string>(), "also let this group use the socket (0660)")(
      "firecracker-socket", po::value<std::string>(), "accept Firecracker's UFFD handshake here (needs --snapshot)")(
      "snapshot", po::value<std::string>(), "with --firecracker-socket: the VM memory snapshot to serve")(
      "token-file", po::value<std::string>(),
      "page-server token for --snapshot (lazymem://) only: processes and `lazymem-agent restore` give their own")(
      "fault-deadline-ms", po::value<unsigned>()->default_value(30000), "a faulting thread waits at most this long")(
      "metrics", po::value<std::string>(), "serve Prometheus text metrics on HOST:PORT (e.g. 127.0.0.1:9477): every user's sessions, to anyone "
      "who can connect there");
  auto vm = lazymem::cli::parse(args, desc);
  // Flags that would do nothing are refused, not ignored.
  if (vm.count("firecracker-socket") != vm.count("snapshot")) {
    throw std::invalid_argument("--firecracker-socket and --snapshot go together (the socket serves that VM memory "
                                "snapshot; processes name their own snapshot)");
  }
  if (vm.count("token-file") && !vm.count("snapshot")) {
    throw std::invalid_argument("--token-file is the page-server token for --snapshot; processes and `lazymem-agent "
                                "restore` give their own");
  }
  lazymem::agent::DaemonOptions o;
  o.socket_path = vm["socket"].as<std::string>();
  if (vm.count("group")) {
    const std::string name = vm["group"].as<std::string>();
    group* g = ::getgrnam(name.c_str());
    if (g == nullptr && !name.empty() && name.size() <= 10 && name.find_first_not_of("0123456789") == std::string::npos &&
        std::stoull(name) < 0xffffffffULL) {
      g = ::getgrgid(static_cast<gid_t>(std::stoull(name)));  // a number: a gid, as chown takes it (never wrapped)
    }
    if (g == nullptr) throw std::invalid_argument("no group '" + name + "'");
    o.socket_group = g->gr_gid;
  }
  if (vm.count("firecracker-socket")) o.firecracker_socket = vm["firecracker-socket"].as<std::string>();
  if (vm.count("snapshot")) o.firecracker_snapshot = vm["snapshot"].as<std::string>();
  if (vm.count("token-file")) o.token_file = vm["token-file"].as<std::string>();
  // A faulting thread whose page is late past the deadline gets SIGBUS: 0 (or a few ms) would kill
  // every restore through the agent at its first fault that reads a disk or a network; more than
  // an hour is a hang, not a deadline.
  const unsigned deadline_ms = vm["fault-deadline-ms"].as<unsigned>();
  if (deadline_ms < 100 || deadline_ms > 3600000) {
    throw std::invalid_argument("--fault-deadline-ms wants 100 to 3600000 (a faulting thread waits that long for its "
                                "page, then gets SIGBUS)");
  }
  o.engine.demand_deadline = std::chrono::milliseconds(deadline_ms);
  if (vm.count("metrics")) {
    o.metrics_address = vm["metrics"].as<std::string>();
    auto at = lazymem::SnapshotLocation::Server::parse(o.metrics_address, true);
    if (!at.ok()) throw std::invalid_argument("--metrics: " + at.error().message());
  }
  // SIGINT/SIGTERM are taken by one thread with sigwait (blocked everywhere else, the engine's
  // threads included): a clean stop without a global for a signal handler.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  lazymem::KernelFeatures kf = lazymem::probe_kernel();
  auto d = lazymem::agent::Daemon::start(o, kf);
  if (!d.ok()) throw std::runtime_error(d.error().message());
  lazymem::agent::Daemon& daemon = **d;
  std::thread on_signal([&] {
    int sig = 0;
    sigwait(&stop_signals, &sig);
    daemon.stop();
  });
  // One line once the socket accepts: scripts wait for it instead of polling.
  std::printf("listening on %s\n", o.socket_path.c_str());
  std::fflush(stdout);
  lazymem::Status s = daemon.run();
  if (!s.ok()) ::kill(::getpid(), SIGTERM);  // lets the signal thread finish
  on_signal.join();
  if (!s.ok()) throw std::runtime_error(s.error().message());
  return 0;
}

int run_query(const std::string& cmd, const std::vector<std::string>& args) {
  po::options_description desc("lazymem-agent " + cmd);
  desc.add_options()(
      "socket", po::value<std::string>()->default_value(lazymem::kDefaultAgentSocket), "the daemon's socket")(
      "json", "print JSON")("watch", po::value<double>(), "refresh every N seconds until interrupted");
  auto vm = lazymem::cli::parse(args, desc);
  if (vm.count("watch") && !(vm["watch"].as<double>() >= 0.1 && vm["watch"].as<double>() <= 86400)) {
    throw std::invalid_argument("--watch wants seconds, from 0.1 to 86400");
  }
  bool stats = cmd != "status";
  for (;;) {
    auto js = lazymem::agent_query(vm["socket"].as<std::string>(), stats);
    if (!js.ok()) throw std::runtime_error(js.error().message());
    // A terminal refresh, like top; JSON stays one document per line, for a program to read.
    if (vm.count("watch") && !vm.count("json")) std::printf("\033[H\033[2J");
    if (vm.count("json")) std::printf("%s\n", js->c_str());
    else if (cmd == "status") std::printf("%s", lazymem::agent::format_status(*js).c_str());
    else if (cmd == "regions") std::printf("%s", lazymem::agent::format_regions(*js).c_str());
    else std::printf("%s", lazymem::agent::format_stats(*js).c_str());
    std::fflush(stdout);
    if (!vm.count("watch")) return 0;
    std::this_thread::sleep_for(std::chrono::duration<double>(vm["watch"].as<double>()));
  }
}

// `snapshot --pid`: Ctrl-C or SIGTERM while the process is paused would leave it so; they are
// held until it is resumed, then take their course (nothing is committed yet).
lazymem::Result<lazymem::CaptureReport> capture_process_holding_interrupts(
    pid_t pid, const std::vector<lazymem::agent::ProcessRange>& ranges, const std::string& target,
    const lazymem::CaptureOptions& co, bool freeze) {
  const sigset_t stop_signals = stop_signal_set();
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  return lazymem::agent::capture_process(pid, ranges, target, co, freeze,
                                         [stop_signals] { pthread_sigmask(SIG_UNBLOCK, &stop_signals, nullptr); });
}

// --tracking NAME (lazymem::parse_dirty_method); auto without it.
lazymem::DirtyMethod tracking_flag(const po::variables_map& vm) {
  if (!vm.count("tracking")) return lazymem::DirtyMethod::kAuto;
  const std::string name = vm["tracking"].as<std::string>();
  auto m = lazymem::parse_dirty_method(name);
  if (!m) throw std::invalid_argument("--tracking " + name + ": give auto, kernel-marks or write-faults");
  return *m;
}

int run_snapshot(const std::vector<std::string>& args) {
  po::options_description desc("lazymem-agent snapshot [options] TARGET   (TARGET: STORE/NAME or lazymem://HOST:PORT/NAME)");
  desc.add_options()("raw", po::value<std::string>(), "capture this raw memory file (a VM's guest memory)")(
      "pid", po::value<int>(), "capture ranges of this process; it is stopped (SIGSTOP) while they are copied")(
      "live", "with --pid: capture while it runs, tracking its writes; it is stopped (SIGSTOP) for the last round only")(
      "freeze", "with --pid: pause it by freezing its cgroup (v2, holding it alone) instead of SIGSTOP; its parent sees nothing")(
      "tracking", po::value<std::string>(),
      "with --live: how its writes are tracked: auto (kernel-marks where the kernel has them), kernel-marks (Linux "
      "6.7), write-faults (5.13; each first write per round waits on the agent)")(
      "region", po::value<std::vector<std::string>>(), "with --pid: START-END[=NAME] in hex, as in /proc/PID/maps; repeatable")(
      "chunk-size", po::value<uint32_t>()->default_value(lazymem::kDefaultChunkSize), "bytes per chunk")(
      "zstd-level", po::value<int>()->default_value(1), "zstd compression level")(
      "format", po::value<uint32_t>()->default_value(2),
      "snapshot format: 2, or 1 for hosts running lazymem older than format 2")(
      "replace", "replace an existing snapshot of that name")(
      "token-file", po::value<std::string>(), "page-server token, for a lazymem:// TARGET")(
      "json", "print JSON")("target", po::value<std::string>(), "where the snapshot goes");
  po::positional_options_description pos;
  pos.add("target", 1);
  auto vm = lazymem::cli::parse(args, desc, &pos);
  if (!vm.count("target")) throw std::invalid_argument("give the TARGET (STORE/NAME or lazymem://HOST:PORT/NAME)");
  if (vm.count("raw") == vm.count("pid")) throw std::invalid_argument("give exactly one of --raw FILE or --pid PID");
  // As in migrate: 0 and negative numbers name no process (kill(2) reads them as process groups).
  if (vm.count("pid") && vm["pid"].as<int>() <= 0) throw std::invalid_argument("--pid wants a process id");
  lazymem::CaptureOptions co;
  co.chunk_size = vm["chunk-size"].as<uint32_t>();
  co.zstd_level = vm["zstd-level"].as<int>();
  co.format_version = vm["format"].as<uint32_t>();
  co.replace = vm.count("replace") > 0;
  if (vm.count("token-file")) co.token_file = vm["token-file"].as<std::string>();
  std::string target = vm["target"].as<std::string>();
  // The arguments are checked here, before any work, with the checks the capture makes: a wrong
  // one is a usage error (2). The capture's errors alone cannot tell: its kInvalidArgument also
  // comes from a syscall's EINVAL, or a memory file that is not an image.
  if (auto s = lazymem::check_capture_options(co); !s.ok()) throw std::invalid_argument(s.error().message());
  auto loc = lazymem::SnapshotLocation::parse(target);
  if (!loc.ok()) throw std::invalid_argument(loc.error().message());
  // Flags that would do nothing are refused, not ignored.
  if (vm.count("token-file") && !loc->remote()) {
    throw std::invalid_argument("--token-file is the page-server token for a lazymem:// TARGET; STORE/NAME is written "
                                "directly, with no token");
  }
  if (vm.count("live") && !vm.count("pid")) throw std::invalid_argument("--live goes with --pid (a --raw file is not running)");
  if (vm.count("tracking") && !vm.count("live")) {
    throw std::invalid_argument("--tracking goes with --live (it says how a running process's writes are tracked)");
  }
  const lazymem::DirtyMethod tracking = tracking_flag(vm);
  if (vm.count("freeze") && !vm.count("pid")) {
    throw std::invalid_argument("--freeze goes with --pid (it says how the process is paused; a --raw file is not running)");
  }
  if (vm.count("region") && !vm.count("pid")) {
    throw std::invalid_argument("--region goes with --pid (a --raw file is captured whole)");
  }
  std::vector<lazymem::agent::ProcessRange> ranges;
  if (vm.count("region")) {
    for (const auto& t : vm["region"].as<std::vector<std::string>>()) {
      auto r = lazymem::agent::parse_process_range(t);
      if (!r.ok()) throw std::invalid_argument(r.error().message());
      ranges.push_back(*r);
    }
  }
  if (vm.count("pid")) {
    if (auto s = lazymem::agent::check_process_ranges(ranges); !s.ok()) throw std::invalid_argument(s.error().message());
  }
  // A bar on a terminal, where a person watches; never in a pipe or with --json.
  const bool bar = !vm.count("json") && ::isatty(STDERR_FILENO) != 0;
  if (bar) co.progress = [](uint64_t done, uint64_t total) { lazymem::agent::draw_progress(done >> 20, total >> 20, "MiB"); };
  lazymem::Result<lazymem::CaptureReport> rep = lazymem::Error(lazymem::Errc::kInvalidArgument, "");
  if (vm.count("raw")) {
    rep = lazymem::capture_raw_file(target, vm["raw"].as<std::string>(), co);
  } else {
    rep = vm.count("live") ? lazymem::agent::capture_process_live(vm["pid"].as<int>(), ranges, target, co,
                                                                  vm.count("freeze") > 0, tracking, catch_interrupts())
                           : capture_process_holding_interrupts(vm["pid"].as<int>(), ranges, target, co,
                                                                vm.count("freeze") > 0);
  }
  if (bar) std::fprintf(stderr, "\n");
  if (!rep.ok()) throw std::runtime_error(rep.error().message());
  if (vm.count("json")) std::printf("%s\n", lazymem::agent::format_capture_json(*rep).c_str());
  else std::printf("%s", lazymem::agent::format_capture_table(*rep).c_str());
  return 0;
}

int run_migrate(const std::vector<std::string>& args) {
  po::options_description desc("lazymem-agent migrate --pid PID --region START-END[=NAME]... --base TARGET [options]");
  desc.add_options()("pid", po::value<int>(), "the process whose memory moves (it need not link liblazymem)")(
      "region", po::value<std::vector<std::string>>(), "START-END[=NAME] in hex, as in /proc/PID/maps; repeatable")(
      "base", po::value<std::string>(),
      "where the pre-copy goes, near the destination: STORE/NAME or lazymem://HOST:PORT/NAME")(
      "listen", po::value<std::string>()->default_value("127.0.0.1:0"), "where the destination fetches what is left")(
      "advertise", po::value<std::string>(), "the host name the destination dials (default: --listen's host)")(
      "token-file", po::value<std::string>(),
      "the page-server token: for a lazymem:// base, and asked of the destination (needed off loopback)")(
      "chunk-size", po::value<uint32_t>()->default_value(lazymem::kDefaultChunkSize), "bytes per chunk")(
      "zstd-level", po::value<int>()->default_value(1), "zstd compression level")(
      "max-rounds", po::value<unsigned>()->default_value(10), "pre-copy rounds after the first pass, at most")(
      "converged-mib", po::value<unsigned>()->default_value(8), "pre-copy stops once a round finds this little written")(
      "postcopy-timeout-sec", po::value<unsigned>()->default_value(300),
      "how long to wait for the destination; if none came, the migration is called off and the process continued")(
      "leave-stopped", "after the post-copy, leave the process stopped (or frozen) instead of killing it")(
      "freeze", "pause it by freezing its cgroup (v2, holding it alone) instead of SIGSTOP: its parent sees no stop")(
      "tracking", po::value<std::string>(),
      "how its writes are tracked during the pre-copy: auto (kernel-marks where the kernel has them), kernel-marks "
      "(Linux 6.7), write-faults (5.13; each first write per round waits on the agent)")(
      "replace", "replace an existing snapshot of --base's name")(
      "json", "print the report as JSON");
  auto vm = lazymem::cli::parse(args, desc);
  if (!vm.count("pid") || !vm.count("region") || !vm.count("base")) {
    throw std::invalid_argument("give --pid PID, --region START-END at least once, and --base STORE/NAME or "
                                "lazymem://HOST:PORT/NAME");
  }
  lazymem::agent::MigrateConfig c;
  c.pid = vm["pid"].as<int>();
  if (c.pid <= 0) throw std::invalid_argument("--pid wants a process id");
  for (const auto& t : vm["region"].as<std::vector<std::string>>()) {
    auto r = lazymem::agent::parse_process_range(t);
    if (!r.ok()) throw std::invalid_argument(r.error().message());
    c.ranges.push_back(*r);
  }
  if (auto s = lazymem::agent::check_process_ranges(c.ranges); !s.ok()) throw std::invalid_argument(s.error().message());
  c.base = vm["base"].as<std::string>();
  if (auto loc = lazymem::SnapshotLocation::parse(c.base); !loc.ok()) {
    throw std::invalid_argument("--base: " + loc.error().message());
  }
  c.capture.chunk_size = vm["chunk-size"].as<uint32_t>();
  c.capture.zstd_level = vm["zstd-level"].as<int>();
  if (vm.count("token-file")) c.capture.token_file = vm["token-file"].as<std::string>();
  c.capture.replace = vm.count("replace") > 0;
  if (auto s = lazymem::check_capture_options(c.capture); !s.ok()) throw std::invalid_argument(s.error().message());
  c.migration.listen = vm["listen"].as<std::string>();
  if (auto at = lazymem::SnapshotLocation::Server::parse(c.migration.listen, true); !at.ok()) {
    throw std::invalid_argument("--listen: " + at.error().message());
  }
  if (vm.count("advertise")) c.migration.advertise = vm["advertise"].as<std::string>();
  c.migration.precopy.max_rounds = vm["max-rounds"].as<unsigned>();
  c.migration.precopy.converged_bytes = uint64_t{vm["converged-mib"].as<unsigned>()} << 20;
  const unsigned timeout = vm["postcopy-timeout-sec"].as<unsigned>();
  if (timeout == 0 || timeout > 86400) throw std::invalid_argument("--postcopy-timeout-sec wants 1 to 86400");
  c.postcopy_timeout = std::chrono::seconds(timeout);
  c.leave_stopped = vm.count("leave-stopped") > 0;
  c.freeze = vm.count("freeze") > 0;
  c.tracking = tracking_flag(vm);
  c.json = vm.count("json") > 0;
  c.interrupted = catch_interrupts();
  lazymem::Status s = lazymem::agent::migrate_process(c);
  if (!s.ok()) throw std::runtime_error(s.error().message());
  return 0;
}

int run_restore(const std::vector<std::string>& args) {
  po::options_description desc("lazymem-agent restore");
  desc.add_options()(
      "socket", po::value<std::string>()->default_value(lazymem::kDefaultAgentSocket), "the daemon's socket")(
      "firecracker-socket", po::value<std::string>(), "the UFFD handshake socket to make (Firecracker's mem_backend backend_path)")(
      "snapshot", po::value<std::string>(), "the VM memory snapshot (STORE/NAME or lazymem://HOST:PORT/NAME)")(
      "token-file", po::value<std::string>(), "page-server token, read by the agent")(
      "no-prefetch", "fetch only the pages the VM touches")(
      "no-wait", "return once the socket listens, without following the restore");
  auto vm = lazymem::cli::parse(args, desc);
  if (!vm.count("firecracker-socket") || !vm.count("snapshot")) {
    throw std::invalid_argument("give --firecracker-socket PATH and --snapshot URI (a process restores through the "
                                "agent itself, with AgentRestore in lazymem/agent_client.h)");
  }
  lazymem::agent::FirecrackerRestoreConfig c;
  c.agent_socket = vm["socket"].as<std::string>();
  c.handshake_socket = vm["firecracker-socket"].as<std::string>();
  c.snapshot = vm["snapshot"].as<std::string>();
  // Flags that would do nothing are refused, not ignored, as snapshot does: the agent reads a
  // local store directly, with no token.
  if (vm.count("token-file")) {
    auto loc = lazymem::SnapshotLocation::parse(c.snapshot);
    if (!loc.ok()) throw std::invalid_argument(loc.error().message());
    if (!loc->remote()) {
      throw std::invalid_argument("--token-file is the page-server token for a lazymem:// --snapshot; STORE/NAME is read "
                                  "directly, with no token");
    }
    c.token_file = vm["token-file"].as<std::string>();
  }
  c.prefetch = !vm.count("no-prefetch");
  c.wait = !vm.count("no-wait");
  c.progress = ::isatty(STDERR_FILENO) != 0;
  lazymem::Status s = lazymem::agent::restore_firecracker(c);
  if (!s.ok()) throw std::runtime_error(s.error().message());
  return 0;
}

int run_check(const std::vector<std::string>& args) {
  po::options_description desc("lazymem-agent check");
  desc.add_options()("json", "print JSON instead of a table")(
      "store", po::value<std::string>()->default_value("."), "directory whose filesystem must take O_DIRECT");
  auto vm = lazymem::cli::parse(args, desc);
  const std::string store = vm["store"].as<std::string>();
  struct stat st {};
  if (::stat(store.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    throw std::invalid_argument("--store " + store + " is not a directory (O_DIRECT is probed on its filesystem)");
  }
  lazymem::KernelFeatures kf = lazymem::probe_kernel(lazymem::ProbeOptions{store});
  if (vm.count("json")) {
    std::printf("%s\n", lazymem::agent::format_check_json(kf).c_str());
  } else {
    std::printf("%s", lazymem::agent::format_check_table(kf).c_str());
  }
  return lazymem::agent::check_exit_code(kf);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << kUsage;
    return 2;
  }
  std::string cmd = argv[1];
  std::vector<std::string> args(argv + 2, argv + argc);
  if (cmd == "-h" || cmd == "--help" || cmd == "help") {
    std::cout << kUsage;
    return 0;
  }
  if (cmd == "check") return lazymem::cli::run("lazymem-agent", cmd, [&] { return run_check(args); });
  if (cmd == "run") return lazymem::cli::run("lazymem-agent", cmd, [&] { return run_daemon(args); });
  if (cmd == "status" || cmd == "regions" || cmd == "stats") {
    return lazymem::cli::run("lazymem-agent", cmd, [&] { return run_query(cmd, args); });
  }
  if (cmd == "snapshot") return lazymem::cli::run("lazymem-agent", cmd, [&] { return run_snapshot(args); });
  if (cmd == "migrate") return lazymem::cli::run("lazymem-agent", cmd, [&] { return run_migrate(args); });
  if (cmd == "restore") return lazymem::cli::run("lazymem-agent", cmd, [&] { return run_restore(args); });
  std::cerr << "lazymem-agent: unknown command '" << cmd << "'\n" << kUsage;
  return 2;
}
