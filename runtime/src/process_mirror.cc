// ProcessMirror: process_vm_readv into a mapping at the same addresses.
#include "process_mirror.h"

#include <fmt/format.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <thread>

#include "snapshot/chunk_codec.h"
#include "sys/process_maps.h"

namespace lazymem {
namespace {

constexpr size_t kPiece = 4 << 20;  // per process_vm_readv: a partial read says where a mapping ends
const size_t kPage = static_cast<size_t>(::sysconf(_SC_PAGESIZE));

}  // namespace

Result<ProcessMirror> ProcessMirror::create(pid_t pid, std::span<const AddressRange> ranges) {
  LAZYMEM_TRY(sys::check_process(pid));
  // Said now, by the maps, rather than by a failed read later, once the process may be paused.
  LAZYMEM_ASSIGN_OR_RETURN(std::vector<sys::Vma> vmas, sys::read_vmas(pid));
  for (const AddressRange& r : ranges) {
    const uintptr_t covered = sys::coverage(vmas, r.start, r.end()).covered_to;
    if (covered < r.end()) {
      return Error(Errc::kInvalidArgument, fmt::format("{:#x}-{:#x} is not mapped in process {} (see /proc/{}/maps)",
                                                       covered, r.end(), pid, pid));
    }
  }
  ProcessMirror m;
  m.pid_ = pid;
  for (const AddressRange& r : ranges) {
    auto map = sys::Mapping::anonymous_at(r.start, r.length, PROT_READ | PROT_WRITE);
    if (!map.ok()) {
      return std::move(map).error().wrap(fmt::format("{:#x}-{:#x} of process {}: this process uses that range itself, "
                                                     "so it cannot hold a copy of it at the same address",
                                                     r.start, r.end(), pid));
    }
    m.mappings_.push_back(std::move(*map));
  }
  return m;
}

Status ProcessMirror::read_error(uintptr_t start, size_t length, ssize_t got) const {
  const int err = got < 0 ? errno : EFAULT;
  if (err == ESRCH) return Error(Errc::kNotFound, fmt::format("process {} exited", pid_), err);
  return sys_error(fmt::format("reading {:#x}-{:#x} of process {} (is that range mapped and readable there? see "
                               "/proc/{}/maps)",
                               start + (got > 0 ? static_cast<size_t>(got) : 0), start + length, pid_, pid_),
                   err);
}

Status ProcessMirror::copy_exact(uintptr_t start, size_t length) const {
  for (size_t off = 0; off < length; off += kPiece) {
    const size_t n = std::min(kPiece, length - off);
    iovec at{reinterpret_cast<void*>(start + off), n};  // the same address on both sides
    const ssize_t got = ::process_vm_readv(pid_, &at, 1, &at, 1, 0);
    if (got != static_cast<ssize_t>(n)) return read_error(start + off, n, got);
  }
  return ok_status();
}

Status ProcessMirror::fill() {
  // Through a bounce buffer, so that pages reading as zeros are not written here.
  std::vector<std::byte> bounce(kPiece);
  for (const sys::Mapping& m : mappings_) {
    for (size_t off = 0; off < m.size(); off += kPiece) {
      const size_t n = std::min(kPiece, m.size() - off);
      std::byte* here = m.data() + off;
      iovec local{bounce.data(), n};
      iovec remote{here, n};
      const ssize_t got = ::process_vm_readv(pid_, &local, 1, &remote, 1, 0);
      if (got != static_cast<ssize_t>(n)) return read_error(m.address() + off, n, got);
      for (size_t p = 0; p < n; p += kPage) {
        std::span<const std::byte> page(bounce.data() + p, kPage);
        if (!snapshot::is_all_zero(page)) std::memcpy(here + p, page.data(), kPage);
      }
    }
  }
  return ok_status();
}


Status ProcessMirror::refresh_part(std::span<const AddressRange> pages) const {
  // Written pages come scattered: up to IOV_MAX of them per process_vm_readv, not one call each
  // (a pause's refresh of thousands of runs costs milliseconds otherwise).
  constexpr size_t kBatch = 1024;
  std::vector<iovec> iov;
  iov.reserve(kBatch);
  for (size_t i = 0; i < pages.size();) {
    iov.clear();
    size_t bytes = 0;
    const size_t first = i;
    for (; i < pages.size() && iov.size() < kBatch && pages[i].length <= kPiece; ++i) {
      iov.push_back({reinterpret_cast<void*>(pages[i].start), pages[i].length});
      bytes += pages[i].length;
    }
    if (iov.empty()) {  // one long run: in pieces
      LAZYMEM_TRY(copy_exact(pages[i].start, pages[i].length));
      ++i;
      continue;
    }
    // The same addresses on both sides: the mirror is where the process has them.
    const ssize_t got = ::process_vm_readv(pid_, iov.data(), iov.size(), iov.data(), iov.size(), 0);
    if (got == static_cast<ssize_t>(bytes)) continue;
    // Short or failed: run by run, for an error that names the range.
    for (size_t j = first; j < i; ++j) LAZYMEM_TRY(copy_exact(pages[j].start, pages[j].length));
  }
  return ok_status();
}

Status ProcessMirror::refresh(std::span<const AddressRange> pages) {
  // In a pause, the process is stopped and its cores idle: copying out of it (about 2.5 GB/s per
  // core, the kernel pinning each page) is split in two halves by bytes above a few MiB.
  size_t total = 0;
  for (const AddressRange& r : pages) total += r.length;
  if (total < (8u << 20) || pages.size() < 2 || std::thread::hardware_concurrency() < 2) return refresh_part(pages);
  size_t half = 0, at = 0;
  while (at + 1 < pages.size() && half < total / 2) half += pages[at++].length;
  Status second = ok_status();
  std::thread helper([&] { second = refresh_part(pages.subspan(at)); });
  Status first = refresh_part(pages.first(at));
  helper.join();
  LAZYMEM_TRY(first);
  return second;
}

void ProcessMirror::drop(uintptr_t start, size_t length) {
  // Only ever the mirror's own pages, whatever the caller asks.
  for (const sys::Mapping& m : mappings_) {
    const uintptr_t from = std::max(start, m.address()), to = std::min(start + length, m.address() + m.size());
    if (from < to) ::madvise(reinterpret_cast<void*>(from), to - from, MADV_DONTNEED);
  }
}

}  // namespace lazymem
