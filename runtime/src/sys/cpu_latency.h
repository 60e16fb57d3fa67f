// CpuLatencyHold: asks the kernel to keep CPUs out of idle states that take long to leave
// (a PM QoS CPU latency request of 0 µs, through /dev/cpu_dma_latency), while it is held.
//
// Why: a fault is served by a chain of wake-ups (faulting thread -> engine -> source -> engine
// -> faulting thread). Each one that lands on an idle CPU pays that CPU's exit latency; on VMs a
// halted vCPU costs tens of µs to wake. Measured with bench/remote (256 MiB, same machine):
// fault p50 ~250 -> ~120 µs and remote touch-all ~255 -> ~190 ms with the request held. The
// engine holds it only while some session still has pages to fetch, so an idle host keeps its
// power savings. Needs root (the device is 0600); without it, nothing changes.
//
// Thread-safety: one owner.
#pragma once

#include "sys/unique_fd.h"

namespace lazymem::sys {

class CpuLatencyHold {
 public:
  // Takes the hold (true) or gives it up (false); returns whether it is held now.
  bool set(bool on);
  bool held() const { return fd_.valid(); }

 private:
  UniqueFd fd_;
  bool unavailable_ = false;  // not permitted or no such device: not asked again
};

}  // namespace lazymem::sys
