// Local snapshot store: a directory of named snapshots, each written atomically.
//
// Layout: <store>/<name>/{manifest,data}. A snapshot being written lives in
// <store>/.<name>.tmp-<pid>-<n>/ and is renamed into place only when complete, so a reader never
// sees half a snapshot and a crash leaves only a temporary directory (removed by gc_leftovers).
#pragma once

#include <fcntl.h>
#include <sys/stat.h>

#include <atomic>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "lazymem/result.h"
#include "lazymem/snapshot.h"
#include "sys/unique_fd.h"

namespace lazymem::snapshot {

// Where the bytes of a snapshot being written go. One writer thread.
class SnapshotSink {
 public:
  virtual ~SnapshotSink() = default;
  // Appends the next bytes of the data file.
  virtual Status append(std::span<const std::byte> data) = 0;
  // Publishes the snapshot with this manifest (encoded), atomically.
  virtual Status commit(std::span<const std::byte> manifest) = 0;
  // Drops everything written so far. Also done by the destructor of an uncommitted sink.
  virtual void abort() = 0;
  virtual std::string describe() const = 0;
};

Result<std::unique_ptr<SnapshotSink>> open_local_sink(const SnapshotLocation& loc, bool replace);

struct SnapshotSummary {
  std::string name;
  uint64_t total_bytes = 0;
  uint64_t stored_bytes = 0;
  size_t regions = 0;
  uint64_t created_unix_ns = 0;
  uint32_t format_version = 1;
  std::string damage;  // empty, or why it cannot be restored (its manifest or data file is broken)
  double compression_ratio() const { return stored_bytes ? double(total_bytes) / double(stored_bytes) : 0.0; }
};

// What list_store read of each snapshot's manifest, for a caller that lists one store again and
// again (a page server): a manifest is read and decoded again only when its file is another or
// changed, by its identity (device, inode, size, modification and status-change times: a
// snapshot replaced or removed and imported again is a new file; one rewritten in place changes
// its times, and since Linux 6.13 ext4, xfs, btrfs and tmpfs give a change made after a stat()
// a time that stat() had not seen). What it reads is kept whatever it says, damage too (a
// manifest failing its checks is reported as before, without reading it again). A data file is
// looked at on every listing (a stat: one truncated since is damage). Entries of snapshots no
// longer listed are dropped. One lister at a time; manifest_reads() from any thread.
class ListingCache {
 public:
  // Manifests read (and decoded) through this cache so far.
  uint64_t manifest_reads() const { return reads_.load(std::memory_order_relaxed); }

 private:
  friend Result<std::vector<SnapshotSummary>> list_store(const std::string&, ListingCache*);
  struct Entry {
    dev_t dev = 0;
    ino_t ino = 0;
    off_t size = 0;
    timespec mtime{}, ctime{};
    SnapshotSummary summary;   // `damage`: the manifest's own, if any
    uint64_t data_needed = 0;  // bytes its data file must hold
  };
  std::map<std::string, Entry> entries_;
  std::atomic<uint64_t> reads_{0};
};

// Lists the snapshots of a store (is_snapshot_dir), damaged ones too (with `damage` saying why: a manifest that
// fails its checks, a data file shorter than the manifest needs). Refuses a directory that is
// itself a snapshot (a store path one level too deep). With `cache`, reads only the manifests
// that changed since the cache's last listing of this store.
Result<std::vector<SnapshotSummary>> list_store(const std::string& store_dir, ListingCache* cache = nullptr);

// Whether `dir` is a snapshot, damaged or not, and so may be deleted as one: it holds nothing
// but a manifest and a data file, and either the data file or a manifest that begins as
// lazymem's do (or nothing at all). A directory holding anything else (a store named by
// mistake, somebody's files, a lone text file called "manifest") is never a snapshot: neither
// removal nor a replacing capture deletes it, and listings leave it out.
bool is_snapshot_dir(const std::string& dir);

// Removes a snapshot: out of sight at once (renamed to <store>/.<name>.rm-<pid>-<n>), then deleted.
Status remove_snapshot(const SnapshotLocation& loc);
// The first half of that, for callers that must not wait for a large file's deletion: returns
// the directory to delete.
Result<std::string> retire_snapshot(const SnapshotLocation& loc);
// Deletes what writers and removals left when their process died (temporary directories whose
// process is gone here, whose data file no writer elsewhere holds locked, and which nothing has
// been created in for a minute); returns how many.
size_t gc_leftovers(const std::string& store_dir);

// Reads a whole small file (a manifest). Refuses files larger than `limit`, and anything but a
// regular file (opened non-blocking: a FIFO in its place is refused, not waited on). A relative
// `path` is taken from directory `dir_fd` (openat).
Result<std::vector<std::byte>> read_small_file(const std::string& path, uint64_t limit, int dir_fd = AT_FDCWD);
// The same, of a file open already (read from where its offset is); `path` names it in messages.
Result<std::vector<std::byte>> read_small_fd(int fd, const std::string& path, uint64_t limit);

}  // namespace lazymem::snapshot
