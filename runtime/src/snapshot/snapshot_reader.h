// LocalSnapshot: a snapshot in a local store as a ChunkSource. Chunk data is read with io_uring
// and O_DIRECT into aligned buffers (buffered reads where the filesystem refuses O_DIRECT; pread
// where io_uring is unavailable).
#pragma once

#include <memory>
#include <string>

#include "lazymem/kernel_features.h"
#include "lazymem/result.h"
#include "lazymem/snapshot.h"
#include "snapshot/chunk_source.h"
#include "sys/unique_fd.h"

namespace lazymem::snapshot {

enum class IoEngine { kAuto, kUring, kPread };

struct LocalReaderOptions {
  IoEngine io = IoEngine::kAuto;
  bool direct = true;        // try O_DIRECT first
  unsigned max_batch = 64;   // reads in flight per reader
};

class LocalSnapshot final : public ChunkSource {
 public:
  static Result<std::unique_ptr<LocalSnapshot>> open(const SnapshotLocation& loc, const LocalReaderOptions& options = {});

  const Manifest& manifest() const override { return manifest_; }
  Result<std::unique_ptr<ChunkReader>> open_reader() override;
  std::string describe() const override { return path_; }

  bool direct_io() const { return direct_; }
  bool uses_uring() const { return uring_; }
  int data_fd() const { return data_.get(); }

 private:
  LocalSnapshot() = default;
  std::string path_;
  Manifest manifest_;
  sys::UniqueFd data_;
  bool direct_ = false;
  bool uring_ = false;
  LocalReaderOptions options_;
};

// Reads and validates the manifest of a local snapshot.
Result<Manifest> read_local_manifest(const SnapshotLocation& loc);

}  // namespace lazymem::snapshot
