// verify_snapshot: every stored chunk of a snapshot read and checked, as a restore would.
#include <fmt/format.h>

#include <algorithm>
#include <optional>
#include <utility>

#include "lazymem/restore.h"
#include "lazymem/snapshot.h"
#include "snapshot/chunk_codec.h"
#include "snapshot/read_chunks.h"
#include "source.h"
#include "sys/clock.h"

namespace lazymem {

Result<VerifyReport> verify_snapshot(const std::string& location, const std::string& token_file,
                                     std::chrono::milliseconds stalled_after) {
  const int64_t start = sys::monotonic_ns();
  RestoreOptions options;
  options.token_file = token_file;
  options.fault_deadline = stalled_after;  // also how long the page-server reader waits per poll
  LAZYMEM_ASSIGN_OR_RETURN(auto source, open_chunk_source(location, options));
  const Manifest& m = source->manifest();
  LAZYMEM_ASSIGN_OR_RETURN(auto dict, source->dictionary());
  LAZYMEM_ASSIGN_OR_RETURN(auto reader, source->open_reader());

  // Decodes each chunk into one scratch buffer: decode() checks the chunk's checksum (and a
  // page-frame chunk's stored checksum and frames) on the way.
  struct Sink final : snapshot::ChunkSink {
    const Manifest* m = nullptr;
    const ZSTD_DDict* dict = nullptr;
    std::vector<snapshot::ChunkRef> refs;
    std::vector<std::byte> out;
    snapshot::ChunkDecoder decoder;
    VerifyReport report;
    std::vector<std::pair<uint64_t, std::string>> found;  // by tag: chunks complete in any order
    void damaged(uint64_t tag, const std::string& why) {
      const snapshot::ChunkRef ref = refs[tag];
      found.emplace_back(tag, fmt::format("region '{}' chunk {} (bytes {:#x}..): {}", m->regions[ref.region].name,
                                          ref.chunk, uint64_t{ref.chunk} * m->chunk_size, why));
    }
    void on_chunk(uint64_t tag, std::span<const std::byte> stored) override {
      const snapshot::ChunkRef ref = refs[tag];
      const RegionInfo& r = m->regions[ref.region];
      std::span<std::byte> to(out.data(), m->chunk_length(ref.region, ref.chunk));
      Status s = decoder.decode(r.chunks[ref.chunk], stored, to, snapshot::ChunkLayout{r.page_size, dict});
      ++report.chunks;
      report.stored_bytes += stored.size();
      report.bytes += to.size();
      if (!s.ok()) damaged(tag, s.error().message());
    }
    // Damage is counted; anything else (the server gone, the snapshot removed meanwhile) ends
    // the check: it says nothing about the chunks.
    void on_chunk_error(uint64_t tag, const Error& e) override {
      if (e.code() != Errc::kCorrupt) {
        if (!failed) failed = e;
        return;
      }
      ++report.chunks;
      damaged(tag, e.message());
    }
    std::optional<Error> failed;
  } sink;
  sink.m = &m;
  sink.dict = dict ? dict->get() : nullptr;
  sink.refs = snapshot::stored_chunks(m);
  sink.out.resize(m.chunk_size);
  LAZYMEM_TRY(snapshot::read_chunks(*reader, sink.refs, sink, stalled_after, [&] { return sink.failed.has_value(); }));
  if (sink.failed) return sink.failed->wrap(fmt::format("{}: verification stopped", location));
  std::sort(sink.found.begin(), sink.found.end());  // in the snapshot's order (tags are refs' indices)
  for (auto& [tag, line] : sink.found) sink.report.damaged.push_back(std::move(line));
  sink.report.seconds = static_cast<double>(sys::monotonic_ns() - start) / 1e9;
  return std::move(sink.report);
}

}  // namespace lazymem
