// CpuLatencyHold: a PM QoS CPU latency request held through /dev/cpu_dma_latency.
#include "sys/cpu_latency.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstdint>

namespace lazymem::sys {

bool CpuLatencyHold::set(bool on) {
  if (!on) {
    fd_.reset();  // closing the file drops the request
    return false;
  }
  if (fd_.valid() || unavailable_) return fd_.valid();
  UniqueFd fd(::open("/dev/cpu_dma_latency", O_WRONLY | O_CLOEXEC));
  int32_t zero_us = 0;
  if (!fd.valid() || ::write(fd.get(), &zero_us, sizeof zero_us) != sizeof zero_us) {
    unavailable_ = true;
    return false;
  }
  fd_ = std::move(fd);
  return true;
}

}  // namespace lazymem::sys
