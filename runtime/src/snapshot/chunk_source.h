// ChunkSource: where the stored bytes of a snapshot's chunks come from (local store, page
// server). The fault engine submits tagged requests to a per-thread ChunkReader and collects
// completions when the reader's fd is readable, so demand fetches, prefetch and fault reading
// all run in one event loop with no thread hand-off.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>

#include "lazymem/result.h"
#include "lazymem/snapshot.h"
#include "snapshot/dictionary.h"

namespace lazymem::snapshot {

struct ChunkRef {
  uint32_t region = 0;
  uint32_t chunk = 0;
  bool operator==(const ChunkRef&) const = default;
};

struct ChunkRequest {
  ChunkRef ref;
  uint64_t tag = 0;     // returned with the completion
  bool demand = false;  // a thread is waiting on it: serve before prefetch
};

// Receives completions, on the thread that called ChunkReader::poll.
class ChunkSink {
 public:
  virtual ~ChunkSink() = default;
  // `stored` is valid only during the call.
  virtual void on_chunk(uint64_t tag, std::span<const std::byte> stored) = 0;
  // The reader gave up on this chunk (after its own retries).
  virtual void on_chunk_error(uint64_t tag, const Error& error) = 0;
};

// Fetches chunks for one thread (owns that thread's ring, buffers or connection).
class ChunkReader {
 public:
  virtual ~ChunkReader() = default;
  // Starts fetching. At most capacity() - in_flight() requests; none of them zero chunks.
  virtual Status submit(std::span<const ChunkRequest> requests) = 0;
  // Delivers up to `max` completions that are ready; with `block`, first waits until at least
  // one is (when any request is in flight). Returns how many it delivered; fewer than `max`
  // means none are left ready. An error means the reader is broken: every request still in
  // flight is lost and the caller must fail or re-submit them.
  virtual Result<size_t> poll(ChunkSink& sink, bool block, size_t max) = 0;
  // Readable when poll() has work; -1 if completions need no waiting (poll() does the work).
  virtual int wait_fd() const = 0;
  virtual size_t in_flight() const = 0;
  virtual size_t capacity() const = 0;
};

class ChunkSource {
 public:
  virtual ~ChunkSource() = default;
  virtual const Manifest& manifest() const = 0;
  // A reader for the calling thread.
  virtual Result<std::unique_ptr<ChunkReader>> open_reader() = 0;
  virtual std::string describe() const = 0;

  // The manifest's dictionary ready for decoding, built once per source (null: it has none).
  Result<std::shared_ptr<const DecodeDictionary>> dictionary() {
    std::lock_guard lock(dict_mu_);
    if (!dict_loaded_) {
      LAZYMEM_ASSIGN_OR_RETURN(dict_, DecodeDictionary::load(manifest().dictionary));
      dict_loaded_ = true;
    }
    return dict_;
  }

 private:
  std::mutex dict_mu_;
  bool dict_loaded_ = false;
  std::shared_ptr<const DecodeDictionary> dict_;
};

}  // namespace lazymem::snapshot
