// Snapshot opens for the agent, each on a thread of its own (see source_opener.h).
#include "source_opener.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <system_error>
#include <thread>

#include "lazymem/snapshot.h"
#include "net/auth.h"
#include "snapshot/manifest.h"
#include "snapshot/snapshot_reader.h"
#include "source.h"
#include "sys/unique_fd.h"

namespace lazymem::agent {

namespace {

// One file a user opens for the agent.
struct UserOpen {
  std::string path;  // relative to `at`'s directory when `at` is set
  std::string what;  // names it in messages
  int flags = 0;
  int retry_flags = -1;  // tried instead where `flags` are refused with EINVAL (O_DIRECT); -1: none
  int at = -1;           // the index of the directory it is opened in (openat), -1: the path alone
};

// Opens `files` with `who`'s uid, gid and groups, in a child, and takes the descriptors it opened
// (SCM_RIGHTS over a socketpair), one per file, in order.
Result<std::vector<sys::UniqueFd>> open_files_as(const Requester& who, const std::vector<UserOpen>& files) {
  // Everything the child uses is made here: between fork and _exit it makes raw syscalls only
  // (another thread may have held the allocator's or a logger's lock at the fork).
  std::vector<const char*> paths;
  std::vector<int> flags, retry, at;
  for (const auto& f : files) {
    paths.push_back(f.path.c_str());
    flags.push_back(f.flags);
    retry.push_back(f.retry_flags);
    at.push_back(f.at);
  }
  const size_t n = files.size();
  const size_t space = CMSG_SPACE(n * sizeof(int));
  std::vector<cmsghdr> control((space + sizeof(cmsghdr) - 1) / sizeof(cmsghdr));
  char byte = 0;
  iovec iov{&byte, 1};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.data();
  msg.msg_controllen = space;
  cmsghdr* cm = CMSG_FIRSTHDR(&msg);
  cm->cmsg_level = SOL_SOCKET;
  cm->cmsg_type = SCM_RIGHTS;
  cm->cmsg_len = CMSG_LEN(n * sizeof(int));
  int* slots = reinterpret_cast<int*>(CMSG_DATA(cm));
  const std::vector<gid_t>& groups = who.groups;
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) {
    return sys_error(fmt::format("socketpair to open files as uid {}", who.uid), errno);
  }
  sys::UniqueFd mine(sv[0]), theirs(sv[1]);
  pid_t kid = ::fork();
  if (kid < 0) return sys_error("fork to check the client's access", errno);
  if (kid == 0) {
    if (::syscall(SYS_setgroups, groups.size(), groups.data()) != 0 || ::syscall(SYS_setgid, who.gid) != 0 ||
        ::syscall(SYS_setuid, who.uid) != 0) {
      _exit(255);
    }
    for (size_t i = 0; i < n; ++i) {
      const int dir = at[i] < 0 ? AT_FDCWD : slots[at[i]];
      int fd = static_cast<int>(::syscall(SYS_openat, dir, paths[i], flags[i]));
      if (fd < 0 && errno == EINVAL && retry[i] != -1) fd = static_cast<int>(::syscall(SYS_openat, dir, paths[i], retry[i]));
      if (fd < 0) _exit(static_cast<int>(i));
      slots[i] = fd;
    }
    if (::syscall(SYS_sendmsg, sv[1], &msg, MSG_NOSIGNAL) != 1) _exit(253);
    _exit(254);
  }
  theirs.reset();
  int st = 0;
  while (::waitpid(kid, &st, 0) < 0 && errno == EINTR) {
  }
  const int code = WIFEXITED(st) ? WEXITSTATUS(st) : 255;
  if (code < static_cast<int>(n)) {
    return Error(Errc::kPermission, fmt::format("{} cannot be read by uid {} (the requesting user): the agent reads "
                                                "nothing on a user's behalf that the user could not", files[code].what, who.uid));
  }
  if (code != 254) return Error(Errc::kPermission, fmt::format("could not check what uid {} may read", who.uid));
  // The child has gone: what it sent waits in the socket.
  msghdr got{};
  got.msg_iov = &iov;
  got.msg_iovlen = 1;
  got.msg_control = control.data();
  got.msg_controllen = space;
  const ssize_t r = ::recvmsg(mine.get(), &got, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  if (r < 0) return sys_error(fmt::format("receive the files uid {} opened", who.uid), errno);
  std::vector<sys::UniqueFd> fds;
  for (cmsghdr* c = CMSG_FIRSTHDR(&got); c != nullptr; c = CMSG_NXTHDR(&got, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < k; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
      fds.emplace_back(fd);
    }
  }
  if ((got.msg_flags & MSG_CTRUNC) != 0 || fds.size() != n) {
    return Error(Errc::kAgain, fmt::format("the files uid {} opened did not all come through (the agent out of "
                                           "descriptors?); try again", who.uid));
  }
  return fds;
}

}  // namespace

Result<UserFiles> open_as_user(const Requester& who, const std::string& location, const std::string& base,
                               const std::string& token_file) {
  std::vector<UserOpen> files;
  if (!token_file.empty()) files.push_back(UserOpen{token_file, token_file, net::kTokenFileFlags});
  // A local snapshot: its directory, then its manifest and data in it, so that both are of the
  // same snapshot whatever happens to the path meanwhile; opened as open_snapshot_files does. The
  // directory (O_PATH: searched, not read) is named by its manifest in messages.
  auto add_snapshot = [&](const std::string& where) -> std::optional<std::string> {
    auto loc = SnapshotLocation::parse(where);
    if (where.empty() || !loc.ok() || loc->remote()) return std::nullopt;  // fails when opened, saying why
    const std::string dir = loc->store_dir + "/" + loc->name;
    const std::string manifest = dir + "/" + snapshot::kManifestFile, data = dir + "/" + snapshot::kDataFile;
    const int at = static_cast<int>(files.size());
    files.push_back(UserOpen{dir, manifest, O_PATH | O_DIRECTORY | O_CLOEXEC});
    files.push_back(UserOpen{snapshot::kManifestFile, manifest, snapshot::kSnapshotFileFlags, -1, at});
    files.push_back(UserOpen{snapshot::kDataFile, data, snapshot::kSnapshotFileFlags | O_DIRECT,
                             snapshot::kSnapshotFileFlags, at});
    return dir;
  };
  const std::optional<std::string> location_dir = add_snapshot(location), base_dir = add_snapshot(base);
  UserFiles out;
  if (files.empty()) return out;
  LAZYMEM_ASSIGN_OR_RETURN(std::vector<sys::UniqueFd> fds, open_files_as(who, files));
  size_t next = 0;
  if (!token_file.empty()) out.token = std::move(fds[next++]);
  auto take_snapshot = [&](const std::optional<std::string>& dir) -> std::optional<snapshot::SnapshotFiles> {
    if (!dir) return std::nullopt;
    ++next;  // the directory's: done with
    snapshot::SnapshotFiles f;
    f.path = *dir;
    f.manifest = std::move(fds[next++]);
    f.data = std::move(fds[next++]);
    return f;
  };
  out.location = take_snapshot(location_dir);
  out.base = take_snapshot(base_dir);
  return out;
}

namespace {

// Takes a source already open with the same token, if there is one.
bool take_open_one(const OpenSpec& spec, Opened& out) {
  for (const auto& [token, source] : spec.open_now) {
    if (token != out.token) continue;
    out.source = source;
    out.fresh = false;
    return true;
  }
  return false;
}

}  // namespace

Result<Opened> open_source(const OpenSpec& spec) {
  Opened out;
  OpenedLocations opened{{spec.location, std::nullopt}, std::nullopt};
  const RestoreOptions ro;  // its token_file and base are not read: opened here
  if (!spec.reader || spec.reader->uid == 0) {  // root's, or the daemon's own: by path
    if (!spec.token_file.empty()) {
      LAZYMEM_ASSIGN_OR_RETURN(out.token, net::read_token_file(spec.token_file));
    }
    if (take_open_one(spec, out)) return out;
    LAZYMEM_ASSIGN_OR_RETURN(opened, open_locations(spec.location, spec.base, ro.direct_io));
  } else {
    // A user's: read from what the user opened, never by path again (a path the user controls
    // may name another file by now).
    LAZYMEM_ASSIGN_OR_RETURN(UserFiles files, open_as_user(*spec.reader, spec.location, spec.base, spec.token_file));
    if (files.token.valid()) {
      LAZYMEM_ASSIGN_OR_RETURN(out.token, net::read_token_fd(files.token.get(), spec.token_file));
    }
    if (take_open_one(spec, out)) return out;
    opened.primary.files = std::move(files.location);
    if (!spec.base.empty()) opened.base = OpenedLocation{spec.base, std::move(files.base)};
  }
  LAZYMEM_ASSIGN_OR_RETURN(out.source, open_chunk_source(std::move(opened.primary), std::move(opened.base), out.token, ro));
  return out;
}

struct SourceOpener::Finished {
  std::mutex mu;
  std::vector<std::pair<uint64_t, Result<Opened>>> done;
  sys::UniqueFd event{::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)};
};

SourceOpener::SourceOpener(OpenLimits limits)
    : limits_(limits), finished_(std::make_shared<Finished>()), timer_(::timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK)) {}
SourceOpener::~SourceOpener() = default;

int SourceOpener::fd() const { return finished_->event.get(); }

Status SourceOpener::submit(uint64_t job, uid_t uid, OpenSpec spec, bool vm) {
  if (!finished_->event.valid() || !timer_.valid()) {
    return Error(Errc::kIo, "no eventfd or timerfd for the agent's snapshot opens (out of descriptors?)");
  }
  Job j{job, uid, std::move(spec), std::chrono::steady_clock::now() + limits_.deadline};
  if (vm) {
    launch(std::move(j), false);
  } else {
    std::deque<Job>& mine = waiting_[uid];
    if (mine.size() >= limits_.waiting_per_user) {
      return Error(Errc::kAgain, fmt::format("uid {} has {} snapshot opens waiting already (a page server or store "
                                             "not answering?); try again later", uid, mine.size()));
    }
    mine.push_back(std::move(j));
    start_waiting();
  }
  arm_timer();
  return ok_status();
}

void SourceOpener::launch(Job job, bool counted) {
  running_[job.id] = Running{job.uid, counted, false, job.due};
  if (counted) {
    ++counted_;
    ++running_per_user_[job.uid];
  }
  try {
    std::thread([id = job.id, spec = std::move(job.spec), finished = finished_] {
      Result<Opened> r = open_source(spec);
      {
        std::lock_guard lock(finished->mu);
        finished->done.emplace_back(id, std::move(r));
      }
      const uint64_t one = 1;
      (void)!::write(finished->event.get(), &one, sizeof one);
    }).detach();
  } catch (const std::system_error& e) {
    // Answered as any open is, through take(): never left waiting.
    std::lock_guard lock(finished_->mu);
    finished_->done.emplace_back(job.id, Error(Errc::kAgain, fmt::format("cannot start a thread to open the snapshot "
                                                                         "({}); try again", e.what())));
    const uint64_t one = 1;
    (void)!::write(finished_->event.get(), &one, sizeof one);
  }
}

size_t SourceOpener::running_of(uid_t uid) const {
  auto it = running_per_user_.find(uid);
  return it == running_per_user_.end() ? 0 : it->second;
}

// Starts waiting opens while there is room: the next user in turn (from next_user_ on, wrapping)
// with room for one more of theirs, their oldest.
void SourceOpener::start_waiting() {
  while (counted_ < limits_.running && !waiting_.empty()) {
    auto pick = waiting_.end();
    auto it = waiting_.lower_bound(next_user_);
    for (size_t k = 0; k < waiting_.size(); ++k, ++it) {
      if (it == waiting_.end()) it = waiting_.begin();
      if (running_of(it->first) < limits_.running_per_user) {
        pick = it;
        break;
      }
    }
    if (pick == waiting_.end()) return;
    const uid_t uid = pick->first;
    Job job = std::move(pick->second.front());
    pick->second.pop_front();
    if (pick->second.empty()) waiting_.erase(pick);
    next_user_ = uid + 1;
    launch(std::move(job), true);
  }
}

void SourceOpener::cancel(uint64_t job) {
  if (auto it = running_.find(job); it != running_.end()) {
    it->second.answered = true;
    return;
  }
  for (auto it = waiting_.begin(); it != waiting_.end(); ++it) {
    auto& q = it->second;
    auto j = std::find_if(q.begin(), q.end(), [&](const Job& w) { return w.id == job; });
    if (j == q.end()) continue;
    q.erase(j);
    if (q.empty()) waiting_.erase(it);
    return;
  }
}

std::vector<std::pair<uint64_t, Result<Opened>>> SourceOpener::take() {
  uint64_t n;
  (void)!::read(finished_->event.get(), &n, sizeof n);
  (void)!::read(timer_.get(), &n, sizeof n);
  std::vector<std::pair<uint64_t, Result<Opened>>> done, out;
  {
    std::lock_guard lock(finished_->mu);
    done.swap(finished_->done);
  }
  for (auto& [job, r] : done) {
    auto it = running_.find(job);
    if (it == running_.end()) continue;
    if (it->second.counted) {
      --counted_;
      if (--running_per_user_[it->second.uid] == 0) running_per_user_.erase(it->second.uid);
    }
    if (!it->second.answered) out.emplace_back(job, std::move(r));
    running_.erase(it);
  }
  const auto now = std::chrono::steady_clock::now();
  auto late = [&](uint64_t job) {
    out.emplace_back(job, Error(Errc::kTimeout, fmt::format("the snapshot could not be opened within {} ms (a page "
                                                            "server or store not answering?)", limits_.deadline.count())));
  };
  for (auto& [job, r] : running_) {
    if (r.answered || now < r.due) continue;
    r.answered = true;  // its slot is held until its thread ends
    late(job);
  }
  for (auto it = waiting_.begin(); it != waiting_.end();) {
    auto& q = it->second;
    while (!q.empty() && now >= q.front().due) {  // each user's in order: the oldest first
      late(q.front().id);
      q.pop_front();
    }
    it = q.empty() ? waiting_.erase(it) : std::next(it);
  }
  start_waiting();
  arm_timer();
  return out;
}

// The timer wakes the loop at the earliest deadline still to answer.
void SourceOpener::arm_timer() {
  std::optional<std::chrono::steady_clock::time_point> first;
  auto consider = [&](std::chrono::steady_clock::time_point due) {
    if (!first || due < *first) first = due;
  };
  for (const auto& [job, r] : running_)
    if (!r.answered) consider(r.due);
  for (const auto& [uid, q] : waiting_)
    if (!q.empty()) consider(q.front().due);
  itimerspec its{};
  if (first) {
    const auto in = std::max(*first - std::chrono::steady_clock::now(), std::chrono::steady_clock::duration(1000));
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(in).count();
    its.it_value.tv_sec = ns / 1'000'000'000;
    its.it_value.tv_nsec = ns % 1'000'000'000;
  }
  ::timerfd_settime(timer_.get(), 0, &its, nullptr);
}

}  // namespace lazymem::agent
