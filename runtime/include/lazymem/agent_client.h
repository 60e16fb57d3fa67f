// Restoring through lazymem-agent: this process maps the snapshot's regions, creates and
// registers the userfaultfd, and hands it to the agent, which then resolves the faults.
//
// If the agent dies before the restore is complete, a watchdog thread here poisons every page
// still missing (accesses raise SIGBUS) rather than let the kernel zero-fill them or leave a
// thread waiting forever.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "lazymem/restore.h"
#include "lazymem/result.h"

namespace lazymem {

constexpr const char* kDefaultAgentSocket = "/run/lazymem/agent.sock";

struct AgentRestoreOptions {
  bool prefetch = true;
  std::string token_file;  // for lazymem:// snapshots; read by the agent
  std::string base;        // RestoreOptions::base (a migration's pre-copy); read by the agent
};

class AgentRestore {
 public:
  // Relative paths (a store path in `location`, the token file) are this process's: they go to
  // the agent made absolute.
  static Result<std::unique_ptr<AgentRestore>> start(const std::string& socket_path, const std::string& location,
                                                     const AgentRestoreOptions& options = {});
  // The agent keeps serving the memory after this object is gone (until the restore completes
  // or the process exits).
  ~AgentRestore();

  const std::vector<RestoredRegion>& regions() const;
  const RestoredRegion* region(std::string_view name) const;
  const std::vector<std::byte>& app_state() const;
  // Waits until the agent reports every page present (ok), a failure, or its own death.
  Status wait_complete(std::chrono::milliseconds timeout = std::chrono::hours(24));

  struct Impl;

 private:
  // Shared with the watchdog thread, which outlives this object while the restore runs.
  explicit AgentRestore(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

// Serving a Firecracker VM's memory: the agent makes a handshake socket for one VM restore
// (Firecracker's mem_backend {"backend_type": "Uffd", "backend_path": socket_path}) and serves
// the guest memory from a raw memory-file snapshot once Firecracker has connected.
struct FirecrackerServeOptions {
  std::string socket_path;  // created by the agent, 0600, owned by the caller (in a directory it owns)
  std::string snapshot;     // STORE/NAME or lazymem://HOST:PORT/NAME of the VM's memory file
  std::string token_file;   // for lazymem:// snapshots; read by the agent
  bool prefetch = true;
  // Destroying the AgentFirecrackerServe before Firecracker has connected withdraws the socket
  // (the agent closes and removes it). False: it waits for its handshake regardless.
  bool cancel_on_close = true;
};

// Holds the control connection on which the agent reports on one Firecracker restore. Relative
// paths in the options are the caller's: they go to the agent made absolute.
class AgentFirecrackerServe {
 public:
  // Returns once the handshake socket listens (Firecracker may be started then).
  static Result<std::unique_ptr<AgentFirecrackerServe>> start(const std::string& agent_socket,
                                                              const FirecrackerServeOptions& options);
  ~AgentFirecrackerServe();
  // The agent's session id for the VM, once Firecracker's handshake has been accepted (0 before).
  uint64_t session() const;
  // Waits for the next report: handshake accepted (ok, session() set), every page present (ok,
  // complete() true), the VM gone before that (ok, exited() true), or a failure (handshake
  // refused, pages that could not be had, agent gone). kTimeout if nothing came within `timeout`.
  Status wait_event(std::chrono::milliseconds timeout);
  bool complete() const;
  bool exited() const;

  struct Impl;

 private:
  explicit AgentFirecrackerServe(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Asks a running agent for its status or stats (JSON text).
Result<std::string> agent_query(const std::string& socket_path, bool stats);
// Waits until the agent's status differs from the one whose "generation" was `after` (a
// session appeared, completed, failed or ended) and returns the new status; kTimeout if
// nothing changed within `timeout`.
Result<std::string> agent_wait_change(const std::string& socket_path, uint64_t after, std::chrono::milliseconds timeout);

}  // namespace lazymem
