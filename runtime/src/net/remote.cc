// Page-server access for the runtime: lazymem:// sources and manifests.
#include "net/remote.h"

#include "net/auth.h"
#include "net/client.h"

namespace lazymem::net {

Result<std::shared_ptr<snapshot::ChunkSource>> open_remote_source(const SnapshotLocation& loc, const RemoteOptions& options) {
  LAZYMEM_ASSIGN_OR_RETURN(auto src, RemoteSource::open(loc, options));
  return std::shared_ptr<snapshot::ChunkSource>(std::move(src));
}

Result<std::unique_ptr<snapshot::SnapshotSink>> open_remote_sink(const SnapshotLocation& loc, const CaptureOptions& options) {
  std::string token;
  if (!options.token_file.empty()) {
    LAZYMEM_ASSIGN_OR_RETURN(token, read_token_file(options.token_file));
  }
  return open_upload(loc, token, options.replace, std::chrono::seconds(60));
}

Result<Manifest> read_remote_manifest(const SnapshotLocation& loc, const std::string& token_file) {
  RemoteOptions o;
  if (!token_file.empty()) {
    LAZYMEM_ASSIGN_OR_RETURN(o.token, read_token_file(token_file));
  }
  LAZYMEM_ASSIGN_OR_RETURN(auto src, RemoteSource::open(loc, o));
  return src->manifest();
}

}  // namespace lazymem::net
