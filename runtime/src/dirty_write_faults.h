// Dirty-page tracking for kernels without UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN (before 6.7):
// write-protect faults (Linux 5.13) taken by a tracker thread of ours.
//
// The ranges are registered on a uffd of their process for write-protect faults and
// protected. The first write to a protected page is a fault the thread reads: it notes the page
// and lifts the protection (waking the writer). collect() takes the notes, adds every page the
// page tables hold unprotected (/proc/PID/pagemap's write-protect bit, 5.13), and protects them
// all again, under the lock the thread notes under: a write is reported by one collect() or the
// next. The walk is what finds pages MADV_DONTNEED dropped (holes: they read as zeros now), or
// dropped and written since (fresh pages without the mark), or MADV_FREE let go.
// A page with nothing behind it cannot be protected before 6.4 (UFFD_FEATURE_WP_UNPOPULATED):
// each gets the shared zero page first, at start() and whenever the walk finds one. Not MISSING
// faults: a read through process_vm_readv (ProcessMirror) of a page registered for them fails
// with EFAULT instead of waiting. munmap and mremap arrive as UNMAP and REMAP events: what was
// there is no longer reported, and a collect() that finds memory mapped there again fails (its
// pages can no longer be told apart), as the kernel-marks method does.
//
// The price: the writer waits for our thread at each first write to a page per round (a
// cross-CPU wake-up, tens of µs here), where the kernel-marks method costs it ~1 µs.
#pragma once

#include <sys/types.h>

#include <memory>
#include <vector>

#include "dirty_impl.h"

namespace lazymem {

// The ranges are checked already (sorted, aligned, private mappings of `pid`; 0: this process).
Result<std::unique_ptr<DirtyTracker::Impl>> start_write_fault_tracking(std::vector<AddressRange> ranges, pid_t pid);

}  // namespace lazymem
