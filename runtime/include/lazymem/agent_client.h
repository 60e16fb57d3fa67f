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
};

class AgentRestore {
 public:
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

// Asks a running agent for its status or stats (JSON text).
Result<std::string> agent_query(const std::string& socket_path, bool stats);

}  // namespace lazymem
