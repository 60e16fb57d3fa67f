// The pre-copy phase shared by a live capture and a migration: everything stored once with
// dirty-page tracking armed, then the chunks written meanwhile stored again, round by round,
// while the process runs. What differs is the end: a live capture pauses and stores the last
// chunks written; a migration pauses and leaves them where they are, served from memory.
#pragma once

#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "lazymem/dirty.h"
#include "lazymem/snapshot.h"
#include "process_mirror.h"
#include "snapshot/snapshot_writer.h"

namespace lazymem {

struct Precopy {
  // Another process's regions (LiveCaptureOptions::pid): the copy of them here, at the same
  // addresses, that everything below reads. Brought up to date at every look of the tracker.
  std::unique_ptr<ProcessMirror> mirror;
  std::unique_ptr<DirtyTracker> tracker;
  std::unique_ptr<snapshot::SnapshotWriter> writer;
  unsigned rounds = 1;  // passes over the memory so far: the first, then the pre-copy rounds
};

// `regions` with CaptureRegion::huge_page_size filled in where it is 0, from the mappings of
// process `pid` (0: this one) at the regions' addresses: huge-page memory is recorded as such,
// and restored into huge pages. Refused: a region off its huge pages' boundaries, or mixing them
// with other memory.
Result<std::vector<CaptureRegion>> with_huge_page_sizes(std::span<const CaptureRegion> regions, pid_t pid);

// Checks (as capture_regions_live), arms the tracker, stores everything into a writer to
// `target`, then runs rounds as `live` says. Nothing is committed.
Result<Precopy> precopy(const std::string& target, std::span<const CaptureRegion> regions, const CaptureOptions& options,
                        const LiveCaptureOptions& live, const KernelFeatures& features);

// The chunks written since the tracker's last look, per region (sorted, once each), and the bytes
// of the pages written (which the mirror, if any, now holds as they are).
struct DirtyChunks {
  std::vector<std::vector<size_t>> chunks;
  uint64_t bytes = 0;
};
Result<DirtyChunks> collect_dirty_chunks(Precopy& p, std::span<const CaptureRegion> regions, uint32_t chunk_size);

// What pause_workload() would refuse, said before anything is done: a cgroup to freeze that is
// not there or does not hold the process alone.
Status check_pausable(const LiveCaptureOptions& live);

// kCancelled if LiveCaptureOptions::cancelled says so.
Status check_cancelled(const LiveCaptureOptions& live);

// One round: the chunks written since the last look stored again. Returns the bytes written.
Result<uint64_t> store_written(Precopy& p, std::span<const CaptureRegion> regions, uint32_t chunk_size);

// The pause of a live capture or migration: the caller's pause(), or, for another process given
// without one, SIGSTOP or its cgroup frozen (failing, with the process resumed, if it does not
// pause in time).
struct WorkloadPause {
  // Ends it: the caller's resume(), SIGCONT, or the thaw. Empty if the process was found paused
  // (stopped or frozen by its owner): it is left as it was found.
  std::function<void()> resume;
  // That it is paused still, for another process: not continued or thawed by someone meanwhile
  // (what was read from it since might be torn). Empty for the caller's own pause.
  std::function<Status()> still_paused;
};
Result<WorkloadPause> pause_workload(const LiveCaptureOptions& live);

// Resumes the workload on scope exit, exceptions included, unless disarmed: its writers must not
// stay parked (a migration disarms it once the workload is the destination's).
struct ResumeOnExit {
  std::function<void()> resume;
  bool armed = true;
  ~ResumeOnExit() {
    if (armed && resume) resume();
  }
};

}  // namespace lazymem
