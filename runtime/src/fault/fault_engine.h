// FaultEngine: one thread, one event loop, that resolves the missing-page faults of any number
// of userfaultfds (sessions) from their chunk sources.
//
// The thread that reads a fault also requests the chunk, receives it, verifies and decodes it,
// and installs it (UFFDIO_COPY of the whole chunk, UFFDIO_ZEROPAGE for zero chunks): no
// hand-off between threads on the fault path. Demand fetches are submitted before prefetch;
// prefetch fills the rest in the gaps, its window shrinking while faults arrive and growing
// while they do not. Non-cooperative events (REMOVE, UNMAP, REMAP, FORK) are applied in the
// order the kernel reports them, by the same thread that installs pages, so no page is ever
// installed where the process has just dropped, unmapped or moved it.
//
// Thread-safety: every public method may be called from any thread.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "fault/address_map.h"
#include "fault/fault_stats.h"
#include "lazymem/kernel_features.h"
#include "lazymem/result.h"
#include "lazymem/stats.h"
#include "snapshot/chunk_source.h"
#include "sys/uffd.h"
#include "sys/unique_fd.h"

namespace lazymem::fault {

using SessionId = uint64_t;

struct SessionSpec {
  std::string name;                                // for logs and stats
  sys::Uffd uffd;                                  // already registered over `ranges`
  // Shared: sessions forked from one another, and agent clients restoring the same snapshot,
  // read through one source (one manifest in memory).
  std::shared_ptr<snapshot::ChunkSource> source;
  std::vector<MappedRange> ranges;
  // The page size of the served mappings. 4 KiB, or a huge page size (hugetlbfs memory, a
  // Firecracker VM backed by huge pages): the kernel installs such a page only whole, so the
  // engine gathers every chunk of a huge page before it installs it, and each fault waits for
  // all of them. Ranges (start, length, region offset) are multiples of it.
  uint64_t page_size = 4096;
  pid_t pid = 0;           // the served process (killed if a page cannot be had and POISON is missing)
  bool prefetch = true;    // fetch every chunk in the background, not just faulted ones
  // Faults resolved by the faulting threads themselves (uffd in SIGBUS mode): the engine only
  // prefetches and applies events, keeping this follower's view of the map in step.
  std::shared_ptr<MapFollower> follower;
  // The pages of chunks that cannot be had are poisoned only once release_failures() is called:
  // the process is told first, and says why, before an access can die of SIGBUS (a process
  // restoring through the agent). Threads faulting on them wait meanwhile (the session is not
  // complete either); whoever sets this bounds that wait. Not inherited by forked children.
  bool hold_failures = false;
};

struct SessionInfo {
  SessionId id = 0;
  std::string name;
  pid_t pid = 0;
  RestoreStats stats;
  uint64_t chunks_total = 0;
  uint64_t chunks_present = 0;
  uint64_t page_size = 4096;     // of the served memory (SessionSpec::page_size)
  uint64_t pages_gathering = 0;  // huge pages with some chunks in and not yet installed
  bool complete = false;
  bool failed = false;
  bool exited = false;  // the process went away (found by the engine: forked children have no pidfd)
  std::string failure;  // the first failure's message
};

struct EngineOptions {
  size_t prefetch_window_max = 32;     // prefetch requests in flight per session, at most
  size_t demand_reserve = 8;           // reader slots kept free for demand requests
  unsigned fetch_attempts = 3;         // tries per chunk (a corrupt or failed read is retried)
  std::chrono::milliseconds demand_deadline{30000};  // a faulting thread waits at most this long
  // When nothing else is possible (no UFFDIO_POISON), kill the process rather than leave it
  // hanging. In-process restores set the pid to their own.
  bool kill_on_failure = true;
  // Threads that decode prefetched chunks (0: one per core but the engine's own). Demand
  // faults are always decoded by the engine thread itself.
  unsigned decode_threads = 0;
  size_t decode_jobs = 16;  // chunks in decoding at once, at most
  // Hold a CPU latency request (sys/cpu_latency.h) while faults and fetches are under way.
  bool cpu_latency_qos = true;
};

// The one line that says why a restore's pages could not all be had, logged before any of them
// is poisoned: by the engine for a restore in this process, and by the watchdog of a process
// restoring through the agent (in its own stderr, not only in the agent's log).
void log_restore_failure(const std::string& session, const std::string& why);

class FaultEngine {
 public:
  FaultEngine(const KernelFeatures& features, EngineOptions options = {});
  ~FaultEngine();
  FaultEngine(const FaultEngine&) = delete;
  FaultEngine& operator=(const FaultEngine&) = delete;

  // Starts the engine thread.
  Status start();
  // Stops the thread. Sessions still open keep their uffds (closing one would let the kernel
  // zero-fill pages that were never restored), so callers complete or remove them first.
  void stop();

  // Adds a session; the engine opens a reader for it on its own thread.
  Result<SessionId> add_session(SessionSpec spec);
  // Forgets a session (its process exited, or it is complete): closes the uffd. It leaves
  // sessions() at once; session_info() still answers until the engine thread has closed it.
  void remove_session(SessionId id);
  // Turns background prefetch on or off for a session.
  void set_prefetch(SessionId id, bool on);
  // A hold_failures session: poisons the pages of its failed chunks, now and from now on.
  void release_failures(SessionId id);

  std::optional<SessionInfo> session_info(SessionId id) const;
  std::vector<SessionInfo> sessions() const;

  enum class Wait {
    kFirstFailure,  // return at the first failed chunk: the caller reacts to it at once
    // Return once the session is settled: every chunk present or failed (and its pages
    // poisoned), or its process gone. Then no page is left missing, and the uffd may be
    // closed without the kernel zero-filling anything. A hold_failures session with a failed
    // chunk settles only after release_failures().
    kSettled,
  };
  // Waits until every chunk of the session is present (kOk), a chunk failed (the failure; with
  // kSettled, once the rest is in too), or the timeout passes (kTimeout).
  Status wait_complete(SessionId id, std::chrono::milliseconds timeout, Wait until = Wait::kFirstFailure);

  // Readable (eventfd) whenever a session completes, fails, exits or goes away: lets an event loop
  // (the agent's) react without polling. Read it to clear it, then look at sessions().
  int changes_fd() const { return changes_.get(); }

 private:
  struct Session;
  struct Pending;
  class Loop;

  void run();
  void notify();

  KernelFeatures features_;
  EngineOptions options_;
  sys::UniqueFd control_;  // eventfd: wakes the loop for commands
  sys::UniqueFd changes_;  // eventfd: signalled when a session completes, fails or is removed
  void signal_change();
  std::thread thread_;
  std::atomic<bool> stopping_{false};

  mutable std::mutex mu_;  // guards sessions_ (structure), commands_, and the condvar
  std::condition_variable cv_;
  std::unordered_map<SessionId, std::shared_ptr<Session>> sessions_;
  struct Command {
    enum Kind { kAdd, kRemove, kPrefetch, kReleaseFailures } kind;
    SessionId id;
    bool flag;
  };
  std::vector<Command> commands_;
  SessionId next_id_ = 1;
};

}  // namespace lazymem::fault
