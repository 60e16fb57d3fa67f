// stop_process: SIGSTOP and /proc/PID/task/*/stat.
#include "sys/process_stop.h"

#include <fmt/format.h>
#include <signal.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <thread>

namespace lazymem::sys {
namespace {

struct ThreadState {
  std::string tid;
  std::string name;
  char state = '?';
};

// The first thread of `pid` that is neither stopped (T, or t: stopped by a tracer) nor exiting.
// Reading /proc/PID/stat of a gone process fails: nothing is left running, which is what we ask.
std::optional<ThreadState> running_thread(pid_t pid) {
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(fmt::format("/proc/{}/task", pid), ec)) {
    std::ifstream stat(e.path() / "stat");
    std::string line;
    if (!std::getline(stat, line)) continue;
    const size_t open = line.find('('), close = line.rfind(')');
    if (open == std::string::npos || close == std::string::npos || close + 2 >= line.size()) continue;
    const char state = line[close + 2];
    if (state == 'T' || state == 't' || state == 'Z' || state == 'X') continue;
    return ThreadState{e.path().filename().string(), line.substr(open + 1, close - open - 1), state};
  }
  return std::nullopt;
}

}  // namespace

Status stop_process(pid_t pid, std::chrono::milliseconds timeout) {
  if (::kill(pid, SIGSTOP) != 0) {
    if (errno == ESRCH) return Error(Errc::kNotFound, fmt::format("process {} exited", pid), errno);
    return sys_error(fmt::format("stopping process {} (SIGSTOP)", pid), errno);
  }
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  auto pause = std::chrono::microseconds(20);
  for (;;) {
    std::optional<ThreadState> running = running_thread(pid);
    if (!running) return ok_status();
    if (std::chrono::steady_clock::now() >= deadline) {
      continue_process(pid);
      return Error(Errc::kTimeout,
                   fmt::format("process {}: thread {} ({}) did not stop within {} ms of SIGSTOP (state {}{}); the "
                               "process was continued",
                               pid, running->tid, running->name, timeout.count(), running->state,
                               running->state == 'D' ? ": in uninterruptible sleep, e.g. on a disk or NFS" : ""));
    }
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::microseconds(1000));
  }
}

void continue_process(pid_t pid) { (void)::kill(pid, SIGCONT); }

}  // namespace lazymem::sys
