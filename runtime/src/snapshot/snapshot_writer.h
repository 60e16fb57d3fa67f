// SnapshotWriter: turns memory into a snapshot: chunks, zero detection, zstd on every core,
// checksums, then an atomic commit of data and manifest to a sink (local store or page server).
//
// Thread-safety: one thread calls the writer; it runs its own compression threads inside.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "lazymem/result.h"
#include "lazymem/snapshot.h"
#include "snapshot/chunk_codec.h"
#include "snapshot/store.h"

namespace lazymem::snapshot {

class SnapshotWriter {
 public:
  // Called after each batch of chunks with (bytes done, bytes total of this region).
  using Progress = std::function<void(uint64_t done, uint64_t total)>;

  SnapshotWriter(std::unique_ptr<SnapshotSink> sink, const CaptureOptions& options);

  // Format v2: trains the snapshot's dictionary on a sample of every region to be added (call
  // before the first add_region; without it pages are compressed without a dictionary).
  Status train(std::span<const std::span<const std::byte>> regions, uint32_t page_size);

  // Adds one region. `meta.chunks` is filled in here; `bytes` must stay readable during the call.
  Status add_region(RegionInfo meta, std::span<const std::byte> bytes, const Progress& progress = {});

  // Stores chunks `chunks` (sorted indexes) of region `region` (in add_region order) again from
  // `bytes`, its memory now: a live capture's pages written since they were stored. The new
  // versions are appended and the manifest points at them; the old ones stay in the data file,
  // unreferenced (CaptureReport::superseded_bytes).
  Status recapture(size_t region, std::span<const size_t> chunks, std::span<const std::byte> bytes);

  // Copies each chunk before it is checksummed and encoded, so that what is stored is one
  // moment's bytes even if the memory changes meanwhile (a live capture: a torn chunk would be
  // stored corrupt, not only stale, were a write ever not tracked).
  void stage_input() { stage_input_ = true; }

  // Replaces the application state blob (a live capture takes it during its pause).
  void set_app_state(std::vector<std::byte> state) { manifest_.app_state = std::move(state); }

  // Writes the manifest and publishes the snapshot.
  Result<CaptureReport> finish();
  // What finish() published (a migration builds the source's manifest from it).
  const Manifest& manifest() const { return manifest_; }

 private:
  struct Slot {
    std::vector<std::byte> input;  // the chunk's bytes, copied first (stage_input)
    std::vector<std::byte> buf;
    ChunkInfo info;
    std::span<const std::byte> stored;
    Status status;
  };

  // Encodes chunks `which` of `bytes` (a region laid out as `meta`) on every thread, appends
  // them in that order and points meta.chunks at them.
  Status store_chunks(RegionInfo& meta, std::span<const std::byte> bytes, std::span<const size_t> which,
                      const Progress& progress);

  std::unique_ptr<SnapshotSink> sink_;
  CaptureOptions options_;
  bool stage_input_ = false;
  unsigned threads_;
  std::vector<std::unique_ptr<ChunkEncoder>> encoders_;  // one per thread, made at the first region
  std::shared_ptr<const EncodeDictionary> dict_;
  std::vector<Slot> slots_;
  Manifest manifest_;
  CaptureReport report_;
  uint64_t offset_ = 0;
  std::chrono::steady_clock::time_point started_;
};

}  // namespace lazymem::snapshot
