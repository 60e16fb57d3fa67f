// ExtentCache: the page server's buffer pool.
//
// Chunk data is read with O_DIRECT into aligned 64 KiB extents of the snapshot data files, sent
// straight from those extents, and kept afterwards: a snapshot that many hosts restore (one
// golden image, many clones; a VM restored again after a failed migration) is read from disk
// once. O_DIRECT is why the cache is ours: the kernel's page cache would hold a second copy and
// cost a memcpy per read.
//
// An extent is pinned while a read fills it or while a reply that points into it is queued or
// still held by the kernel (zero-copy sends); unpinned extents are evicted least recently used
// first. Memory grows in 4 MiB arenas up to the budget; each arena is registered with io_uring
// as one fixed buffer where the ring allows (reads then skip the per-I/O page pinning).
//
// Thread-safety: one thread (the server loop).
#pragma once

#include <liburing.h>

#include <cstddef>
#include <cstdint>
#include <list>
#include <memory>
#include <unordered_map>
#include <utility>
#include <vector>

namespace lazymem::pageserver {

struct Extent {
  enum class State : uint8_t { kFree, kReading, kReady, kFailed };
  std::byte* data = nullptr;
  int buf_index = -1;  // io_uring fixed buffer of its arena; -1: not registered
  uint64_t file = 0;   // key: which data file (a number per opened snapshot) ...
  uint64_t index = 0;  // ... and which 64 KiB of it
  uint32_t valid = 0;  // bytes read (short at the end of a file)
  uint64_t loaded = 0;  // when it was read, as a count of reads: tells a re-read from the bytes once checked
  State state = State::kFree;
  uint32_t pins = 0;
  bool in_lru = false;
  std::list<Extent*>::iterator lru;
  std::vector<std::pair<int, uint64_t>> waiters;  // connections (fd, serial) waiting for the read
};

class ExtentCache;

// A pin on an extent: the extent is neither evicted nor reused while one exists.
class Pin {
 public:
  Pin() = default;
  Pin(ExtentCache* cache, Extent* e) : cache_(cache), e_(e) {}
  Pin(Pin&& o) noexcept : cache_(o.cache_), e_(std::exchange(o.e_, nullptr)) {}
  Pin& operator=(Pin&& o) noexcept;
  Pin(const Pin&) = delete;
  Pin& operator=(const Pin&) = delete;
  ~Pin() { reset(); }
  void reset();
  Extent* get() const { return e_; }
  Extent* operator->() const { return e_; }

 private:
  ExtentCache* cache_ = nullptr;
  Extent* e_ = nullptr;
};

struct CacheStats {
  uint64_t hits = 0, misses = 0, evictions = 0;
  uint64_t resident_bytes = 0;  // arenas allocated so far
};

class ExtentCache {
 public:
  static constexpr size_t kExtentSize = 64 << 10;
  static constexpr size_t kArenaSize = 4 << 20;

  // `ring` may be null (no fixed buffers). At least one arena is always allowed.
  ExtentCache(size_t max_bytes, io_uring* ring);
  ~ExtentCache();
  ExtentCache(const ExtentCache&) = delete;
  ExtentCache& operator=(const ExtentCache&) = delete;

  // The cached (or being read) extent `index` of `file`, pinned; empty when not cached.
  Pin lookup(uint64_t file, uint64_t index);
  // An extent now keyed (file, index), state kReading, pinned, for the caller to fill; empty
  // when every extent is pinned (try again after unpins: see take_unpinned()).
  Pin claim(uint64_t file, uint64_t index);
  // One more pin on an extent someone already pins.
  Pin share(Extent* e) {
    ++e->pins;
    return Pin(this, e);
  }
  // A read finished: `bytes` valid, or failed (negative): the key is dropped so the next
  // lookup reads again; holders of pins see kFailed.
  void read_done(Extent* e, int bytes);
  // Forgets every extent of `file` that nobody pins (a replaced snapshot).
  void drop_file(uint64_t file);

  // True (once) when an extent became reusable since the last call: starved connections retry.
  bool take_unpinned() { return std::exchange(unpinned_, false); }
  const CacheStats& stats() const { return stats_; }

 private:
  friend class Pin;
  struct Key {
    uint64_t file, index;
    bool operator==(const Key&) const = default;
  };
  struct KeyHash {
    size_t operator()(const Key& k) const { return std::hash<uint64_t>()(k.file * 0x9E3779B97F4A7C15ULL ^ k.index); }
  };
  void unpin(Extent* e);
  bool grow();
  void forget(Extent* e);

  size_t max_arenas_;
  io_uring* ring_;
  bool fixed_ = false;  // arenas are registered as fixed buffers
  std::vector<std::pair<std::byte*, size_t>> arenas_;
  std::vector<std::unique_ptr<Extent[]>> extents_;
  std::vector<Extent*> free_;
  std::list<Extent*> lru_;  // ready, unpinned; front = least recently used
  std::unordered_map<Key, Extent*, KeyHash> map_;
  CacheStats stats_;
  bool unpinned_ = false;
  uint64_t loads_ = 0;
};

}  // namespace lazymem::pageserver
