// The cgroup v2 freezer: cgroup.freeze to ask, cgroup.events ("frozen 1") to know it is done,
// polled for the change the kernel signals on it (POLLPRI), not read in a loop.
#include "sys/cgroup_freeze.h"

#include <fmt/format.h>
#include <poll.h>
#include <signal.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

#include "sys/unique_fd.h"

namespace lazymem::sys {
namespace {

constexpr const char* kUseStop = "pause it with SIGSTOP instead (without --freeze)";

Result<std::string> read_small_file(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return sys_error("reading " + path, errno);
  std::string out;
  char buf[4096];
  for (;;) {
    const ssize_t n = ::read(fd.get(), buf, sizeof buf);
    if (n < 0) return sys_error("reading " + path, errno);
    if (n == 0) return out;
    out.append(buf, static_cast<size_t>(n));
  }
}

// /proc/self/mountinfo escapes blanks and backslashes in paths as octal (\040).
std::string unescape_mount_path(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 3 < s.size() && std::isdigit(static_cast<unsigned char>(s[i + 1])) &&
        std::isdigit(static_cast<unsigned char>(s[i + 2])) && std::isdigit(static_cast<unsigned char>(s[i + 3]))) {
      out.push_back(static_cast<char>((s[i + 1] - '0') * 64 + (s[i + 2] - '0') * 8 + (s[i + 3] - '0')));
      i += 3;
    } else {
      out.push_back(s[i]);
    }
  }
  return out;
}

struct Cgroup2Mount {
  std::string root;  // of the hierarchy, mounted there
  std::string mount_point;
};

// The cgroup2 mounts here, in mount order; an error if there is none.
Result<std::vector<Cgroup2Mount>> cgroup2_mounts() {
  LAZYMEM_ASSIGN_OR_RETURN(std::string info, read_small_file("/proc/self/mountinfo"));
  std::vector<Cgroup2Mount> mounts;
  std::istringstream lines(info);
  std::string line;
  while (std::getline(lines, line)) {
    const size_t dash = line.find(" - ");
    if (dash == std::string::npos) continue;
    std::istringstream after(line.substr(dash + 3));
    std::string fstype;
    after >> fstype;
    if (fstype != "cgroup2") continue;
    std::istringstream before(line.substr(0, dash));
    std::string id, parent, dev, root, mount_point;
    if (before >> id >> parent >> dev >> root >> mount_point) {
      mounts.push_back({unescape_mount_path(root), unescape_mount_path(mount_point)});
    }
  }
  if (mounts.empty()) {
    return Error(Errc::kUnsupported,
                 fmt::format("no cgroup2 filesystem is mounted here: the freezer needs cgroup v2 (mount -t cgroup2 "
                             "none /sys/fs/cgroup), or {}",
                             kUseStop));
  }
  return mounts;
}

// The pids listed in `dir`/cgroup.procs.
Result<std::vector<pid_t>> procs_of(const std::string& dir) {
  LAZYMEM_ASSIGN_OR_RETURN(std::string text, read_small_file(dir + "/cgroup.procs"));
  std::vector<pid_t> pids;
  std::istringstream in(text);
  long p = 0;
  while (in >> p) pids.push_back(static_cast<pid_t>(p));
  return pids;
}

std::string some_pids(const std::vector<pid_t>& pids) {
  std::string out;
  for (size_t i = 0; i < pids.size() && i < 5; ++i) out += (i ? ", " : "") + std::to_string(pids[i]);
  if (pids.size() > 5) out += fmt::format(" and {} more", pids.size() - 5);
  return out;
}

Result<bool> frozen_now(int events_fd, const std::string& dir) {
  char buf[256];
  const ssize_t n = ::pread(events_fd, buf, sizeof buf - 1, 0);
  if (n < 0) return sys_error(fmt::format("reading {}/cgroup.events", dir), errno);
  buf[n] = '\0';
  return std::string_view(buf, static_cast<size_t>(n)).find("frozen 1") != std::string_view::npos;
}

Status write_freeze(const std::string& dir, const char* value) {
  const std::string path = dir + "/cgroup.freeze";
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CLOEXEC));
  if (!fd.valid() || ::write(fd.get(), value, 1) != 1) return sys_error("writing " + path, errno);
  return ok_status();
}

bool exited(pid_t pid) { return ::kill(pid, 0) != 0 && errno == ESRCH; }

}  // namespace

Result<std::string> cgroup2_mount_point() {
  LAZYMEM_ASSIGN_OR_RETURN(std::vector<Cgroup2Mount> mounts, cgroup2_mounts());
  for (const auto& m : mounts) {
    if (m.root == "/") return m.mount_point;  // the whole hierarchy
  }
  return mounts.front().mount_point;
}

Result<std::string> cgroup_of(pid_t pid) {
  auto text = read_small_file(fmt::format("/proc/{}/cgroup", pid));
  if (!text.ok()) {
    if (text.error().sys_errno() == ENOENT) return Error(Errc::kNotFound, fmt::format("no process {}", pid), ENOENT);
    return std::move(text).error();
  }
  std::istringstream lines(*text);
  std::string line, path;
  while (std::getline(lines, line)) {
    if (line.rfind("0::", 0) == 0) path = line.substr(3);
  }
  if (path.empty()) {
    return Error(Errc::kUnsupported,
                 fmt::format("process {} is in no cgroup v2 hierarchy (only v1): the freezer needs cgroup v2, or {}",
                             pid, kUseStop));
  }
  // Shown relative to this process's cgroup namespace: "/.." leads out of it.
  if (path.rfind("/..", 0) == 0) {
    return Error(Errc::kUnsupported,
                 fmt::format("process {}'s cgroup ({}) is outside this cgroup namespace: run the agent where it can see "
                             "it (the host's namespace), or {}",
                             pid, path, kUseStop));
  }
  if (path == "/") {
    return Error(Errc::kInvalidArgument,
                 fmt::format("process {} is in the root cgroup, which cannot be frozen: move it into a cgroup of its "
                             "own (mkdir CGROUP2/NAME; echo {} > CGROUP2/NAME/cgroup.procs), or {}",
                             pid, pid, kUseStop));
  }
  LAZYMEM_ASSIGN_OR_RETURN(std::vector<Cgroup2Mount> mounts, cgroup2_mounts());
  for (const auto& m : mounts) {
    if (m.root == "/") return m.mount_point + path;
    if (path == m.root) return m.mount_point;
    if (path.rfind(m.root + "/", 0) == 0) return m.mount_point + path.substr(m.root.size());
  }
  return Error(Errc::kUnsupported, fmt::format("process {}'s cgroup {} is under no cgroup2 mount here (mounted: {} of "
                                               "the hierarchy at {})",
                                               pid, path, mounts.front().root, mounts.front().mount_point));
}

Status check_freezable_alone(const std::string& dir, pid_t pid) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::exists(dir + "/cgroup.freeze", ec)) {
    if (fs::exists(dir + "/freezer.state", ec)) {
      return Error(Errc::kUnsupported, fmt::format("{} is a cgroup v1 freezer directory: only the v2 freezer is "
                                                   "supported; {}",
                                                   dir, kUseStop));
    }
    return Error(Errc::kInvalidArgument,
                 fmt::format("{} is not a cgroup v2 directory that can be frozen (no cgroup.freeze)", dir));
  }
  LAZYMEM_ASSIGN_OR_RETURN(std::vector<pid_t> pids, procs_of(dir));
  if (std::find(pids.begin(), pids.end(), pid) == pids.end()) {
    return Error(Errc::kInvalidArgument, fmt::format("process {} is not in cgroup {}", pid, dir));
  }
  std::erase(pids, pid);
  if (!pids.empty()) {
    return Error(Errc::kInvalidArgument,
                 fmt::format("cgroup {} holds processes other than {} ({}), which would be frozen with it: move {} "
                             "into a cgroup of its own, or {}",
                             dir, pid, some_pids(pids), pid, kUseStop));
  }
  for (fs::recursive_directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    if (!it->is_directory(ec)) continue;
    LAZYMEM_ASSIGN_OR_RETURN(std::vector<pid_t> below, procs_of(it->path().string()));
    if (!below.empty()) {
      return Error(Errc::kInvalidArgument,
                   fmt::format("cgroup {}, below process {}'s, holds processes ({}), which would be frozen with it; {}",
                               it->path().string(), pid, some_pids(below), kUseStop));
    }
  }
  if (ec) return sys_error("listing the cgroups below " + dir, ec.value());
  return ok_status();
}

Result<bool> cgroup_frozen(const std::string& dir) {
  const std::string path = dir + "/cgroup.events";
  UniqueFd events(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!events.valid()) return sys_error("reading " + path, errno);
  return frozen_now(events.get(), dir);
}

Result<bool> freeze_cgroup(const std::string& dir, pid_t pid, std::chrono::milliseconds timeout) {
  if (exited(pid)) return Error(Errc::kNotFound, fmt::format("process {} exited", pid), ESRCH);
  const std::string events_path = dir + "/cgroup.events";
  UniqueFd events(::open(events_path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!events.valid()) return sys_error("reading " + events_path, errno);
  LAZYMEM_ASSIGN_OR_RETURN(bool frozen, frozen_now(events.get(), dir));
  if (frozen) return false;  // by its owner
  LAZYMEM_ASSIGN_OR_RETURN(std::string asked, read_small_file(dir + "/cgroup.freeze"));
  const bool ours = asked.rfind('1', 0) != 0;  // else its owner is freezing it: wait, leave it frozen
  if (ours) LAZYMEM_TRY(write_freeze(dir, "1"));
  // Every way out below that fails thaws what was frozen here.
  auto fail = [&](Error e) -> Error {
    if (ours) thaw_cgroup(dir);
    return e.wrap(fmt::format("freezing process {}{}", pid, ours ? " (it was thawed)" : ""));
  };
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    auto now_frozen = frozen_now(events.get(), dir);
    if (!now_frozen.ok()) return fail(std::move(now_frozen).error());
    if (*now_frozen) break;
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      return fail(Error(Errc::kTimeout, fmt::format("not frozen within {} ms (a thread in uninterruptible sleep, e.g. "
                                                    "on a disk or NFS, freezes only when it leaves it)",
                                                    timeout.count())));
    }
    // The kernel marks cgroup.events changed (POLLPRI) when the cgroup's frozen state flips.
    pollfd p{events.get(), POLLPRI, 0};
    if (::poll(&p, 1, static_cast<int>(left.count())) < 0 && errno != EINTR) {
      return fail(sys_error("waiting on " + events_path, errno));
    }
  }
  // An emptied cgroup counts as frozen.
  if (exited(pid)) return fail(Error(Errc::kNotFound, fmt::format("process {} exited", pid), ESRCH));
  // Checked again now that nothing in it runs: a process forked or moved in since the first
  // check would have been frozen with it (and thawed with it at the end, or caught in it).
  if (ours) {
    if (Status alone = check_freezable_alone(dir, pid); !alone.ok()) return fail(std::move(alone).error());
  }
  return ours;
}

Status check_frozen(const std::string& dir) {
  LAZYMEM_ASSIGN_OR_RETURN(bool frozen, cgroup_frozen(dir));
  if (frozen) return ok_status();
  return Error(Errc::kCancelled, fmt::format("cgroup {} was thawed during the pause (by its owner?)", dir));
}

void thaw_cgroup(const std::string& dir) { (void)write_freeze(dir, "0"); }

}  // namespace lazymem::sys
