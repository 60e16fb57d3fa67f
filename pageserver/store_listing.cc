// StoreListing: what a page server's `list` answers, made on a thread of its own.
#include "store_listing.h"

#include <sys/eventfd.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cerrno>
#include <system_error>

namespace lazymem::pageserver {

Result<std::unique_ptr<StoreListing>> StoreListing::start(std::string store_dir) {
  std::unique_ptr<StoreListing> l(new StoreListing(std::move(store_dir)));
  l->event_.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!l->event_.valid()) return sys_error("eventfd for the store's listing", errno);
  // The first listing on the caller's thread, before the listing thread exists: the first
  // request finds every manifest read, and a server starting does nothing behind its caller's
  // back (a program that forks right after start-up, as tests do, could copy into its child a
  // lock the listing thread holds: the sanitizers' allocator hung restore children so).
  l->last_ = std::make_shared<const Listing>(snapshot::list_store(l->store_dir_, &l->cache_));
  l->wanted_ = l->started_ = l->finished_ = 1;
  l->listings_ = 1;
  try {
    l->thread_ = std::thread([p = l.get()] { p->run(); });
  } catch (const std::system_error& e) {
    return Error(Errc::kIo, std::string("cannot start the thread that lists the store: ") + e.what());
  }
  return l;
}

StoreListing::~StoreListing() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_one();
  if (thread_.joinable()) thread_.join();
}

uint64_t StoreListing::want() {
  uint64_t n;
  {
    std::lock_guard lock(mu_);
    // The one under way (started_) may have read the store before the request came: the next.
    n = started_ + 1;
    if (wanted_ >= n) return n;  // already asked for: requests share it
    wanted_ = n;
  }
  cv_.notify_one();
  return n;
}

std::pair<uint64_t, std::shared_ptr<const StoreListing::Listing>> StoreListing::take() {
  uint64_t junk;
  (void)!::read(event_.get(), &junk, sizeof junk);
  std::lock_guard lock(mu_);
  return {finished_, last_};
}

void StoreListing::run() {
  // Below the loop: sharing its CPU (a server pinned to one), a listing would otherwise hold the
  // loop off for its time slice, ~1 ms with 100 snapshots. Niced, not SCHED_IDLE: a loop kept
  // busy must not starve the listings.
  (void)::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), 19);
  for (;;) {
    uint64_t n;
    {
      std::unique_lock lock(mu_);
      cv_.wait(lock, [&] { return stopping_ || wanted_ > started_; });
      if (stopping_) return;
      n = started_ = wanted_;
    }
    auto listing = std::make_shared<const Listing>(snapshot::list_store(store_dir_, &cache_));
    listings_.fetch_add(1, std::memory_order_relaxed);
    {
      std::lock_guard lock(mu_);
      finished_ = n;
      last_ = std::move(listing);
    }
    const uint64_t one = 1;
    (void)!::write(event_.get(), &one, sizeof one);
  }
}

}  // namespace lazymem::pageserver
