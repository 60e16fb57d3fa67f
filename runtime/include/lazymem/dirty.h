// Dirty-page tracking: which pages of a process's memory were written since the last look, the
// question every pre-copy round of a migration asks.
//
//   auto t = lazymem::DirtyTracker::start({{heap, heap_len}}, features);
//   copy_everything();                   // round 0
//   auto dirty = (*t)->collect();        // written meanwhile: copy these again, and repeat
//
// Two ways (DirtyMethod), one answer. Since Linux 6.7 the kernel does the work (kKernelMarks:
// UFFD_FEATURE_WP_ASYNC with PAGEMAP_SCAN): the tracked pages are write-protected; the first
// write to one is let through at once by the kernel, which only notes it (no fault message, no
// thread of ours woken); collect() walks the page tables in one ioctl, reports the pages written
// and write-protects them again in the same walk. Before 6.7 (from 5.13), a thread of the
// tracker's takes each first write as a write-protect fault (kWriteFaults): the same answers,
// but the writer waits for that thread at each first write to a page per round. Either way a
// write that races with collect() is reported by it or by the next one, never lost.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string_view>
#include <vector>

#include "lazymem/kernel_features.h"
#include "lazymem/result.h"

namespace lazymem {

struct AddressRange {
  uintptr_t start = 0;
  size_t length = 0;
  uintptr_t end() const { return start + length; }
  bool operator==(const AddressRange&) const = default;
};

enum class DirtyMethod {
  kAuto,         // kKernelMarks where the kernel has them, else kWriteFaults
  kKernelMarks,  // UFFD_FEATURE_WP_ASYNC | WP_UNPOPULATED marks read by PAGEMAP_SCAN (Linux 6.7)
  kWriteFaults,  // write-protect faults taken by a thread of the tracker's (Linux 5.13)
};

// "kernel-marks", "write-faults", "auto": as flags and JSON say them; and back (nullopt for
// anything else).
const char* dirty_method_name(DirtyMethod method);
std::optional<DirtyMethod> parse_dirty_method(std::string_view name);

struct DirtyTrackerOptions {
  pid_t pid = 0;  // whose memory: 0 for this process
  DirtyMethod method = DirtyMethod::kAuto;
  // A userfaultfd of that process whose API handshake asked for UFFD_FEATURE_WP_ASYNC and
  // UFFD_FEATURE_WP_UNPOPULATED (a process hands it over with SCM_RIGHTS; the tracker takes a
  // duplicate). The ranges must not be registered for MISSING faults on it: registering them for
  // write-protect replaces that. -1: the tracker opens one; in another process, by making that
  // process open it (ptrace, x86_64: it needs ptrace rights over it, and need not cooperate).
  // kKernelMarks only: kWriteFaults opens its own (its thread reads the uffd's events).
  int uffd = -1;
};

// What it cannot see, by design: writes to shared memory through other mappings or its file
// (shared ranges are refused), and writes that bypass the page tables (a device's DMA, io_uring
// into buffers registered before tracking began). Memory unmapped after start() just stops
// being reported: a caller that unmaps tracked memory must know it did. Tracking splits
// transparent huge pages at their first write (per-4 KiB marks); khugepaged may merge them later.
class DirtyTracker {
 public:
  // Starts tracking `ranges` (page-aligned, not overlapping, private mappings of the process):
  // from now on every page counts as clean until written. Says what is missing where the kernel,
  // the uffd or the memory cannot do it (a range another uffd serves: kExists).
  static Result<std::unique_ptr<DirtyTracker>> start(std::vector<AddressRange> ranges, const KernelFeatures& features,
                                                     const DirtyTrackerOptions& options = {});
  // Stops tracking (the ranges are unregistered; writes no longer pay the first-write note).
  ~DirtyTracker();

  // The pages of the tracked ranges whose contents changed since start() or the last collect():
  // written, or dropped by the kernel (MADV_DONTNEED: they read as zeros now). Sorted, adjacent
  // pages merged. Fails if the process exited, or if tracked memory was unmapped and mapped again
  // (its pages can no longer be told apart): a migration must then copy that range afresh.
  Result<std::vector<AddressRange>> collect();

  const std::vector<AddressRange>& ranges() const;
  DirtyMethod method() const;  // the one in use (never kAuto)

  struct Impl;

 private:
  explicit DirtyTracker(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace lazymem
