// Opening a snapshot for the agent, off its event loop. An open may wait on a disk or on a page
// server (up to its connect deadline), and the check that a client could read what it names
// forks and waits: either, on the loop, would stall every other client, the failure notices'
// 1 s hold included. Each open runs on a thread of its own; the loop learns of the finished ones
// through an eventfd, and of deadlines passed through a timerfd (SourceOpener).
//
// Thread-safety: SourceOpener's methods are the loop's; open_source runs on any thread.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "lazymem/result.h"
#include "snapshot/chunk_source.h"
#include "snapshot/snapshot_reader.h"
#include "sys/peer_cred.h"
#include "sys/unique_fd.h"

namespace lazymem::agent {

// Who asked, as taken when its connection was accepted (sys::peer_cred): what the agent (root)
// opens for a user, that user must be able to open itself.
using Requester = sys::Credentials;

// One open, everything it needs copied in.
struct OpenSpec {
  std::string location, token_file;
  // Whose files these are: a user's are opened as that user (none: the daemon's own, or checked
  // already; root's are opened by path).
  std::optional<Requester> reader;
  // Sources of `location` already open in the version wanted, with the token each was opened
  // with: one opened with the same token is taken instead of opening again.
  std::vector<std::pair<std::string, std::shared_ptr<snapshot::ChunkSource>>> open_now;
  std::string base;  // RestoreOptions::base, or empty
  // What names the source among those open: a source read with a base is another than without.
  std::string key() const { return base.empty() ? location : location + " with base " + base; }
};

struct Opened {
  std::string token;  // read from the token file (sources are shared only between equal tokens)
  std::shared_ptr<snapshot::ChunkSource> source;
  bool fresh = true;  // opened now, not one of OpenSpec::open_now
};

// What a user opened for the agent (open_as_user).
struct UserFiles {
  sys::UniqueFd token;                              // the token file's; invalid: none named
  std::optional<snapshot::SnapshotFiles> location;  // a local location's snapshot files
  std::optional<snapshot::SnapshotFiles> base;      // a local base's
};

// Opens the token file and the snapshot files of `location` and `base` (empty: none) in a local
// store as `who`: in a child with the client's uid, gid and groups (only syscalls between fork
// and _exit: other threads may hold locks), which hands the descriptors to the agent over a
// socketpair (SCM_RIGHTS). The agent reads those, never the paths again: a path the user
// controls (a symlink, a directory) could name another file by then. Fails with kPermission
// naming the first file `who` could not open. For a `who` other than root (root opens by path).
Result<UserFiles> open_as_user(const Requester& who, const std::string& location, const std::string& base,
                               const std::string& token_file);

// Does the whole open, blocking: a user's files opened as that user (open_as_user), the token,
// the source.
Result<Opened> open_source(const OpenSpec& spec);

struct OpenLimits {
  size_t running = 64;
  size_t running_per_user = 8;
  size_t waiting_per_user = 1024;
  std::chrono::milliseconds deadline{45000};  // past a page server's 30 s connect deadline
};

// Runs opens, each on a thread of its own, fairly between users: one user's opens waiting on a
// page server that never answers hold up neither another user's nor a VM's. A VM's handshake
// (which cannot be asked again) starts at once; other opens run at most `running_per_user` of
// one user's and `running` in all at once, the rest waiting their turn (users in turn, each
// user's in order). Every open is answered within `deadline` of its submission: done, or
// kTimeout (its thread, if under way, finishes unseen).
class SourceOpener {
 public:
  explicit SourceOpener(OpenLimits limits = OpenLimits());
  ~SourceOpener();
  SourceOpener(const SourceOpener&) = delete;
  SourceOpener& operator=(const SourceOpener&) = delete;

  // Readable when there is something to take(): an open finished, or one's deadline passed.
  int fd() const;
  int timer_fd() const { return timer_.get(); }

  // Open `job` for user `uid`. `vm`: a VM's handshake, started at once whatever is under way.
  // kAgain when `uid` has `waiting_per_user` opens waiting already.
  Status submit(uint64_t job, uid_t uid, OpenSpec spec, bool vm);
  // Its requester has gone: an open waiting is dropped, one under way finishes unseen.
  void cancel(uint64_t job);
  // What has finished, and what has passed its deadline (kTimeout); starts waiting opens in the
  // room made.
  std::vector<std::pair<uint64_t, Result<Opened>>> take();

 private:
  struct Finished;
  struct Job {
    uint64_t id = 0;
    uid_t uid = 0;
    OpenSpec spec;
    std::chrono::steady_clock::time_point due;
  };
  struct Running {
    uid_t uid = 0;
    bool counted = true;  // held a slot (a VM's does not)
    bool answered = false;  // timed out or cancelled: its result is dropped
    std::chrono::steady_clock::time_point due;
  };
  void launch(Job job, bool counted);
  size_t running_of(uid_t uid) const;
  void start_waiting();
  void arm_timer();

  OpenLimits limits_;
  // Shared with the threads, which are detached: a daemon stopping does not wait out a page
  // server that does not answer, and a thread finishing after it finds what it writes to alive.
  std::shared_ptr<Finished> finished_;
  sys::UniqueFd timer_;
  std::map<uid_t, std::deque<Job>> waiting_;  // by user
  uid_t next_user_ = 0;                       // whose turn it is to start one (round robin)
  std::map<uint64_t, Running> running_;
  std::map<uid_t, size_t> running_per_user_;
  size_t counted_ = 0;
};

}  // namespace lazymem::agent
