// ThreadFaults: missing-page faults of an in-process restore resolved by the faulting thread
// itself (RestoreOptions::fault_on_thread).
//
// The userfaultfd is opened with UFFD_FEATURE_SIGBUS, so a missing page raises SIGBUS in the
// thread that touched it instead of queueing a message for the engine. The process-wide SIGBUS
// handler asks a page server for that one page (getPage) over a connection checked out of a
// pool opened beforehand, verifies and decodes it, installs it with UFFDIO_COPY and returns:
// the access runs again and finds the page. That is one round trip and no thread hand-off,
// where the engine path costs four hand-offs (docs/design-notes.md, "Faults on the faulting
// thread"; lazymem-bench-floor measures the difference). The engine keeps prefetching the rest
// and applying the process's map changes (REMOVE, UNMAP, REMAP), telling this class of each
// change through MapFollower.
//
// Failure is visible, as on the engine path: when the deadline passes or the fetch attempts
// are spent the reason goes to stderr, the page is poisoned (UFFDIO_POISON: other threads
// touching it fail too) and the SIGBUS is passed on as if we were not there (default: the
// process dies of SIGBUS); without POISON the process is killed. Signals that are not ours (another si_code, an address no
// restore holds) go to the handler installed before ours, or to the default action.
//
// Caveat (the reason this is an option): with UFFD_FEATURE_SIGBUS a *kernel* access to a missing
// page (read(2) into restored memory, a futex on it) fails with EFAULT instead of waiting.
// Use it for memory the application touches from user space, or after prefetch covered it.
// The restore that uses it completes before a fork() (sys::BeforeFork): a child could not fetch its pages.
//
// Thread-safety: the handler runs on any thread; the engine thread calls the MapFollower side;
// everything else is for the thread that owns the restore.
#pragma once

#include <signal.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "fault/address_map.h"
#include "fault/fault_stats.h"
#include "lazymem/result.h"
#include "snapshot/chunk_source.h"
#include "sys/uffd.h"

namespace lazymem::fault {

struct ThreadFaultOptions {
  unsigned connections = 2;                          // page-server connections in the pool
  std::chrono::milliseconds deadline{30000};         // a faulting thread waits at most this long
  unsigned fetch_attempts = 3;                       // bad replies tolerated per fault
  bool can_poison = true;                            // UFFDIO_POISON available (else kill)
};

class ThreadFaults final : public MapFollower {
 public:
  // `uffd`: the session's userfaultfd (SIGBUS mode), duplicated here. Opens the connections
  // and installs the SIGBUS handler (once per process) before returning.
  static Result<std::shared_ptr<ThreadFaults>> start(std::shared_ptr<snapshot::ChunkSource> source, int uffd,
                                                     std::vector<MappedRange> ranges, ThreadFaultOptions options);
  // Stops serving (waits for handlers under way) and closes the connections.
  ~ThreadFaults() override;

  void begin_update() override;
  void end_update(const std::vector<MappedRange>& ranges) override;

  // Faults served here, per snapshot region.
  std::vector<RegionStats> stats() const;
  // Whether a page could not be restored (poisoned), and which and why; empty if none.
  bool failed() const { return failure_.load() != nullptr; }
  std::string failure() const;

  struct Pool;
  struct Table;
  ThreadFaults();  // use start()

 private:
  enum class Served { kDone, kFailed, kNotOurs, kMapChanging };
  Served serve(uint64_t addr, int64_t start_ns) noexcept;
  static constexpr uint32_t kNoRegion = ~uint32_t{0};  // a failure before the address was looked up
  void fail(uint64_t page_addr, uint32_t region, const char* why) noexcept;
  void keep_connections();  // the keeper thread: reopens broken connections
  static void on_sigbus(int sig, siginfo_t* info, void* context);

  std::shared_ptr<snapshot::ChunkSource> source_;
  const Manifest* manifest_ = nullptr;
  sys::Uffd uffd_;
  ThreadFaultOptions options_;
  // How long one connection is given per fetch (snapshot::attempt_slice of the options), in ns.
  int64_t attempt_ns_ = 0;
  pid_t owner_ = 0;
  std::unique_ptr<Table> table_;
  std::unique_ptr<Pool> pool_;
  std::vector<std::unique_ptr<LiveRegionStats>> stats_;
  std::atomic<const char*> failure_{nullptr};
  std::atomic<uint64_t> failed_addr_{0};
  int slot_ = -1;  // in the process-wide registry
  std::thread keeper_;
};

}  // namespace lazymem::fault
