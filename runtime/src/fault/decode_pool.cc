// DecodePool: worker threads that verify and decompress prefetched chunks.
#include "fault/decode_pool.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cstring>

#include "snapshot/chunk_codec.h"

namespace lazymem::fault {

DecodePool::DecodePool(unsigned threads, size_t jobs, uint32_t max_chunk)
    : done_event_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)), max_chunk_(max_chunk) {
  for (size_t i = 0; i < jobs; ++i) {
    auto j = std::make_unique<DecodeJob>();
    j->stored.resize(max_chunk);
    j->out.resize(max_chunk);
    free_.push_back(j.get());
    jobs_.push_back(std::move(j));
  }
  for (unsigned i = 0; i < threads; ++i) threads_.emplace_back([this] { work(); });
}

DecodePool::~DecodePool() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
}

void DecodePool::reserve_chunk(uint32_t max_chunk) {
  if (max_chunk <= max_chunk_) return;
  // Only free jobs can be resized now; busy ones grow when they come back (drain_done).
  max_chunk_ = max_chunk;
  for (DecodeJob* j : free_) {
    j->stored.resize(max_chunk);
    j->out.resize(max_chunk);
  }
}

bool DecodePool::try_submit(uint64_t tag, const ChunkInfo& info, uint32_t length, uint32_t page_size,
                            const std::shared_ptr<const snapshot::DecodeDictionary>& dict,
                            std::span<const std::byte> stored, uint32_t installed_page,
                            std::span<const std::byte> installed) {
  if (free_.empty() || threads_.empty() || stored.size() > max_chunk_ || length > max_chunk_) return false;
  DecodeJob* j = free_.back();
  if (j->stored.size() < max_chunk_) {
    j->stored.resize(max_chunk_);
    j->out.resize(max_chunk_);
  }
  free_.pop_back();
  j->tag = tag;
  j->info = info;
  j->dict = dict;
  j->layout = snapshot::ChunkLayout{page_size, dict ? dict->get() : nullptr};
  j->length = length;
  j->installed_page = installed_page;
  j->stored_size = stored.size();
  std::memcpy(j->stored.data(), stored.data(), stored.size());
  if (installed_page != snapshot::ChunkDecoder::kNoPage) {
    std::memcpy(j->out.data() + size_t{installed_page} * page_size, installed.data(), installed.size());
  }
  {
    std::lock_guard lock(mu_);
    todo_.push_back(j);
  }
  cv_.notify_one();
  return true;
}

size_t DecodePool::drain_done(const std::function<void(DecodeJob&)>& fn) {
  uint64_t junk;
  (void)!::read(done_event_.get(), &junk, sizeof junk);
  std::vector<DecodeJob*> done;
  {
    std::lock_guard lock(mu_);
    done.swap(done_);
  }
  for (DecodeJob* j : done) {
    fn(*j);
    j->dict.reset();
    free_.push_back(j);
  }
  return done.size();
}

void DecodePool::work() {
  snapshot::ChunkDecoder decoder;
  for (;;) {
    DecodeJob* j;
    {
      std::unique_lock lock(mu_);
      cv_.wait(lock, [&] { return stopping_ || !todo_.empty(); });
      if (stopping_) return;
      j = todo_.front();
      todo_.pop_front();
    }
    std::span<const std::byte> stored(j->stored.data(), j->stored_size);
    std::span<std::byte> out(j->out.data(), j->length);
    j->status = j->installed_page == snapshot::ChunkDecoder::kNoPage
                    ? decoder.decode(j->info, stored, out, j->layout)
                    : decoder.decode_rest(j->info, stored, out, j->layout, j->installed_page);
    bool was_empty;
    {
      std::lock_guard lock(mu_);
      was_empty = done_.empty();
      done_.push_back(j);
    }
    // One wake-up per batch: the engine drains everything that is done when it wakes.
    if (was_empty) {
      uint64_t one = 1;
      (void)!::write(done_event_.get(), &one, sizeof one);
    }
  }
}

}  // namespace lazymem::fault
