// Page-server access for the runtime. The client lands with the page server (issue 3); until
// then lazymem:// locations are refused with a clear message.
#include "net/remote.h"

namespace lazymem::net {
namespace {

Error not_yet(const SnapshotLocation& loc) {
  return Error(Errc::kUnsupported, loc.to_string() + ": this build has no page-server client yet; use a local store path");
}

}  // namespace

Result<std::shared_ptr<snapshot::ChunkSource>> open_remote_source(const SnapshotLocation& loc, const RemoteOptions&) {
  return not_yet(loc);
}
Result<std::unique_ptr<snapshot::SnapshotSink>> open_remote_sink(const SnapshotLocation& loc, const CaptureOptions&) {
  return not_yet(loc);
}
Result<Manifest> read_remote_manifest(const SnapshotLocation& loc, const std::string&) { return not_yet(loc); }

}  // namespace lazymem::net
