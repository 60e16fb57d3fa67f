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
// from any thread. The destructor waits up to a second for a listing under way; one that takes
// longer (a hung disk) is left to finish on its own, holding only its own state.
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

  // Starts the thread, which reads nothing until a listing is wanted: a server with a large
  // store starts at once (its first `list` reads the manifests), and a program that forks right
  // after start-up copies into its child no lock the thread holds (the sanitizers' allocator
  // hung restore children so).
  static Result<std::unique_ptr<StoreListing>> start(std::string store_dir);
  ~StoreListing();
  StoreListing(const StoreListing&) = delete;
  StoreListing& operator=(const StoreListing&) = delete;

  // A listing that begins after this call is wanted; returns its number. take() returns it, or
  // a later one, once event_fd() was readable.
  uint64_t want();
  // Readable when a listing is done (take() reads it).
  int event_fd() const { return s_->event.get(); }
  // The last listing done and its number (0 and null: none yet).
  std::pair<uint64_t, std::shared_ptr<const Listing>> take();

  uint64_t listings() const { return s_->listings.load(std::memory_order_relaxed); }
  uint64_t manifest_reads() const { return s_->cache.manifest_reads(); }

 private:
  // Everything the thread uses: shared with it, so that a thread left behind by the destructor
  // (its listing stuck on a hung disk) never touches freed memory.
  struct State {
    explicit State(std::string dir) : store_dir(std::move(dir)) {}
    const std::string store_dir;
    snapshot::ListingCache cache;  // the thread's
    sys::UniqueFd event;
    std::mutex mu;
    std::condition_variable cv;       // the thread waits for wanted > started, or stopping
    std::condition_variable stopped;  // the destructor waits for `exited`
    uint64_t wanted = 0;    // (mu) the newest listing asked for
    uint64_t started = 0;   // (mu) the newest begun
    uint64_t finished = 0;  // (mu) the newest done: last
    std::shared_ptr<const Listing> last;  // (mu)
    bool stopping = false;                // (mu)
    bool exited = false;                  // (mu) the thread has returned
    std::atomic<uint64_t> listings{0};
  };

  explicit StoreListing(std::shared_ptr<State> s) : s_(std::move(s)) {}
  static void run(const std::shared_ptr<State>& s);

  std::shared_ptr<State> s_;
  std::thread thread_;
};

}  // namespace lazymem::pageserver
