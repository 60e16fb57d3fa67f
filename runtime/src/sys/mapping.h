// Mapping: owns one mmap()ed range and unmaps it exactly once.
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <utility>

#include "lazymem/result.h"

namespace lazymem::sys {

class Mapping {
 public:
  Mapping() = default;
  Mapping(void* addr, size_t length) : addr_(addr), length_(length) {}
  ~Mapping() { reset(); }
  Mapping(Mapping&& o) noexcept : addr_(std::exchange(o.addr_, nullptr)), length_(std::exchange(o.length_, 0)) {}
  Mapping& operator=(Mapping&& o) noexcept {
    if (this != &o) {
      reset();
      addr_ = std::exchange(o.addr_, nullptr);
      length_ = std::exchange(o.length_, 0);
    }
    return *this;
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;

  // Private anonymous memory anywhere.
  static Result<Mapping> anonymous(size_t length, int prot = PROT_READ | PROT_WRITE);
  // Private anonymous memory exactly at `addr`; kExists if any of the range is already mapped.
  static Result<Mapping> anonymous_at(uintptr_t addr, size_t length, int prot);
  // The same on huge pages of `page_size` (hugetlbfs), reserved now: kNoSpace where the pool
  // does not hold enough (kUnsupported), rather than a SIGBUS at some later fault.
  static Result<Mapping> huge_at(uintptr_t addr, size_t length, int prot, uint64_t page_size);
  // A read-only shared view of a file.
  static Result<Mapping> file_readonly(int fd, size_t length);

  std::byte* data() const { return static_cast<std::byte*>(addr_); }
  uintptr_t address() const { return reinterpret_cast<uintptr_t>(addr_); }
  size_t size() const { return length_; }
  std::span<std::byte> bytes() const { return {data(), length_}; }
  // Gives up ownership: the range stays mapped.
  void release() {
    addr_ = nullptr;
    length_ = 0;
  }
  void reset();

 private:
  void* addr_ = nullptr;
  size_t length_ = 0;
};

}  // namespace lazymem::sys
