// PagemapScan: the PAGEMAP_SCAN ioctl (Linux 6.7) on a process's /proc/PID/pagemap, which walks
// its page tables in the kernel and reports runs of pages by category (written, present,
// swapped...), write-protecting the matched ones again in the same walk.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <vector>

#include "lazymem/result.h"
#include "sys/uapi_compat.h"
#include "sys/unique_fd.h"

namespace lazymem::sys {

struct PageSpan {
  uintptr_t start = 0;
  uintptr_t end = 0;
};

class PagemapScan {
 public:
  // Opens /proc/PID/pagemap (pid 0: this process). Reading another process's needs the right
  // to ptrace it (root, or the same user without Yama's restrictions).
  static Result<PagemapScan> open(pid_t pid);

  // Appends to `out` the runs of pages in [start, end) whose categories, XORed with `inverted`,
  // hold every bit of `mask` (PAGE_IS_*), and write-protects those pages again
  // (PM_SCAN_WP_MATCHING). Fails (EPERM) where part of the range is mapped but not registered
  // for asynchronous write-protect: the caller's tracking of it has been lost.
  Status take(uintptr_t start, uintptr_t end, uint64_t mask, uint64_t inverted, std::vector<PageSpan>& out);

 private:
  explicit PagemapScan(UniqueFd fd);
  UniqueFd fd_;
  pid_t pid_ = 0;
  std::vector<page_region> vec_;  // the kernel writes up to this many runs per call
};

// Whether the running kernel has PAGEMAP_SCAN (the probe: an empty scan of this process).
bool pagemap_scan_supported();

}  // namespace lazymem::sys
