// LocalSnapshot: a snapshot in a local store as a ChunkSource. Chunk data is read with io_uring
// and O_DIRECT into aligned buffers (buffered reads where the filesystem refuses O_DIRECT; pread
// where io_uring is unavailable).
#pragma once

#include <fcntl.h>

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

// How a local snapshot's files are opened, by whoever opens them (open_snapshot_files; the agent,
// in a child running as the user it reads for): read-only, close-on-exec, and non-blocking, so
// that a FIFO put in a file's place is refused instead of waited on. The data file is opened
// with O_DIRECT added first where wanted, without it where the filesystem refuses it (EINVAL);
// LocalSnapshot::open clears its O_NONBLOCK (io_uring would fail its reads with EAGAIN).
constexpr int kSnapshotFileFlags = O_RDONLY | O_CLOEXEC | O_NONBLOCK;

// A local snapshot's files, open. Whoever opened them decided which files they are: nothing is
// opened by path from here on.
struct SnapshotFiles {
  std::string path;  // <store>/<name>: names the snapshot in messages
  sys::UniqueFd manifest;
  sys::UniqueFd data;  // O_DIRECT in its flags: read with O_DIRECT
};

// Opens `loc`'s files by path (the data file with O_DIRECT where `direct` and the filesystem
// takes it). kNotFound, saying so, when the snapshot has no manifest.
Result<SnapshotFiles> open_snapshot_files(const SnapshotLocation& loc, bool direct);

class LocalSnapshot final : public ChunkSource {
 public:
  // By path: open_snapshot_files, then the open below.
  static Result<std::unique_ptr<LocalSnapshot>> open(const SnapshotLocation& loc, const LocalReaderOptions& options = {});
  // From its files, open already; reads with O_DIRECT if the data file was opened with it
  // (options.direct is not looked at).
  static Result<std::unique_ptr<LocalSnapshot>> open(SnapshotFiles files, const LocalReaderOptions& options = {});

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
