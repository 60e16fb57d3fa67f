// ProcessMirror: a copy of ranges of another process's memory, at the same addresses in this
// one, so that code written for this process's memory (capture, migration) works on it
// unchanged. Brought up to date range by range with process_vm_readv: the whole at first, then
// the pages a dirty tracker reports written.
#pragma once

#include <sys/types.h>

#include <span>
#include <vector>

#include "lazymem/dirty.h"
#include "lazymem/result.h"
#include "sys/mapping.h"

namespace lazymem {

class ProcessMirror {
 public:
  // Maps `ranges` (page-aligned) here, zero-filled. kInvalidArgument if one is not mapped in
  // `pid`; kExists, naming the range, if this process uses any of those addresses itself.
  static Result<ProcessMirror> create(pid_t pid, std::span<const AddressRange> ranges);

  // Copies every range. Pages that read as zeros are not written here: the copy costs no more
  // memory than the process has written (an untouched reservation costs nothing).
  Status fill();
  // Copies `pages` (inside the ranges), zero pages too: the mirror of pages written since.
  Status refresh(std::span<const AddressRange> pages);
  // Gives the memory of [start, start+length) back (reads as zeros), e.g. once it is stored.
  void drop(uintptr_t start, size_t length);

  pid_t pid() const { return pid_; }

 private:
  // Copies [start, start+length) in pieces (thread-safe: refresh() runs two at once).
  Status copy_exact(uintptr_t start, size_t length) const;
  Status refresh_part(std::span<const AddressRange> pages) const;
  Status read_error(uintptr_t start, size_t length, ssize_t got) const;

  pid_t pid_ = 0;
  std::vector<sys::Mapping> mappings_;
};

}  // namespace lazymem
