// LocalSnapshot: io_uring + O_DIRECT reads of stored chunks into aligned buffers.
#include "snapshot/snapshot_reader.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <deque>

#include "core/log.h"
#include "snapshot/manifest.h"
#include "snapshot/store.h"
#include "sys/ring.h"
#include "sys/syscall_result.h"

namespace lazymem::snapshot {
namespace {

constexpr uint64_t kAlign = 4096;

uint64_t align_down(uint64_t v) { return v & ~(kAlign - 1); }
uint64_t align_up(uint64_t v) { return (v + kAlign - 1) & ~(kAlign - 1); }

// Aligned staging memory: O_DIRECT needs buffer, offset and length aligned to the block size.
class AlignedArena {
 public:
  AlignedArena(size_t slots, size_t slot_size) : slot_size_(slot_size), size_(slots * slot_size) {
    void* p = nullptr;
    if (::posix_memalign(&p, kAlign, size_) != 0) throw std::bad_alloc();
    base_ = static_cast<std::byte*>(p);
  }
  ~AlignedArena() { std::free(base_); }
  // For when the kernel may still write into the arena: never freed, so never reused.
  void leak() { base_ = nullptr; }
  AlignedArena(const AlignedArena&) = delete;
  AlignedArena& operator=(const AlignedArena&) = delete;
  std::byte* slot(size_t i) const { return base_ + i * slot_size_; }
  std::byte* base() const { return base_; }
  size_t size() const { return size_; }
  size_t slot_size() const { return slot_size_; }

 private:
  size_t slot_size_;
  size_t size_;
  std::byte* base_ = nullptr;
};

// Reads one chunk's aligned span: [aligned_off, aligned_off + aligned_len) covers the chunk.
struct Span {
  uint64_t aligned_off;
  uint64_t aligned_len;
  uint64_t skip;  // chunk starts this far into the span
  uint32_t len;
};

Span span_of(const ChunkInfo& c) {
  uint64_t a = align_down(c.offset);
  return Span{a, align_up(c.offset + c.stored_length) - a, c.offset - a, c.stored_length};
}

Error truncated(const std::string& path, uint64_t need_end, long got) {
  return Error(Errc::kCorrupt, fmt::format("{}: data file is truncated (read {} bytes, chunk ends at byte {}); "
                                           "capture the snapshot again",
                                           path, got, need_end));
}

class UringReader final : public ChunkReader {
 public:
  UringReader(const LocalSnapshot& snap, std::unique_ptr<sys::Ring> ring, sys::UniqueFd event, size_t slots)
      : snap_(snap), arena_(slots, align_up(snap.manifest().chunk_size) + 2 * kAlign), ring_(std::move(ring)),
        event_(std::move(event)), tags_(slots), refs_(slots) {
    for (size_t i = slots; i > 0; --i) free_.push_back(i - 1);
    iovec iov{arena_.base(), arena_.size()};
    fixed_ = io_uring_register_buffers(ring_->get(), &iov, 1) == 0;
  }

  // Reads still in flight write into arena_ when they complete, and closing the ring does not
  // wait for them (the kernel tears a ring down in the background): cancel them, and reap every
  // completion before the arena is freed. O_DIRECT reads already at the device cannot be
  // cancelled; those are waited for (a read takes ~0.1 ms).
  ~UringReader() override {
    size_t left = in_flight();
    if (left == 0) return;
    // One request cancels them all (IORING_ASYNC_CANCEL_ANY, Linux 5.19). Older kernels refuse
    // the flag (-EINVAL in its completion): the reads are then only waited for.
    io_uring_sqe* sqe = ring_->sqe();
    io_uring_prep_cancel64(sqe, 0, IORING_ASYNC_CANCEL_ANY);
    io_uring_sqe_set_data64(sqe, kCancelTag);
    (void)io_uring_submit(ring_->get());
    while (left > 0) {
      io_uring_cqe* cqe = nullptr;
      int w = io_uring_wait_cqe(ring_->get(), &cqe);
      if (w == -EINTR) continue;
      if (w < 0) {
        // Cannot know when the kernel is done with the arena: better lost than reused.
        log::get("runtime")->error("{}: io_uring wait while closing a reader: {}; leaking its buffers",
                                   snap_.describe(), std::strerror(-w));
        arena_.leak();
        return;
      }
      if (io_uring_cqe_get_data64(cqe) != kCancelTag) --left;
      io_uring_cqe_seen(ring_->get(), cqe);
    }
  }
  UringReader(const UringReader&) = delete;
  UringReader& operator=(const UringReader&) = delete;

  Status submit(std::span<const ChunkRequest> requests) override {
    const Manifest& m = snap_.manifest();
    if (requests.size() > free_.size()) {
      return Error(Errc::kInvalidArgument, "chunk reader: more requests than free slots");
    }
    for (const ChunkRequest& rq : requests) {
      size_t slot = free_.back();
      free_.pop_back();
      tags_[slot] = rq.tag;
      refs_[slot] = rq.ref;
      Span s = span_of(m.regions[rq.ref.region].chunks[rq.ref.chunk]);
      io_uring_sqe* sqe = ring_->sqe();
      if (fixed_) {
        io_uring_prep_read_fixed(sqe, snap_.data_fd(), arena_.slot(slot), static_cast<unsigned>(s.aligned_len),
                                 s.aligned_off, 0);
      } else {
        io_uring_prep_read(sqe, snap_.data_fd(), arena_.slot(slot), static_cast<unsigned>(s.aligned_len), s.aligned_off);
      }
      io_uring_sqe_set_data64(sqe, slot);
    }
    int r = io_uring_submit(ring_->get());
    if (r < 0) return sys_error("io_uring submit of snapshot reads", -r);
    return ok_status();
  }

  Result<size_t> poll(ChunkSink& sink, bool block, size_t max) override {
    // Clear the eventfd before draining so a completion posted meanwhile re-arms it.
    uint64_t junk;
    (void)!::read(event_.get(), &junk, sizeof junk);
    const Manifest& m = snap_.manifest();
    bool waited = !block || in_flight() == 0;
    size_t delivered = 0;
    while (delivered < max) {
      io_uring_cqe* cqe = nullptr;
      int w = waited ? io_uring_peek_cqe(ring_->get(), &cqe) : io_uring_wait_cqe(ring_->get(), &cqe);
      if (w == -EAGAIN) break;
      if (w == -EINTR) continue;
      if (w < 0) return sys_error("io_uring wait", -w);
      waited = true;
      size_t slot = static_cast<size_t>(io_uring_cqe_get_data64(cqe));
      int res = cqe->res;
      io_uring_cqe_seen(ring_->get(), cqe);
      const ChunkInfo& c = m.regions[refs_[slot].region].chunks[refs_[slot].chunk];
      Span s = span_of(c);
      ++delivered;
      if (res < 0) {
        sink.on_chunk_error(tags_[slot], sys_error(fmt::format("read {} at {}", snap_.describe(), s.aligned_off), -res));
      } else if (static_cast<uint64_t>(res) < s.skip + s.len) {
        sink.on_chunk_error(tags_[slot], truncated(snap_.describe(), c.offset + c.stored_length, res));
      } else {
        sink.on_chunk(tags_[slot], std::span<const std::byte>(arena_.slot(slot) + s.skip, s.len));
      }
      // Freed only now: the sink may submit new reads, which must not land in this buffer.
      free_.push_back(slot);
    }
    return delivered;
  }

  int wait_fd() const override { return event_.get(); }
  size_t in_flight() const override { return tags_.size() - free_.size(); }
  size_t capacity() const override { return tags_.size(); }

 private:
  static constexpr uint64_t kCancelTag = ~uint64_t{0};  // slots are small numbers

  const LocalSnapshot& snap_;
  // Declared before the ring so it is freed after it: the ring holds it registered (fixed buffers).
  AlignedArena arena_;
  std::unique_ptr<sys::Ring> ring_;
  sys::UniqueFd event_;
  std::vector<uint64_t> tags_;
  std::vector<ChunkRef> refs_;
  std::vector<size_t> free_;
  bool fixed_ = false;
};

// Synchronous fallback where io_uring is unavailable: reads happen inside poll().
class PreadReader final : public ChunkReader {
 public:
  PreadReader(const LocalSnapshot& snap, size_t slots)
      : snap_(snap), arena_(1, align_up(snap.manifest().chunk_size) + 2 * kAlign), capacity_(slots) {}

  Status submit(std::span<const ChunkRequest> requests) override {
    if (queue_.size() + requests.size() > capacity_) {
      return Error(Errc::kInvalidArgument, "chunk reader: more requests than free slots");
    }
    for (const auto& rq : requests) {
      // Demand requests jump the queue.
      if (rq.demand) queue_.push_front(rq);
      else queue_.push_back(rq);
    }
    return ok_status();
  }

  Result<size_t> poll(ChunkSink& sink, bool /*block*/, size_t max) override {
    const Manifest& m = snap_.manifest();
    size_t delivered = 0;
    while (!queue_.empty() && delivered < max) {
      ++delivered;
      ChunkRequest rq = queue_.front();
      queue_.pop_front();
      const ChunkInfo& c = m.regions[rq.ref.region].chunks[rq.ref.chunk];
      Span s = span_of(c);
      auto r = sys::call([&] {
        return ::pread(snap_.data_fd(), arena_.slot(0), s.aligned_len, static_cast<off_t>(s.aligned_off));
      });
      if (!r.ok()) {
        sink.on_chunk_error(rq.tag, r.error(fmt::format("read {} at {}", snap_.describe(), s.aligned_off)));
      } else if (static_cast<uint64_t>(r.value) < s.skip + s.len) {
        sink.on_chunk_error(rq.tag, truncated(snap_.describe(), c.offset + c.stored_length, r.value));
      } else {
        sink.on_chunk(rq.tag, std::span<const std::byte>(arena_.slot(0) + s.skip, s.len));
      }
    }
    return delivered;
  }

  int wait_fd() const override { return -1; }
  size_t in_flight() const override { return queue_.size(); }
  size_t capacity() const override { return capacity_; }

 private:
  const LocalSnapshot& snap_;
  AlignedArena arena_;
  size_t capacity_;
  std::deque<ChunkRequest> queue_;
};

Result<sys::UniqueFd> open_manifest(const std::string& dir) {
  const std::string mpath = dir + "/" + kManifestFile;
  sys::UniqueFd fd(::open(mpath.c_str(), kSnapshotFileFlags));
  if (fd.valid()) return fd;
  if (errno == ENOENT) {
    return Error(Errc::kNotFound, fmt::format("snapshot {} not found (no {}); check the store path and name", dir, mpath));
  }
  return sys_error("open " + mpath, errno);
}

Result<Manifest> read_manifest_fd(int fd, const std::string& dir) {
  LAZYMEM_ASSIGN_OR_RETURN(auto bytes,
                           read_small_fd(fd, dir + "/" + kManifestFile, kMaxManifestBytes + kManifestHeaderSize));
  return decode_manifest(bytes, dir);
}

}  // namespace

Result<Manifest> read_local_manifest(const SnapshotLocation& loc) {
  const std::string dir = loc.store_dir + "/" + loc.name;
  LAZYMEM_ASSIGN_OR_RETURN(sys::UniqueFd fd, open_manifest(dir));
  return read_manifest_fd(fd.get(), dir);
}

Result<SnapshotFiles> open_snapshot_files(const SnapshotLocation& loc, bool direct) {
  SnapshotFiles files;
  files.path = loc.store_dir + "/" + loc.name;
  LAZYMEM_ASSIGN_OR_RETURN(files.manifest, open_manifest(files.path));
  const std::string dpath = files.path + "/" + kDataFile;
  if (direct) {
    files.data.reset(::open(dpath.c_str(), kSnapshotFileFlags | O_DIRECT));
    if (!files.data.valid() && errno == EINVAL) {
      log::get("runtime")->info("{}: filesystem refuses O_DIRECT; reading through the page cache", dpath);
    }
  }
  if (!files.data.valid()) files.data.reset(::open(dpath.c_str(), kSnapshotFileFlags));
  if (!files.data.valid()) return sys_error("open snapshot data " + dpath, errno);
  return files;
}

Result<std::unique_ptr<LocalSnapshot>> LocalSnapshot::open(const SnapshotLocation& loc, const LocalReaderOptions& options) {
  LAZYMEM_ASSIGN_OR_RETURN(SnapshotFiles files, open_snapshot_files(loc, options.direct));
  return open(std::move(files), options);
}

Result<std::unique_ptr<LocalSnapshot>> LocalSnapshot::open(SnapshotFiles files, const LocalReaderOptions& options) {
  std::unique_ptr<LocalSnapshot> snap(new LocalSnapshot());
  snap->path_ = std::move(files.path);
  snap->options_ = options;
  LAZYMEM_ASSIGN_OR_RETURN(snap->manifest_, read_manifest_fd(files.manifest.get(), snap->path_));
  const std::string dpath = snap->path_ + "/" + kDataFile;
  const int fd = files.data.get();
  struct stat st{};
  if (::fstat(fd, &st) != 0) return sys_error("stat " + dpath, errno);
  if (!S_ISREG(st.st_mode)) return Error(Errc::kInvalidArgument, fmt::format("{} is not a regular file", dpath));
  if (static_cast<uint64_t>(st.st_size) < snap->manifest_.data_length) {
    return Error(Errc::kCorrupt, fmt::format("snapshot {}: data file is truncated ({} of {} bytes); capture it again",
                                             snap->path_, st.st_size, snap->manifest_.data_length));
  }
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0) return sys_error("fcntl " + dpath, errno);
  if ((flags & O_NONBLOCK) != 0 && ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) != 0) return sys_error("fcntl " + dpath, errno);
  snap->direct_ = (flags & O_DIRECT) != 0;
  snap->data_ = std::move(files.data);
  snap->uring_ = options.io != IoEngine::kPread;
  return snap;
}

Result<std::unique_ptr<ChunkReader>> LocalSnapshot::open_reader() {
  if (uring_) {
    auto ring = sys::Ring::create(std::max(8u, options_.max_batch));
    if (ring.ok()) {
      sys::UniqueFd event(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
      if (!event.valid()) return sys_error("eventfd for snapshot reads", errno);
      int r = io_uring_register_eventfd((*ring)->get(), event.get());
      if (r < 0) return sys_error("io_uring_register_eventfd", -r);
      return std::unique_ptr<ChunkReader>(new UringReader(*this, std::move(*ring), std::move(event), options_.max_batch));
    }
    if (options_.io == IoEngine::kUring) return std::move(ring).error();
    log::get("runtime")->info("{}; reading snapshot chunks with pread", ring.error().message());
  }
  return std::unique_ptr<ChunkReader>(new PreadReader(*this, options_.max_batch));
}

}  // namespace lazymem::snapshot
