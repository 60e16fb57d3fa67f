// The agent daemon: one per host. Accepts uffds (with their region tables) from processes
// that restore through it, and Firecracker's UFFD handshake, and resolves all their faults
// with one FaultEngine (one thread) — the same engine as in-process mode.
//
// Thread-safety: run() on one thread; stop() from any thread (or a signal handler).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <memory>
#include <string>

#include "fault/fault_engine.h"
#include "lazymem/kernel_features.h"
#include "lazymem/result.h"

namespace lazymem::agent {

struct DaemonOptions {
  std::string socket_path;             // control + hand-over socket (created 0600)
  gid_t socket_group = static_cast<gid_t>(-1);  // if set: socket is 0660 with this group
  std::string firecracker_socket;      // optional: Firecracker UFFD handshake socket
  std::string firecracker_snapshot;    // the snapshot (of the VM's memory file) it serves
  // Page-server token for firecracker_snapshot. Requests (processes, `lazymem-agent restore`)
  // name their own: the agent does not lend its token to its clients.
  std::string token_file;
  std::string metrics_address;         // optional HOST:PORT: Prometheus text exposition
  // A client told of a failure has this long to say so (failureSeen) before its failed pages are
  // poisoned anyway: its faulting threads wait meanwhile, and a client that never answers (stuck
  // writing to its stderr, say) must not leave them waiting for good.
  std::chrono::milliseconds failure_notice{1000};
  fault::EngineOptions engine;
};

class Daemon {
 public:
  static Result<std::unique_ptr<Daemon>> start(const DaemonOptions& options, const KernelFeatures& features);
  ~Daemon();
  Status run();
  void stop();

  struct Impl;

 private:
  Daemon() = default;
  std::unique_ptr<Impl> impl_;
};

}  // namespace lazymem::agent
