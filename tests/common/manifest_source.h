// Test helpers for the fault engine without a snapshot on disk: a chunk source that holds a
// manifest made in the test and opens no reader, and the manifest of one region built by hand.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "lazymem/result.h"
#include "snapshot/chunk_source.h"
#include "snapshot/manifest.h"

namespace lazymem::testing {

// Serves `m` as it is (never validated) and fails every open_reader() with `why`.
class ManifestOnlySource final : public snapshot::ChunkSource {
 public:
  ManifestOnlySource(Manifest m, std::string why) : m_(std::move(m)), why_(std::move(why)) {}
  const Manifest& manifest() const override { return m_; }
  Result<std::unique_ptr<snapshot::ChunkReader>> open_reader() override { return Error(Errc::kIo, why_); }
  std::string describe() const override { return "manifest only"; }

 private:
  Manifest m_;
  std::string why_;
};

// A format-2 manifest of one region, `name`, `length` bytes of 4 KiB pages in `chunks` chunks
// (all zero chunks until the test says otherwise), with the default chunk size.
inline Manifest one_region_manifest(const std::string& name, RegionKind kind, uint64_t length, size_t chunks) {
  Manifest m;
  m.format_version = 2;
  m.chunk_size = kDefaultChunkSize;
  RegionInfo r;
  r.name = name;
  r.kind = kind;
  r.page_size = 4096;
  r.length = length;
  r.chunks.assign(chunks, ChunkInfo{});
  m.regions.push_back(std::move(r));
  return m;
}

}  // namespace lazymem::testing
