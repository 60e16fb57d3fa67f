// RoutedSource: a snapshot read from two places. `primary` is the snapshot itself; `base` an
// earlier version of it that lies nearer (a pre-copy image on the destination host's page server
// or store). A chunk whose entry is the same in both manifests (codec, place, length, checksums:
// the newer manifest was made from the older one and kept the entry because the chunk did not
// change) is read from the base; every other chunk from the primary.
//
// What a post-copy migration restores from: the primary is the paused source process serving the
// chunks written since pre-copy (MigrationSource), the base the chunks pre-copied before it.
#pragma once

#include <memory>
#include <vector>

#include "lazymem/result.h"
#include "snapshot/chunk_source.h"

namespace lazymem::snapshot {

class RoutedSource final : public ChunkSource {
 public:
  // Fails, naming the first difference, unless the two describe the same memory: chunk size,
  // regions (name, address, length, page size, kind), and the dictionary where a chunk read from
  // the base needs it.
  static Result<std::shared_ptr<RoutedSource>> open(std::shared_ptr<ChunkSource> primary, std::shared_ptr<ChunkSource> base);

  const Manifest& manifest() const override { return primary_->manifest(); }
  Result<std::unique_ptr<ChunkReader>> open_reader() override;
  std::string describe() const override;
  Result<std::unique_ptr<PageFetcher>> open_page_fetcher() override {
    return Error(Errc::kUnsupported, describe() + ": faults on the faulting thread (fault_on_thread) are not supported "
                                                  "with a base; restore without fault_on_thread");
  }

  bool from_base(ChunkRef ref) const { return from_base_[ref.region][ref.chunk]; }
  uint64_t chunks_from_base() const { return chunks_from_base_; }

 private:
  RoutedSource(std::shared_ptr<ChunkSource> primary, std::shared_ptr<ChunkSource> base)
      : primary_(std::move(primary)), base_(std::move(base)) {}
  std::shared_ptr<ChunkSource> primary_, base_;
  std::vector<std::vector<bool>> from_base_;  // per region and chunk
  uint64_t chunks_from_base_ = 0;
};

}  // namespace lazymem::snapshot
