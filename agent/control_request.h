// The agent's control requests (agent.capnp Request), decoded into plain values: every field
// read, and checked, before the daemon acts on any. A request comes from a local user who may
// be hostile (the socket's --group): the daemon (root) gets a well-formed request or the reason
// to refuse it, never a Cap'n Proto reader that might throw half-way through acting on it.
#pragma once

#include <cstdint>
#include <string>
#include <variant>
#include <vector>

#include "fault/address_map.h"
#include "lazymem/result.h"
#include "net/frame.h"

namespace lazymem::agent {

// Restore: serve the uffd sent along (SCM_RIGHTS) by these ranges.
struct RestoreRequest {
  std::string snapshot;  // absolute store path, or lazymem:// location
  std::string token_file;  // absolute, or empty
  std::vector<fault::MappedRange> ranges;  // passed check_range_table
  bool prefetch = true;
  uint64_t uffd_features = 0;
  uint64_t manifest_checksum = 0;  // 0: not checked
  bool announces_failures = false;
  std::string base;  // absolute store path, lazymem:// location, or empty
};

// ServeFirecracker: a per-VM handshake socket.
struct ServeFirecrackerRequest {
  std::string socket_path;  // absolute
  std::string snapshot;
  std::string token_file;
  bool prefetch = true;
  bool cancel_on_close = false;
};

struct StatusRequest {
  bool with_stats = false;  // `stats` rather than `status`
};

struct WaitChangeRequest {
  uint64_t after_generation = 0;
};

struct FailureSeenRequest {
  uint64_t session = 0;
};

struct FetchRestRequest {
  uint64_t session = 0;
};

// A request kind this agent does not know (a newer client).
struct UnknownRequest {};

using ControlRequestBody = std::variant<RestoreRequest, ServeFirecrackerRequest, StatusRequest, WaitChangeRequest,
                                        FailureSeenRequest, FetchRestRequest, UnknownRequest>;

struct ControlRequest {
  uint64_t id = 0;  // what the reply answers (0 when not even that could be read)
  // What was asked, or why it is refused: malformed (Cap'n Proto could not read it) or checked
  // and found wrong (relative paths, a NUL in a path, a bad range table).
  Result<ControlRequestBody> body{UnknownRequest{}};
};

// Decodes `header` as an agent Request. Never throws.
ControlRequest decode_control_request(net::Header& header);

}  // namespace lazymem::agent
