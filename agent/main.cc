// lazymem-agent: the per-host daemon and its CLI. This file only parses options and runs.
#include <boost/program_options.hpp>
#include <cstdio>
#include <iostream>

#include <grp.h>

#include <csignal>
#include <thread>

#include "check.h"
#include "cli_format.h"
#include "daemon.h"
#include "lazymem/agent_client.h"
#include "lazymem/kernel_features.h"

namespace po = boost::program_options;

namespace {

constexpr const char* kUsage =
    "usage: lazymem-agent <command> [options]     (--socket PATH, default /run/lazymem/agent.sock)\n"
    "commands:\n"
    "  check    what this kernel offers lazymem (userfaultfd, io_uring, O_DIRECT, MSG_ZEROCOPY)\n"
    "  run      the daemon: serves the faults of processes that restore through it\n"
    "  status   sessions being served\n"
    "  regions  per process and region: size, fetched and zero pages, source\n"
    "  stats    per region and totals: faults, pages, bytes, compression, latency\n";

lazymem::agent::Daemon* g_daemon = nullptr;  // for the signal handler only
void on_signal(int) {
  if (g_daemon) g_daemon->stop();
}

int run_daemon(const std::vector<std::string>& args) {
  po::options_description desc("lazymem-agent run");
  desc.add_options()("help,h", "show this help")(
      "socket", po::value<std::string>()->default_value(lazymem::kDefaultAgentSocket), "control socket (0600)")(
      "group", po::value<std::string>(), "also let this group use the socket (0660)")(
      "firecracker-socket", po::value<std::string>(), "accept Firecracker's UFFD handshake here")(
      "snapshot", po::value<std::string>(), "with --firecracker-socket: the VM memory snapshot to serve")(
      "token-file", po::value<std::string>(), "page-server token for lazymem:// snapshots")(
      "fault-deadline-ms", po::value<unsigned>()->default_value(30000), "a faulting thread waits at most this long");
  po::variables_map vm;
  po::store(po::command_line_parser(args).options(desc).run(), vm);
  po::notify(vm);
  if (vm.count("help")) {
    std::cout << desc;
    return 0;
  }
  lazymem::agent::DaemonOptions o;
  o.socket_path = vm["socket"].as<std::string>();
  if (vm.count("group")) {
    group* g = ::getgrnam(vm["group"].as<std::string>().c_str());
    if (g == nullptr) throw std::invalid_argument("no group '" + vm["group"].as<std::string>() + "'");
    o.socket_group = g->gr_gid;
  }
  if (vm.count("firecracker-socket")) o.firecracker_socket = vm["firecracker-socket"].as<std::string>();
  if (vm.count("snapshot")) o.firecracker_snapshot = vm["snapshot"].as<std::string>();
  if (vm.count("token-file")) o.token_file = vm["token-file"].as<std::string>();
  o.engine.demand_deadline = std::chrono::milliseconds(vm["fault-deadline-ms"].as<unsigned>());
  lazymem::KernelFeatures kf = lazymem::probe_kernel();
  auto d = lazymem::agent::Daemon::start(o, kf);
  if (!d.ok()) throw std::runtime_error(d.error().message());
  g_daemon = d->get();
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  // One line once the socket accepts: scripts wait for it instead of polling.
  std::printf("listening on %s\n", o.socket_path.c_str());
  std::fflush(stdout);
  lazymem::Status s = (*d)->run();
  if (!s.ok()) throw std::runtime_error(s.error().message());
  return 0;
}

int run_query(const std::string& cmd, const std::vector<std::string>& args) {
  po::options_description desc("lazymem-agent " + cmd);
  desc.add_options()("help,h", "show this help")(
      "socket", po::value<std::string>()->default_value(lazymem::kDefaultAgentSocket), "the daemon's socket")(
      "json", "print JSON")("watch", po::value<double>(), "refresh every N seconds until interrupted");
  po::variables_map vm;
  po::store(po::command_line_parser(args).options(desc).run(), vm);
  po::notify(vm);
  if (vm.count("help")) {
    std::cout << desc;
    return 0;
  }
  bool stats = cmd != "status";
  for (;;) {
    auto js = lazymem::agent_query(vm["socket"].as<std::string>(), stats);
    if (!js.ok()) throw std::runtime_error(js.error().message());
    if (vm.count("watch")) std::printf("\033[H\033[2J");  // a terminal refresh, like top
    if (vm.count("json")) std::printf("%s\n", js->c_str());
    else if (cmd == "status") std::printf("%s", lazymem::agent::format_status(*js).c_str());
    else if (cmd == "regions") std::printf("%s", lazymem::agent::format_regions(*js).c_str());
    else std::printf("%s", lazymem::agent::format_stats(*js).c_str());
    std::fflush(stdout);
    if (!vm.count("watch")) return 0;
    std::this_thread::sleep_for(std::chrono::duration<double>(vm["watch"].as<double>()));
  }
}

int run_check(const std::vector<std::string>& args) {
  po::options_description desc("lazymem-agent check");
  desc.add_options()("help,h", "show this help")("json", "print JSON instead of a table")(
      "store", po::value<std::string>()->default_value("."), "directory whose filesystem must take O_DIRECT");
  po::variables_map vm;
  po::store(po::command_line_parser(args).options(desc).run(), vm);
  po::notify(vm);
  if (vm.count("help")) {
    std::cout << desc;
    return 0;
  }
  lazymem::KernelFeatures kf = lazymem::probe_kernel(lazymem::ProbeOptions{vm["store"].as<std::string>()});
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
  try {
    if (cmd == "check") return run_check(args);
    if (cmd == "run") return run_daemon(args);
    if (cmd == "status" || cmd == "regions" || cmd == "stats") return run_query(cmd, args);
    if (cmd == "-h" || cmd == "--help" || cmd == "help") {
      std::cout << kUsage;
      return 0;
    }
    std::cerr << "lazymem-agent: unknown command '" << cmd << "'\n" << kUsage;
    return 2;
  } catch (const std::invalid_argument& e) {
    std::cerr << "lazymem-agent " << cmd << ": " << e.what() << "\n";
    return 2;
  } catch (const po::error& e) {
    std::cerr << "lazymem-agent " << cmd << ": " << e.what() << " (see lazymem-agent " << cmd << " --help)\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "lazymem-agent " << cmd << ": " << e.what() << "\n";
    return 1;
  }
}
