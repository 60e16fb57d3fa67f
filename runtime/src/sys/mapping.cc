// Mapping: owns one mmap()ed range and unmaps it exactly once.
#include "sys/mapping.h"

#include <fmt/format.h>

#include <cerrno>

namespace lazymem::sys {

#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000  // Linux 4.17
#endif

void Mapping::reset() {
  if (addr_ != nullptr) ::munmap(addr_, length_);
  addr_ = nullptr;
  length_ = 0;
}

Result<Mapping> Mapping::anonymous(size_t length, int prot) {
  void* p = ::mmap(nullptr, length, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return sys_error(fmt::format("mmap of {} bytes of anonymous memory", length), errno);
  return Mapping(p, length);
}

namespace {

Result<Mapping> map_at(uintptr_t addr, size_t length, int prot, int flags, uint64_t huge) {
  void* want = reinterpret_cast<void*>(addr);
  void* p = ::mmap(want, length, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE | flags, -1, 0);
  if (p == MAP_FAILED) {
    int e = errno;
    if (huge != 0 && e == ENOMEM) {
      return Error(Errc::kUnsupported,
                   fmt::format("{} huge pages of {} KiB for {:#x}-{:#x} are not free: raise that pool "
                               "(/sys/kernel/mm/hugepages/hugepages-{}kB/nr_hugepages, or nr_overcommit_hugepages "
                               "there), or restore on ordinary pages",
                               length / huge, huge >> 10, addr, addr + length, huge >> 10),
                   e);
    }
    if (e == EEXIST) {
      return Error(Errc::kExists,
                   fmt::format("address range {:#x}-{:#x} is already mapped in this process; restore into a "
                               "fresh process, or unmap what is there first",
                               addr, addr + length),
                   e);
    }
    return sys_error(fmt::format("mmap at {:#x} ({} bytes{})", addr, length,
                                 huge != 0 ? fmt::format(", {} KiB huge pages", huge >> 10) : ""),
                     e);
  }
  if (p != want) {
    // Kernels before 4.17 ignore MAP_FIXED_NOREPLACE and treat it as a hint.
    ::munmap(p, length);
    return Error(Errc::kExists, fmt::format("address range {:#x}-{:#x} could not be mapped at its recorded address",
                                            addr, addr + length));
  }
  return Mapping(p, length);
}

}  // namespace

Result<Mapping> Mapping::anonymous_at(uintptr_t addr, size_t length, int prot) {
  return map_at(addr, length, prot, MAP_NORESERVE, 0);
}

Result<Mapping> Mapping::huge_at(uintptr_t addr, size_t length, int prot, uint64_t page_size) {
  const int shift = __builtin_ctzll(page_size);
  return map_at(addr, length, prot, MAP_HUGETLB | (shift << MAP_HUGE_SHIFT), page_size);
}

Result<Mapping> Mapping::file_readonly(int fd, size_t length) {
  if (length == 0) return Mapping();
  void* p = ::mmap(nullptr, length, PROT_READ, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return sys_error(fmt::format("mmap of a {}-byte file", length), errno);
  return Mapping(p, length);
}

}  // namespace lazymem::sys
