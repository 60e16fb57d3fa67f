// StoreListing: what a page server's `list` answers, made on a thread of its own.
//
// Listing a store reads directories and manifests: as long as the disk (or a hung mount) takes,
// and the page server's loop answers faults meanwhile. So the loop only asks for a listing and
// is told (an eventfd) when one is done; the listing thread does the reading, through a
// snapshot::ListingCache: a manifest is read again only when its file changed.
//
// Fresh, not merely recent: a listing asked for is one that *begins after* the request (want()),
// so it shows every change made to the store before the request, by this server (an upload's
// commit, a removal: both done before they are answered) or by any other program (a capture or
// import into the store directory, `rm --store`, a damaged file). Requests that come while a
// listing is under way share the next one: a stream of them costs one listing at a time.
//
// Thread-safety: want(), take() and event_fd() on one thread (the server's loop); the counters
// from any thread. The destructor waits for a listing under way.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "lazymem/result.h"
#include "snapshot/store.h"
#include "sys/unique_fd.h"

namespace lazymem::pageserver {

class StoreListing {
 public:
  // What snapshot::list_store says: every snapshot, damaged ones with `damage` set.
  using Listing = Result<std::vector<snapshot::SnapshotSummary>>;

  // Lists the store once (here, on the caller's thread: the first request finds every manifest
  // read), then starts the thread.
  static Result<std::unique_ptr<StoreListing>> start(std::string store_dir);
  ~StoreListing();
  StoreListing(const StoreListing&) = delete;
  StoreListing& operator=(const StoreListing&) = delete;

  // A listing that begins after this call is wanted; returns its number. take() returns it, or
  // a later one, once event_fd() was readable.
  uint64_t want();
  // Readable when a listing is done (take() reads it).
  int event_fd() const { return event_.get(); }
  // The last listing done and its number (0 and null: none yet).
  std::pair<uint64_t, std::shared_ptr<const Listing>> take();

  uint64_t listings() const { return listings_.load(std::memory_order_relaxed); }
  uint64_t manifest_reads() const { return cache_.manifest_reads(); }

 private:
  explicit StoreListing(std::string store_dir) : store_dir_(std::move(store_dir)) {}
  void run();

  const std::string store_dir_;
  snapshot::ListingCache cache_;  // the thread's
  sys::UniqueFd event_;
  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t wanted_ = 0;    // (mu_) the newest listing asked for
  uint64_t started_ = 0;   // (mu_) the newest begun
  uint64_t finished_ = 0;  // (mu_) the newest done: last_
  std::shared_ptr<const Listing> last_;  // (mu_)
  bool stopping_ = false;                // (mu_)
  std::atomic<uint64_t> listings_{0};
  std::thread thread_;
};

}  // namespace lazymem::pageserver
