// Opens the chunk source behind a snapshot location (local store or page server).
#pragma once

#include <memory>
#include <string>

#include "lazymem/restore.h"
#include "lazymem/result.h"
#include "snapshot/chunk_source.h"

namespace lazymem {

Result<std::shared_ptr<snapshot::ChunkSource>> open_chunk_source(const std::string& location,
                                                                 const RestoreOptions& options);

}  // namespace lazymem
