// The monotonic clock in nanoseconds: the unit of every deadline on the fault path.
#pragma once

#include <time.h>

#include <cstdint>

namespace lazymem::sys {

// Safe in a signal handler: clock_gettime is async-signal-safe (and a vDSO read, no syscall).
inline int64_t monotonic_ns() noexcept {
  timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t{ts.tv_sec} * 1000000000 + ts.tv_nsec;
}

}  // namespace lazymem::sys
