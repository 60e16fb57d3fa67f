// Opens the chunk source behind a snapshot location (local store or page server).
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "lazymem/restore.h"
#include "lazymem/result.h"
#include "snapshot/chunk_source.h"
#include "snapshot/snapshot_reader.h"

namespace lazymem {

// By path: a local snapshot's files, and a page server's token from options.token_file.
Result<std::shared_ptr<snapshot::ChunkSource>> open_chunk_source(const std::string& location,
                                                                 const RestoreOptions& options);

// A location with what it is read through opened already: a local store's snapshot files (a
// page server's location needs none).
struct OpenedLocation {
  std::string location;
  std::optional<snapshot::SnapshotFiles> files;
};

// The same, from what the caller opened: nothing is opened by path (the agent opens the files
// as the user it reads for). `base` is options.base's, opened (options.base and
// options.token_file are not read); `token`, the page servers' (empty: none).
Result<std::shared_ptr<snapshot::ChunkSource>> open_chunk_source(OpenedLocation primary, std::optional<OpenedLocation> base,
                                                                 const std::string& token, const RestoreOptions& options);

// By path: the local snapshots' files of `location` and of `base` (empty: none) opened, for the
// overload above.
struct OpenedLocations {
  OpenedLocation primary;
  std::optional<OpenedLocation> base;
};
Result<OpenedLocations> open_locations(const std::string& location, const std::string& base, bool direct_io);

}  // namespace lazymem
