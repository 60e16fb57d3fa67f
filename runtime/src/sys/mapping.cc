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

Result<Mapping> Mapping::anonymous_at(uintptr_t addr, size_t length, int prot) {
  void* want = reinterpret_cast<void*>(addr);
  void* p = ::mmap(want, length, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE, -1, 0);
  if (p == MAP_FAILED) {
    int e = errno;
    if (e == EEXIST) {
      return Error(Errc::kExists,
                   fmt::format("address range {:#x}-{:#x} is already mapped in this process; restore into a "
                               "fresh process, or unmap what is there first",
                               addr, addr + length),
                   e);
    }
    return sys_error(fmt::format("mmap at {:#x} ({} bytes)", addr, length), e);
  }
  if (p != want) {
    // Kernels before 4.17 ignore MAP_FIXED_NOREPLACE and treat it as a hint.
    ::munmap(p, length);
    return Error(Errc::kExists, fmt::format("address range {:#x}-{:#x} could not be mapped at its recorded address",
                                            addr, addr + length));
  }
  return Mapping(p, length);
}

Result<Mapping> Mapping::file_readonly(int fd, size_t length) {
  if (length == 0) return Mapping();
  void* p = ::mmap(nullptr, length, PROT_READ, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return sys_error(fmt::format("mmap of a {}-byte file", length), errno);
  return Mapping(p, length);
}

}  // namespace lazymem::sys
