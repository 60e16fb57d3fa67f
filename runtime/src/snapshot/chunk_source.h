// ChunkSource: where the stored bytes of a snapshot's chunks come from (local store, page
// server). The fault engine submits tagged requests to a per-thread ChunkReader and collects
// completions when the reader's fd is readable, so demand fetches, prefetch and fault reading
// all run in one event loop with no thread hand-off.
#pragma once

#include <algorithm>
#include <chrono>
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
  // The restore holds every page it will ask this source for: a page server is told so (a
  // migration source then stops serving at once instead of lingering for a reconnect). Called
  // at most once, just before the reader is dropped (requests still in flight, duplicates of
  // what is present, are dropped with it). Never waits on the peer.
  virtual void finished() noexcept {}
};

// How long one connection to a page server is given to answer before it is dropped and made again
// (to the next server, where there are several): a share of the fault deadline, so that every
// attempt fits in it, but 1 s at least (a busy disk is not a dead server) and 5 s at most.
inline std::chrono::milliseconds attempt_slice(std::chrono::milliseconds deadline, unsigned attempts) {
  const auto share = deadline / (attempts + 1);
  return std::min(std::clamp<std::chrono::milliseconds>(share, std::chrono::seconds(1), std::chrono::seconds(5)), deadline);
}

// Fetches one page synchronously on the calling thread: a fault resolved by the faulting thread
// itself, inside its SIGBUS handler (RestoreOptions::fault_on_thread). Everything is allocated
// when it is opened; fetch() then allocates nothing and takes no lock, whatever data it gets
// (docs/design-notes.md, "Faults on the faulting thread").
//
// Thread-safety: one thread at a time (the pool that hands fetchers out sees to it).
class PageFetcher {
 public:
  enum class Outcome {
    kOk,      // `out` holds the page, verified
    kBroken,  // the connection failed or timed out: reopen() it (not in a signal handler) and retry
    kBad,     // the data failed verification or the server refused: an attempt spent
    kRefused, // this server cannot serve it and there are others: an attempt spent, and the
              // connection is to be reopen()ed (to the next server) before it is used again
  };
  virtual ~PageFetcher() = default;
  // Page `page` of chunk `ref` into `out` (the region's page size), by `deadline_ns`
  // (CLOCK_MONOTONIC). Not for zero chunks (nothing to fetch).
  virtual Outcome fetch(ChunkRef ref, uint32_t page, std::span<std::byte> out, int64_t deadline_ns) noexcept = 0;
  // Bytes the last successful fetch received from the source (for statistics).
  virtual size_t received() const noexcept = 0;
  // How the last fetch went by datagram (for statistics): its page came in one, whether a
  // datagram request went unanswered in time (asked again on the connection), and whether the
  // server announced the page on the connection instead (too big for a datagram).
  struct Datagrams {
    bool answered = false;
    bool lost = false;
    bool on_connection = false;
  };
  virtual Datagrams datagrams() const noexcept { return {}; }
  // Why the last fetch failed, as a static string (safe to write from a signal handler).
  virtual const char* failure() const noexcept = 0;
  // The servers the source has, and which of them this fetcher's connection reached (kRefused
  // counts once per server and fault: several connections may sit on one that refuses).
  virtual size_t servers() const noexcept { return 1; }
  virtual size_t server() const noexcept { return 0; }
  virtual Status reopen(std::chrono::milliseconds timeout) = 0;
};

class ChunkSource {
 public:
  virtual ~ChunkSource() = default;
  virtual const Manifest& manifest() const = 0;
  // A reader for the calling thread. Never waits on a page server, nor on DNS: the fault engine
  // opens readers on the thread that serves every other session (a page-server reader looks the
  // name up and connects in the background, moved on by poll(), and its failures come from
  // there). An error here means no reader can be had at all (out of descriptors, a local ring):
  // the engine fails the session.
  virtual Result<std::unique_ptr<ChunkReader>> open_reader() = 0;
  virtual std::string describe() const = 0;
  // A page fetcher, for sources that have one (page servers).
  virtual Result<std::unique_ptr<PageFetcher>> open_page_fetcher() {
    return Error(Errc::kUnsupported, describe() + ": faults on the faulting thread need a page server (lazymem://) source");
  }

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
