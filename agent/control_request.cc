// The agent's control requests, decoded and checked.
#include "control_request.h"

#include <fmt/format.h>

#include "agent.capnp.h"
#include "lazymem/snapshot.h"
#include "range_table.h"

namespace lazymem::agent {
namespace pa = proto::agent;
namespace {

// A path is handed to the kernel as a C string: one with a NUL in it would be checked as one
// file and opened as another (everything before the NUL).
Result<std::string> path_field(const char* what, capnp::Text::Reader text) {
  std::string s(text.begin(), text.size());
  if (s.find('\0') != std::string::npos) return Error(Errc::kInvalidArgument, fmt::format("{} holds a NUL byte", what));
  return s;
}

// Paths in a request are the client's, and the agent cannot know which directory a relative one
// was meant in: taken here it would name another file (another snapshot's pages served for the
// client's manifest). Clients send them absolute; an older client's relative path is refused.
Status require_absolute(const char* what, const std::string& path) {
  if (path.empty() || path.front() == '/') return ok_status();
  return Error(Errc::kInvalidArgument, fmt::format("{} '{}' is relative: lazymem-agent runs in a directory of its own and "
                                                   "cannot tell which one it meant; give it absolute (an up-to-date "
                                                   "lazymem client does)",
                                                   what, path));
}

Status require_absolute_location(const std::string& location) {
  LAZYMEM_ASSIGN_OR_RETURN(SnapshotLocation loc, SnapshotLocation::parse(location));
  return loc.remote() ? ok_status() : require_absolute("snapshot path", location);
}

Result<ControlRequestBody> decode_restore(pa::Restore::Reader r) {
  RestoreRequest out;
  // Counted before anything is made of them: a list of empty elements costs the peer no bytes
  // (Cap'n Proto reads each as an all-zero range), only the reader's traversal limit bounds it.
  auto ranges = r.getRanges();
  if (ranges.size() > kMaxRanges) {
    return Error(Errc::kInvalidArgument, fmt::format("{} ranges; at most {} are served per session", ranges.size(), kMaxRanges));
  }
  LAZYMEM_ASSIGN_OR_RETURN(out.snapshot, path_field("snapshot location", r.getSnapshot()));
  LAZYMEM_ASSIGN_OR_RETURN(out.token_file, path_field("token file", r.getTokenFile()));
  LAZYMEM_TRY(require_absolute_location(out.snapshot));
  LAZYMEM_TRY(require_absolute("token file", out.token_file));
  LAZYMEM_ASSIGN_OR_RETURN(out.base, path_field("base location", r.getBase()));
  if (!out.base.empty()) LAZYMEM_TRY(require_absolute_location(out.base));
  out.ranges.reserve(ranges.size());
  for (auto m : ranges) out.ranges.push_back({m.getStart(), m.getLength(), m.getRegion(), m.getRegionOffset()});
  LAZYMEM_TRY(check_range_table(out.ranges));
  out.prefetch = r.getPrefetch();
  out.uffd_features = r.getUffdFeatures();
  out.manifest_checksum = r.getManifestChecksum();
  out.announces_failures = r.getAnnouncesFailures();
  return ControlRequestBody(std::move(out));
}

Result<ControlRequestBody> decode_serve_firecracker(pa::ServeFirecracker::Reader r) {
  ServeFirecrackerRequest out;
  LAZYMEM_ASSIGN_OR_RETURN(out.socket_path, path_field("socket path", r.getSocketPath()));
  LAZYMEM_ASSIGN_OR_RETURN(out.snapshot, path_field("snapshot location", r.getSnapshot()));
  LAZYMEM_ASSIGN_OR_RETURN(out.token_file, path_field("token file", r.getTokenFile()));
  if (out.socket_path.empty() || out.snapshot.empty()) return Error(Errc::kInvalidArgument, "need a socket path and a snapshot");
  LAZYMEM_TRY(require_absolute("socket path", out.socket_path));
  LAZYMEM_TRY(require_absolute_location(out.snapshot));
  LAZYMEM_TRY(require_absolute("token file", out.token_file));
  out.prefetch = r.getPrefetch();
  out.cancel_on_close = r.getCancelOnClose();
  return ControlRequestBody(std::move(out));
}

Result<ControlRequestBody> decode_body(pa::Request::Reader rq) {
  switch (rq.which()) {
    case pa::Request::RESTORE: return decode_restore(rq.getRestore());
    case pa::Request::SERVE_FIRECRACKER: return decode_serve_firecracker(rq.getServeFirecracker());
    case pa::Request::STATUS: return ControlRequestBody(StatusRequest{false});
    case pa::Request::STATS: return ControlRequestBody(StatusRequest{true});
    case pa::Request::WAIT_CHANGE: return ControlRequestBody(WaitChangeRequest{rq.getWaitChange()});
    case pa::Request::FAILURE_SEEN: return ControlRequestBody(FailureSeenRequest{rq.getFailureSeen()});
    case pa::Request::FETCH_REST: return ControlRequestBody(FetchRestRequest{rq.getFetchRest()});
  }
  return ControlRequestBody(UnknownRequest{});
}

}  // namespace

ControlRequest decode_control_request(net::Header& header) {
  ControlRequest out;
  try {
    auto rq = header.root<pa::Request>();
    out.id = rq.getId();
    out.body = decode_body(rq);
  } catch (const kj::Exception& e) {
    out.body = Error(Errc::kProtocol, fmt::format("malformed request: {}", e.getDescription().cStr()));
  }
  return out;
}

}  // namespace lazymem::agent
