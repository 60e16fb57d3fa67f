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

#include <fcntl.h>
#include <unistd.h>

#include "sys/unique_fd.h"

namespace lazymem::sys {
namespace {

struct ThreadState {
  std::string tid;
  std::string name;
  char state = '?';
};

// The first thread of `pid` that is not stopped by job control (T) nor exiting; none if there is
// none. Stopped by a tracer (t) counts as running: the tracer may resume it. Fails closed: what
// cannot be read is an error, unless the thread (or the process) is gone.
Result<std::optional<ThreadState>> running_thread(pid_t pid) {
  const std::string dir = fmt::format("/proc/{}/task", pid);
  std::error_code ec;
  std::filesystem::directory_iterator it(dir, ec);
  if (ec) {
    if (ec.value() == ENOENT || ec.value() == ESRCH) return std::optional<ThreadState>();  // exited
    return sys_error("reading " + dir, ec.value());
  }
  for (const auto& e : it) {
    const std::string path = (e.path() / "stat").string();
    std::string line;
    {
      UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
      if (!fd.valid()) {
        if (errno == ENOENT || errno == ESRCH) continue;  // that thread exited
        return sys_error("reading " + path, errno);
      }
      char buf[1024];
      const ssize_t n = ::read(fd.get(), buf, sizeof buf);
      if (n < 0) {
        if (errno == ESRCH) continue;
        return sys_error("reading " + path, errno);
      }
      line.assign(buf, static_cast<size_t>(n));
    }
    const size_t open = line.find('('), close = line.rfind(')');
    if (open == std::string::npos || close == std::string::npos || close + 2 >= line.size()) {
      return Error(Errc::kCorrupt, fmt::format("{}: unexpected contents", path));
    }
    const char state = line[close + 2];
    if (state == 'T' || state == 'Z' || state == 'X') continue;
    return std::optional<ThreadState>(ThreadState{e.path().filename().string(), line.substr(open + 1, close - open - 1), state});
  }
  return std::optional<ThreadState>();
}

}  // namespace

Result<bool> stop_process(pid_t pid, std::chrono::milliseconds timeout) {
  if (::kill(pid, 0) != 0 && errno == ESRCH) return Error(Errc::kNotFound, fmt::format("process {} exited", pid), ESRCH);
  LAZYMEM_ASSIGN_OR_RETURN(std::optional<ThreadState> first, running_thread(pid));
  if (!first) return false;  // stopped already, by its owner
  if (::kill(pid, SIGSTOP) != 0) {
    if (errno == ESRCH) return Error(Errc::kNotFound, fmt::format("process {} exited", pid), errno);
    return sys_error(fmt::format("stopping process {} (SIGSTOP)", pid), errno);
  }
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  auto pause = std::chrono::microseconds(20);
  for (;;) {
    auto running = running_thread(pid);
    if (!running.ok()) {
      continue_process(pid);
      return std::move(running).error().wrap(fmt::format("stopping process {} (it was continued)", pid));
    }
    if (!*running) {
      if (::kill(pid, 0) != 0 && errno == ESRCH) return Error(Errc::kNotFound, fmt::format("process {} exited", pid), ESRCH);
      return true;
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      continue_process(pid);
      return Error(Errc::kTimeout,
                   fmt::format("process {}: thread {} ({}) did not stop within {} ms of SIGSTOP (state {}{}); the "
                               "process was continued",
                               pid, (*running)->tid, (*running)->name, timeout.count(), (*running)->state,
                               (*running)->state == 'D'   ? ": in uninterruptible sleep, e.g. on a disk or NFS"
                               : (*running)->state == 't' ? ": stopped by a tracer (a debugger), which may resume it"
                                                          : ""));
    }
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::microseconds(100));  // it adds to the workload's pause
  }
}

Status check_stopped(pid_t pid) {
  LAZYMEM_ASSIGN_OR_RETURN(std::optional<ThreadState> running, running_thread(pid));
  if (!running) return ok_status();
  return Error(Errc::kCancelled, fmt::format("process {} was continued during the pause (thread {} ({}) is in state {}): "
                                             "something sent it SIGCONT",
                                             pid, running->tid, running->name, running->state));
}

void continue_process(pid_t pid) { (void)::kill(pid, SIGCONT); }

}  // namespace lazymem::sys
