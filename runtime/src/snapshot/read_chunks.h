// Streams a list of chunks through a ChunkReader, keeping it as full as its capacity allows:
// what an eager restore and a verification both do with every stored chunk of a snapshot.
#pragma once

#include <chrono>
#include <functional>
#include <span>

#include "lazymem/result.h"
#include "snapshot/chunk_source.h"

namespace lazymem::snapshot {

// Reads `refs` through `reader`; the sink's tags are indexes into `refs`. Returns early (ok)
// when stop() says so after a batch of completions; an error means the reader broke, or
// (kTimeout) nothing came for `stalled_after` while requests were out: a source that stopped
// answering without closing (a lazy restore has its fault deadline; this has no fault).
Status read_chunks(ChunkReader& reader, std::span<const ChunkRef> refs, ChunkSink& sink,
                   std::chrono::milliseconds stalled_after, const std::function<bool()>& stop = {});

// Every chunk of `m` that stores something (zero chunks do not), in order.
std::vector<ChunkRef> stored_chunks(const Manifest& m);

}  // namespace lazymem::snapshot
