// DecodePool: worker threads that verify and decompress prefetched chunks, so prefetch uses
// every core while the engine thread keeps reading faults and installing pages.
//
// Only decoding moves off the engine thread; installing (UFFDIO_COPY) stays on it, so the
// ordering of installs against REMOVE/UNMAP/REMAP events is still decided in one place.
// Demand faults are decoded inline by the engine thread: a hand-off would add a cross-CPU
// wake-up (~30 µs here) to the latency of a thread that is waiting. Once a faulting page is
// installed alone (format v2), nobody waits on the rest of its chunk: that comes here too.
//
// Thread-safety: try_submit / drain_done / done_fd on the engine thread; workers inside.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <thread>
#include <vector>

#include "lazymem/result.h"
#include "lazymem/snapshot.h"
#include "snapshot/chunk_codec.h"
#include "sys/unique_fd.h"

namespace lazymem::fault {

struct DecodeJob {
  uint64_t tag = 0;
  ChunkInfo info;
  snapshot::ChunkLayout layout;
  std::shared_ptr<const snapshot::DecodeDictionary> dict;  // keeps layout.dict alive
  uint32_t length = 0;
  // kNoPage, or a page of the chunk already decoded (into `out`), verified and installed: the
  // job decodes the rest around it (decode_rest) and hands the index back.
  uint32_t installed_page = 0;
  size_t stored_size = 0;
  std::vector<std::byte> stored;
  std::vector<std::byte> out;
  Status status;
};

class DecodePool {
 public:
  // `jobs` buffers of `max_chunk` bytes each bound the memory held by chunks in decoding.
  DecodePool(unsigned threads, size_t jobs, uint32_t max_chunk);
  ~DecodePool();
  DecodePool(const DecodePool&) = delete;
  DecodePool& operator=(const DecodePool&) = delete;

  // Queues a copy of `stored` for decoding; false if every job buffer is busy (decode inline).
  // With `installed_page`, `stored` has been verified and `installed` holds that page, decoded:
  // only the rest of the chunk is decoded.
  bool try_submit(uint64_t tag, const ChunkInfo& info, uint32_t length, uint32_t page_size,
                  const std::shared_ptr<const snapshot::DecodeDictionary>& dict, std::span<const std::byte> stored,
                  uint32_t installed_page = snapshot::ChunkDecoder::kNoPage,
                  std::span<const std::byte> installed = {});
  // Hands every finished job to `fn` and recycles it. Returns how many.
  size_t drain_done(const std::function<void(DecodeJob&)>& fn);
  // Readable when finished jobs are waiting.
  int done_fd() const { return done_event_.get(); }
  // Jobs submitted and not yet handed back by drain_done(); and the worker threads.
  size_t busy() const { return jobs_.size() - free_.size(); }
  size_t threads() const { return threads_.size(); }
  // Grows the job buffers to hold chunks of `max_chunk` bytes (engine thread, pool idle or not).
  void reserve_chunk(uint32_t max_chunk);

 private:
  void work();

  std::vector<std::unique_ptr<DecodeJob>> jobs_;
  std::vector<DecodeJob*> free_;  // engine thread only
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<DecodeJob*> todo_;
  std::vector<DecodeJob*> done_;
  bool stopping_ = false;
  sys::UniqueFd done_event_;
  std::vector<std::thread> threads_;
  uint32_t max_chunk_;
};

}  // namespace lazymem::fault
