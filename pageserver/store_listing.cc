// StoreListing: what a page server's `list` answers, made on a thread of its own.
#include "store_listing.h"

#include <sys/eventfd.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <system_error>

namespace lazymem::pageserver {

Result<std::unique_ptr<StoreListing>> StoreListing::start(std::string store_dir) {
  auto s = std::make_shared<State>(std::move(store_dir));
  s->event.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!s->event.valid()) return sys_error("eventfd for the store's listing", errno);
  std::unique_ptr<StoreListing> l(new StoreListing(s));
  try {
    l->thread_ = std::thread([s] { run(s); });
  } catch (const std::system_error& e) {
    return Error(Errc::kIo, std::string("cannot start the thread that lists the store: ") + e.what());
  }
  return l;
}

StoreListing::~StoreListing() {
  if (!thread_.joinable()) return;
  std::unique_lock lock(s_->mu);
  s_->stopping = true;
  s_->cv.notify_one();
  // A listing stuck on a hung disk (an NFS store gone, a frozen filesystem) must not keep the
  // server from stopping: it finishes, or not, on its own.
  if (s_->stopped.wait_for(lock, std::chrono::seconds(1), [&] { return s_->exited; })) {
    lock.unlock();
    thread_.join();
  } else {
    thread_.detach();
  }
}

uint64_t StoreListing::want() {
  uint64_t n;
  {
    std::lock_guard lock(s_->mu);
    // The one under way (started) may have read the store before the request came: the next.
    n = s_->started + 1;
    if (s_->wanted >= n) return n;  // already asked for: requests share it
    s_->wanted = n;
  }
  s_->cv.notify_one();
  return n;
}

std::pair<uint64_t, std::shared_ptr<const StoreListing::Listing>> StoreListing::take() {
  uint64_t junk;
  (void)!::read(s_->event.get(), &junk, sizeof junk);
  std::lock_guard lock(s_->mu);
  return {s_->finished, s_->last};
}

void StoreListing::run(const std::shared_ptr<State>& s) {
  // Below the loop: sharing its CPU (a server pinned to one), a listing would otherwise hold the
  // loop off for its time slice, ~1 ms with 100 snapshots. Niced, not SCHED_IDLE: a loop kept
  // busy must not starve the listings.
  (void)::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), 19);
  for (;;) {
    uint64_t n;
    {
      std::unique_lock lock(s->mu);
      s->cv.wait(lock, [&] { return s->stopping || s->wanted > s->started; });
      if (s->stopping) {
        s->exited = true;
        s->stopped.notify_all();
        return;
      }
      n = s->started = s->wanted;
    }
    auto listing = std::make_shared<const Listing>(snapshot::list_store(s->store_dir, &s->cache));
    s->listings.fetch_add(1, std::memory_order_relaxed);
    {
      std::lock_guard lock(s->mu);
      s->finished = n;
      s->last = std::move(listing);
    }
    const uint64_t one = 1;
    (void)!::write(s->event.get(), &one, sizeof one);
  }
}

}  // namespace lazymem::pageserver
