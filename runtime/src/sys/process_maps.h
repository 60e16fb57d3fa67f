// A process's memory mappings as /proc/PID/maps lists them, and whether ranges lie in them: the
// agent checks a client's range table with it, the dirty tracker the ranges it is given.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "lazymem/result.h"

namespace lazymem::sys {

struct Vma {
  uintptr_t start = 0;
  uintptr_t end = 0;
  bool shared = false;  // MAP_SHARED ('s' in the permissions)
  uint64_t page_size = 0;  // the kernel's page size for it (huge pages), if known (else 0)
};

// In address order, as the kernel lists them. pid 0: this process. Page sizes are known of
// unnamed anonymous memory (4 KiB); with `page_sizes`, of all, read from /proc/PID/smaps (which
// costs a walk of the process's page tables).
Result<std::vector<Vma>> read_vmas(pid_t pid, bool page_sizes = false);

// Address ranges, [start, end).
using Ranges = std::vector<std::pair<uintptr_t, uintptr_t>>;

// The mappings, with the page size of every one the ranges meet known: /proc/PID/maps, or smaps
// where some range lies in memory that maps cannot say the page size of (hugetlbfs, memfd,
// files): smaps walks the process's page tables.
Result<std::vector<Vma>> read_vmas_sized(pid_t pid, const Ranges& ranges);

// That `pid` names a process (not one of its threads) whose main thread has not exited (its
// /proc/PID files, memory included, are read through that thread): else an error saying which.
Status check_process(pid_t pid);

// How far the mappings cover [start, end) without a gap: `covered_to` is `end` when all of it
// is mapped, else where the first gap begins; `shared` is the first shared mapping met before
// that, if any; `page_size`, the page size of the mappings met, or 0 where they differ. A
// search, not a scan: thousands of ranges may meet tens of thousands of mappings.
struct Coverage {
  uintptr_t covered_to = 0;
  const Vma* shared = nullptr;
  uint64_t page_size = 0;
};
Coverage coverage(const std::vector<Vma>& vmas, uintptr_t start, uintptr_t end);

// The mappings that overlap [start, end), in address order (a search, as coverage()).
std::span<const Vma> overlapping(const std::vector<Vma>& vmas, uintptr_t start, uintptr_t end);

// The huge page size of the memory at each [start, end) in process `pid` (0: this one), 0 where
// it is ordinary pages; smaps is read only if some range is not plain anonymous memory. An
// error names a range that is not all mapped, or mixes huge pages with other memory.
Result<std::vector<uint64_t>> huge_page_sizes(pid_t pid, const Ranges& ranges);

}  // namespace lazymem::sys
