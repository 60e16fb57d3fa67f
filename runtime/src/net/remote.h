// Page-server access for the runtime: remote chunk sources, remote snapshot sinks, manifests.
#pragma once

#include <memory>
#include <string>

#include "lazymem/restore.h"
#include "lazymem/result.h"
#include "lazymem/snapshot.h"
#include "snapshot/chunk_source.h"
#include "snapshot/store.h"

namespace lazymem::net {

struct RemoteOptions {
  std::string token;  // the page servers' token, read already (empty: none)
  unsigned reads_in_flight = 64;
  unsigned fetch_attempts = 3;
  std::chrono::milliseconds deadline{30000};
};

Result<std::shared_ptr<snapshot::ChunkSource>> open_remote_source(const SnapshotLocation& loc, const RemoteOptions& options);
Result<std::unique_ptr<snapshot::SnapshotSink>> open_remote_sink(const SnapshotLocation& loc, const CaptureOptions& options);
Result<Manifest> read_remote_manifest(const SnapshotLocation& loc, const std::string& token_file);

}  // namespace lazymem::net
