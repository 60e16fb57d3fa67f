// Snapshot opens for the agent, each on a thread of its own (see source_opener.h).
#include "source_opener.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <mutex>
#include <system_error>
#include <thread>

#include "lazymem/snapshot.h"
#include "net/auth.h"
#include "snapshot/manifest.h"
#include "source.h"
#include "sys/unique_fd.h"

namespace lazymem::agent {

Status client_may_read(const Requester& who, const std::string& location, const std::string& token_file) {
  if (who.uid == 0) return ok_status();
  std::vector<std::string> files;
  if (!token_file.empty()) files.push_back(token_file);
  if (auto loc = SnapshotLocation::parse(location); loc.ok() && !loc->remote()) {
    files.push_back(loc->store_dir + "/" + loc->name + "/" + snapshot::kManifestFile);
    files.push_back(loc->store_dir + "/" + loc->name + "/" + snapshot::kDataFile);
  }
  if (files.empty()) return ok_status();
  const std::vector<gid_t>& groups = who.groups;
  std::vector<const char*> paths;
  for (const auto& f : files) paths.push_back(f.c_str());
  pid_t kid = ::fork();
  if (kid < 0) return sys_error("fork to check the client's access", errno);
  if (kid == 0) {
    if (::syscall(SYS_setgroups, groups.size(), groups.data()) != 0 || ::syscall(SYS_setgid, who.gid) != 0 ||
        ::syscall(SYS_setuid, who.uid) != 0) {
      _exit(255);
    }
    for (size_t i = 0; i < paths.size(); ++i) {
      int fd = static_cast<int>(::syscall(SYS_openat, AT_FDCWD, paths[i], O_RDONLY | O_CLOEXEC | O_NONBLOCK));
      if (fd < 0) _exit(static_cast<int>(i));
      ::syscall(SYS_close, fd);
    }
    _exit(254);
  }
  int st = 0;
  while (::waitpid(kid, &st, 0) < 0 && errno == EINTR) {
  }
  const int code = WIFEXITED(st) ? WEXITSTATUS(st) : 255;
  if (code == 254) return ok_status();
  if (code < static_cast<int>(files.size())) {
    return Error(Errc::kPermission, fmt::format("{} cannot be read by uid {} (the requesting user): the agent reads "
                                                "nothing on a user's behalf that the user could not", files[code], who.uid));
  }
  return Error(Errc::kPermission, fmt::format("could not check what uid {} may read", who.uid));
}

Result<Opened> open_source(const OpenSpec& spec) {
  if (spec.reader) LAZYMEM_TRY(client_may_read(*spec.reader, spec.location, spec.token_file));
  if (spec.reader && !spec.base.empty()) LAZYMEM_TRY(client_may_read(*spec.reader, spec.base, spec.token_file));
  Opened out;
  if (!spec.token_file.empty()) {
    LAZYMEM_ASSIGN_OR_RETURN(out.token, net::read_token_file(spec.token_file));
  }
  for (const auto& [token, source] : spec.open_now) {
    if (token != out.token) continue;
    out.source = source;
    out.fresh = false;
    return out;
  }
  RestoreOptions ro;
  ro.token_file = spec.token_file;
  ro.base = spec.base;
  LAZYMEM_ASSIGN_OR_RETURN(out.source, open_chunk_source(spec.location, ro));
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
