// lazymem-agent: the per-host daemon and its CLI. This file only parses options and runs.
#include <boost/program_options.hpp>
#include <cstdio>
#include <iostream>

#include "check.h"
#include "lazymem/kernel_features.h"

namespace po = boost::program_options;

namespace {

constexpr const char* kUsage =
    "usage: lazymem-agent <command> [options]\n"
    "commands:\n"
    "  check    what this kernel offers lazymem (userfaultfd, io_uring, O_DIRECT, MSG_ZEROCOPY)\n";

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
    if (cmd == "-h" || cmd == "--help" || cmd == "help") {
      std::cout << kUsage;
      return 0;
    }
    std::cerr << "lazymem-agent: unknown command '" << cmd << "'\n" << kUsage;
    return 2;
  } catch (const po::error& e) {
    std::cerr << "lazymem-agent " << cmd << ": " << e.what() << " (see lazymem-agent " << cmd << " --help)\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "lazymem-agent " << cmd << ": " << e.what() << "\n";
    return 1;
  }
}
