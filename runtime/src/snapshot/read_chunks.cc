// Streams a list of chunks through a ChunkReader (see read_chunks.h).
#include "snapshot/read_chunks.h"

#include <fmt/format.h>

#include <vector>

namespace lazymem::snapshot {

Status read_chunks(ChunkReader& reader, std::span<const ChunkRef> refs, ChunkSink& sink,
                   std::chrono::milliseconds stalled_after, const std::function<bool()>& stop) {
  size_t next = 0;
  auto last_progress = std::chrono::steady_clock::now();
  std::vector<ChunkRequest> batch;
  while (next < refs.size() || reader.in_flight() > 0) {
    batch.clear();
    while (next < refs.size() && batch.size() + reader.in_flight() < reader.capacity()) {
      batch.push_back(ChunkRequest{refs[next], next, false});
      ++next;
    }
    if (!batch.empty()) LAZYMEM_TRY(reader.submit(batch));
    auto n = reader.poll(sink, true, reader.capacity());
    if (!n.ok()) return std::move(n).error();
    const auto now = std::chrono::steady_clock::now();
    if (*n > 0 || reader.in_flight() == 0) {
      last_progress = now;
    } else if (now - last_progress >= stalled_after) {
      return Error(Errc::kTimeout, fmt::format("{} chunk requests unanswered for {} ms: the source stopped answering",
                                               reader.in_flight(), stalled_after.count()));
    }
    if (stop && stop()) return ok_status();
  }
  return ok_status();
}

std::vector<ChunkRef> stored_chunks(const Manifest& m) {
  std::vector<ChunkRef> refs;
  for (size_t r = 0; r < m.regions.size(); ++r)
    for (size_t c = 0; c < m.regions[r].chunks.size(); ++c)
      if (m.regions[r].chunks[c].codec != Codec::kZero) {
        refs.push_back(ChunkRef{static_cast<uint32_t>(r), static_cast<uint32_t>(c)});
      }
  return refs;
}

}  // namespace lazymem::snapshot
