// ExtentCache: the page server's buffer pool of O_DIRECT-read extents.
#include "extent_cache.h"

#include <sys/mman.h>

#include <algorithm>

namespace lazymem::pageserver {

Pin& Pin::operator=(Pin&& o) noexcept {
  if (this != &o) {
    reset();
    cache_ = o.cache_;
    e_ = std::exchange(o.e_, nullptr);
  }
  return *this;
}

void Pin::reset() {
  if (e_ != nullptr) cache_->unpin(std::exchange(e_, nullptr));
}

ExtentCache::ExtentCache(size_t max_bytes, io_uring* ring)
    : max_arenas_(std::max<size_t>(1, max_bytes / kArenaSize)), ring_(ring) {
  // A sparse table of one fixed buffer per arena, filled as arenas are made (Linux 5.19).
  if (ring_ != nullptr) fixed_ = io_uring_register_buffers_sparse(ring_, static_cast<unsigned>(max_arenas_)) == 0;
}

ExtentCache::~ExtentCache() {
  // Reads still in flight hold their own page references, so unmapping is safe for the kernel;
  // the server tears its ring down before this anyway.
  for (auto [p, n] : arenas_) ::munmap(p, n);
}

bool ExtentCache::grow() {
  if (arenas_.size() >= max_arenas_) return false;
  void* p = ::mmap(nullptr, kArenaSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return false;
  auto* base = static_cast<std::byte*>(p);
  int index = -1;
  if (fixed_) {
    iovec iov{p, kArenaSize};
    unsigned slot = static_cast<unsigned>(arenas_.size());
    if (io_uring_register_buffers_update_tag(ring_, slot, &iov, nullptr, 1) == 1) index = static_cast<int>(slot);
  }
  arenas_.emplace_back(base, kArenaSize);
  constexpr size_t per = kArenaSize / kExtentSize;
  auto ext = std::make_unique<Extent[]>(per);
  for (size_t i = 0; i < per; ++i) {
    ext[i].data = base + i * kExtentSize;
    ext[i].buf_index = index;
    free_.push_back(&ext[i]);
  }
  stats_.resident_bytes += kArenaSize;
  extents_.push_back(std::move(ext));
  return true;
}

Pin ExtentCache::lookup(uint64_t file, uint64_t index) {
  auto it = map_.find(Key{file, index});
  if (it == map_.end()) return {};
  Extent* e = it->second;
  if (e->in_lru) {
    lru_.erase(e->lru);
    e->in_lru = false;
  }
  ++e->pins;
  ++stats_.hits;
  return Pin(this, e);
}

Pin ExtentCache::claim(uint64_t file, uint64_t index) {
  if (free_.empty() && !grow()) {
    if (lru_.empty()) return {};
    Extent* victim = lru_.front();
    lru_.pop_front();
    victim->in_lru = false;
    forget(victim);
    ++stats_.evictions;
    free_.push_back(victim);
  }
  Extent* e = free_.back();
  free_.pop_back();
  e->file = file;
  e->index = index;
  e->valid = 0;
  e->state = Extent::State::kReading;
  e->pins = 1;
  e->waiters.clear();
  map_[Key{file, index}] = e;
  ++stats_.misses;
  return Pin(this, e);
}

void ExtentCache::forget(Extent* e) {
  auto it = map_.find(Key{e->file, e->index});
  if (it != map_.end() && it->second == e) map_.erase(it);
}

void ExtentCache::read_done(Extent* e, int bytes) {
  if (bytes < 0) {
    e->state = Extent::State::kFailed;
    forget(e);
    return;
  }
  e->valid = static_cast<uint32_t>(bytes);
  e->loaded = ++loads_;
  e->state = Extent::State::kReady;
}

void ExtentCache::drop_file(uint64_t file) {
  for (auto it = lru_.begin(); it != lru_.end();) {
    Extent* e = *it;
    if (e->file != file) {
      ++it;
      continue;
    }
    it = lru_.erase(it);
    e->in_lru = false;
    forget(e);
    e->state = Extent::State::kFree;
    free_.push_back(e);
  }
}

void ExtentCache::unpin(Extent* e) {
  if (--e->pins > 0) return;
  unpinned_ = true;
  if (e->state == Extent::State::kReady) {
    e->lru = lru_.insert(lru_.end(), e);
    e->in_lru = true;
    return;
  }
  // Failed (already forgotten): back to the free list. (kReading cannot reach zero pins: the
  // read itself holds one until read_done.)
  e->state = Extent::State::kFree;
  free_.push_back(e);
}

}  // namespace lazymem::pageserver
