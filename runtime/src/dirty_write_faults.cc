// Dirty-page tracking by write-protect faults, taken by a thread of ours (before Linux 6.7).
#include "dirty_write_faults.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <mutex>
#include <optional>
#include <thread>

#include "sys/process_maps.h"
#include "sys/uapi_compat.h"
#include "sys/uffd.h"
#include "sys/unique_fd.h"

namespace lazymem {
namespace {

// The events the thread must hear: memory unmapped or moved (what was there is gone). Each
// waits in the process until the thread reads it.
constexpr uint64_t kEvents = UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMAP;
// /proc/PID/pagemap: present, swapped, and (5.13) write-protected by a uffd.
constexpr uint64_t kPresent = uint64_t{1} << 63, kSwapped = uint64_t{1} << 62, kUffdWp = uint64_t{1} << 57;
const uintptr_t kPage = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));

// One bit per tracked page.
class PageBits {
 public:
  explicit PageBits(size_t pages) : words_((pages + 63) / 64) {}
  bool test(size_t i) const { return (words_[i / 64] >> (i % 64)) & 1; }
  void set(size_t i) { words_[i / 64] |= uint64_t{1} << (i % 64); }
  void clear(size_t i) { words_[i / 64] &= ~(uint64_t{1} << (i % 64)); }
  // The first set bit at or after `i`, or `end`.
  size_t next(size_t i, size_t end) const {
    while (i < end) {
      const uint64_t w = words_[i / 64] >> (i % 64);
      if (w != 0) return std::min(end, i + static_cast<size_t>(__builtin_ctzll(w)));
      i = (i / 64 + 1) * 64;
    }
    return end;
  }
  void add(const PageBits& o) {
    for (size_t w = 0; w < words_.size(); ++w) words_[w] |= o.words_[w];
  }
  void reset() { std::fill(words_.begin(), words_.end(), 0); }

 private:
  std::vector<uint64_t> words_;
};

// The pages of `r` in `pid`'s memory that are not write-protected, from /proc/PID/pagemap:
// fn(index in r, hole) for each, `hole` when nothing is behind it. Counts the pages present or
// swapped, and those of them protected, in `seen` and `marked`.
template <typename Fn>
Status each_unprotected(pid_t pid, const AddressRange& r, size_t& seen, size_t& marked, Fn&& fn) {
  const std::string path = pid == 0 ? "/proc/self/pagemap" : fmt::format("/proc/{}/pagemap", pid);
  sys::UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return sys_error("dirty tracking: open " + path, errno);
  std::vector<uint64_t> entries(4096);
  const size_t pages = r.length / kPage;
  for (size_t done = 0; done < pages;) {
    const size_t n = std::min(entries.size(), pages - done);
    const off_t at = static_cast<off_t>((r.start / kPage + done) * sizeof(uint64_t));
    const ssize_t got = ::pread(fd.get(), entries.data(), n * sizeof(uint64_t), at);
    if (got <= 0) return sys_error("dirty tracking: read " + path, got < 0 ? errno : EIO);
    const size_t read = static_cast<size_t>(got) / sizeof(uint64_t);
    for (size_t i = 0; i < read; ++i) {
      const bool there = (entries[i] & (kPresent | kSwapped)) != 0;
      seen += there;
      if (entries[i] & kUffdWp) {
        ++marked;
        continue;
      }
      fn(done + i, !there);
    }
    done += read;
  }
  return ok_status();
}

class WriteFaults final : public DirtyTracker::Impl {
 public:
  WriteFaults(std::vector<AddressRange> ranges, pid_t pid, sys::Uffd uffd, sys::UniqueFd stop)
      : Impl(std::move(ranges), DirtyMethod::kWriteFaults),
        pid_(pid),
        uffd_(std::move(uffd)),
        stop_(std::move(stop)),
        dirty_(count_pages()),
        gone_(count_pages()) {
    size_t n = 0;
    for (const AddressRange& r : this->ranges) {
      first_.push_back(n);
      n += r.length / kPage;
    }
  }

  ~WriteFaults() override {
    // Unregistering wakes every writer waiting on us, and lets the next ones through.
    for (const AddressRange& r : ranges) (void)uffd_.unregister(r.start, r.length);
    if (thread_.joinable()) {
      const uint64_t one = 1;
      (void)!::write(stop_.get(), &one, sizeof one);
      thread_.join();
    }
  }

  // Before 6.4 (UFFD_FEATURE_WP_UNPOPULATED) a page with nothing behind it cannot be
  // write-protected, and its first write would go unseen: each gets the zero page (shared: page
  // tables are all it costs), protected like the rest. Then the thread starts.
  Status start() {
    PageBits holes(total_pages());
    size_t seen = 0, marked = 0;
    LAZYMEM_TRY(unprotected(nullptr, holes, seen, marked));
    // Everything present was protected just now, and no thread lifts a protection yet.
    if (seen > 0 && marked == 0) {
      return Error(Errc::kUnsupported, "dirty tracking by write faults needs Linux 5.13 (the write-protect bit in "
                                       "/proc/PID/pagemap); this kernel does not report it");
    }
    PageBits pages = holes;
    LAZYMEM_TRY(protect_runs(pages, holes, nullptr, nullptr));
    try {
      thread_ = std::thread([this] { run(); });
    } catch (const std::system_error& e) {
      return Error(Errc::kIo, std::string("dirty tracking: cannot start its thread: ") + e.what());
    }
    return ok_status();
  }

  Result<std::vector<AddressRange>> collect() override {
    std::unique_lock lock(mu_);
    if (failed_) return *failed_;
    if (!uffd_.mm_alive(ranges.front().start)) {  // its memory is gone: no fault would come again
      return Error(Errc::kNotFound, fmt::format("process {} has exited", pid_ == 0 ? ::getpid() : pid_));
    }
    if (unmapped_) LAZYMEM_TRY(check_not_mapped_again());
    // Besides the faults noted: every page the walk finds unprotected. A page MADV_DONTNEED
    // dropped is a hole now (it reads as zeros: a change), or, written since, a fresh page
    // without the mark; so is one MADV_FREE let go and the kernel reclaimed. (The REMOVE event
    // comes before the page is zapped: a page noted from it and protected could be zapped
    // after, and written unseen. The walk sees what is there.) Walked without the lock, which
    // the writers' faults wait for: a page that loses its protection after the walk is the
    // thread's to note, or the next walk's to find.
    lock.unlock();
    PageBits taken(total_pages()), holes(total_pages());
    size_t seen = 0, marked = 0;
    LAZYMEM_TRY(unprotected(&taken, holes, seen, marked));
    lock.lock();
    taken.add(dirty_);
    dirty_.reset();
    for (size_t i = gone_.next(0, total_pages()); i < total_pages(); i = gone_.next(i + 1, total_pages())) {
      taken.clear(i);  // unmapped meanwhile
      holes.clear(i);
    }
    std::vector<AddressRange> out;
    // Protected again before the pages are reported: a write from now on faults, and is the
    // next collect()'s; one before this was, and the caller's copy, made after, holds it.
    LAZYMEM_TRY(protect_runs(taken, holes, &lock, &out));
    return out;
  }

 private:
  struct Fault {
    uintptr_t page;  // a write-protect fault: the only kind registered
  };

  size_t count_pages() const {
    size_t n = 0;
    for (const AddressRange& r : ranges) n += r.length / kPage;
    return n;
  }
  size_t total_pages() const { return first_.empty() ? 0 : first_.back() + ranges.back().length / kPage; }
  uintptr_t address_of(size_t range, size_t index) const { return ranges[range].start + (index - first_[range]) * kPage; }
  // The index of the tracked page at `page`, if it is one (memory moved or grown past the ranges
  // stays registered, but is not tracked).
  std::optional<size_t> index_of(uintptr_t page) const {
    auto it = std::upper_bound(ranges.begin(), ranges.end(), page, [](uintptr_t a, const AddressRange& r) { return a < r.start; });
    if (it == ranges.begin()) return std::nullopt;
    --it;
    if (page >= it->end()) return std::nullopt;
    const size_t r = static_cast<size_t>(it - ranges.begin());
    const size_t i = first_[r] + (page - it->start) / kPage;
    if (gone_.test(i)) return std::nullopt;
    return i;
  }
  // Every tracked page in [start, end).
  template <typename Fn>
  void each_page(uintptr_t start, uintptr_t end, Fn&& fn) {
    for (size_t r = 0; r < ranges.size(); ++r) {
      const uintptr_t s = std::max(start & ~(kPage - 1), ranges[r].start), e = std::min(end, ranges[r].end());
      for (uintptr_t a = s; a < e; a += kPage) fn(first_[r] + (a - ranges[r].start) / kPage);
    }
  }

  // The tracked pages the page tables hold unprotected, into `pages` (if given) and, those with
  // nothing behind them, into `holes`. Reads nothing the lock guards.
  Status unprotected(PageBits* pages, PageBits& holes, size_t& seen, size_t& marked) const {
    for (size_t r = 0; r < ranges.size(); ++r) {
      LAZYMEM_TRY(each_unprotected(pid_, ranges[r], seen, marked, [&](size_t k, bool hole) {
        const size_t i = first_[r] + k;
        if (pages) pages->set(i);
        if (hole) holes.set(i);
      }));
    }
    return ok_status();
  }

  // Write-protects each run of `pages`, the `holes` in it given the zero page first, and appends
  // the runs to `out` (if given), adjacent ones merged. A hole that is no mapping at all (unmapped,
  // its UNMAP event not read yet) is dropped from `pages`: there is nothing there to report.
  Status protect_runs(PageBits& pages, const PageBits& holes, std::unique_lock<std::mutex>* lock,
                      std::vector<AddressRange>* out) {
    for (size_t r = 0; r < ranges.size(); ++r) {
      const size_t end = first_[r] + ranges[r].length / kPage;
      for (size_t k = holes.next(first_[r], end); k < end;) {
        size_t e = k;
        while (e < end && holes.test(e)) ++e;
        LAZYMEM_ASSIGN_OR_RETURN(bool mapped, fill_zeros(address_of(r, k), address_of(r, e - 1) + kPage, lock));
        for (size_t g = k; !mapped && g < e; ++g) {  // page by page, then: which of them are gone
          LAZYMEM_ASSIGN_OR_RETURN(bool there, fill_zeros(address_of(r, g), address_of(r, g) + kPage, lock));
          if (!there) pages.clear(g);
        }
        k = holes.next(e, end);
      }
      for (size_t i = pages.next(first_[r], end); i < end;) {
        size_t j = i;
        while (j < end && pages.test(j)) ++j;
        const AddressRange run{address_of(r, i), (j - i) * kPage};
        LAZYMEM_TRY(retry_unlocked("write-protect", run.start, run.end(), lock,
                                   [&] { return uffd_.write_protect(run.start, run.length, true); }));
        if (out && !out->empty() && out->back().end() == run.start) out->back().length += run.length;
        else if (out) out->push_back(run);
        i = pages.next(j, end);
      }
    }
    return ok_status();
  }

  // Runs `op` (an ioctl on the uffd) until it is done. A map change the thread has not read yet
  // (EAGAIN) is waited out without `lock`, which the thread needs to take the event.
  template <typename Op>
  Status retry_unlocked(const char* what, uintptr_t start, uintptr_t end, std::unique_lock<std::mutex>* lock, Op&& op) {
    for (int tries = 0;; ++tries) {
      sys::InstallResult r = op();
      switch (r.outcome) {
        case sys::InstallOutcome::kDone:
        case sys::InstallOutcome::kExists:
        case sys::InstallOutcome::kGone:  // unmapped meanwhile: the event says so
          return ok_status();
        case sys::InstallOutcome::kExited:
          return Error(Errc::kNotFound, fmt::format("process {} has exited", pid_ == 0 ? ::getpid() : pid_));
        case sys::InstallOutcome::kAgain:
          if (tries < 10000) {
            if (lock) lock->unlock();
            ::usleep(100);
            if (lock) lock->lock();
            continue;
          }
          [[fallthrough]];
        case sys::InstallOutcome::kFailed:
          return sys_error(fmt::format("dirty tracking: {} {:#x}-{:#x}", what, start, end), r.err);
      }
    }
  }

  // The zero page at each page of [start, end) with nothing behind it (a page filled meanwhile,
  // by the process itself, is left as it is: it is protected next, and reported). False if the
  // range is not all one registered mapping (unmapped meanwhile).
  Result<bool> fill_zeros(uintptr_t start, uintptr_t end, std::unique_lock<std::mutex>* lock) {
    uintptr_t at = start;
    bool gone = false;
    LAZYMEM_TRY(retry_unlocked("zero-fill", start, end, lock, [&] {
      for (;;) {
        sys::InstallResult r = uffd_.zeropage(at, end - at, false);
        if (r.outcome == sys::InstallOutcome::kExists || (r.outcome == sys::InstallOutcome::kAgain && r.bytes > 0)) {
          at += r.bytes + (r.outcome == sys::InstallOutcome::kExists ? kPage : 0);  // past the page already there
          if (at >= end) return sys::InstallResult{};
          continue;
        }
        if (r.outcome == sys::InstallOutcome::kDone) at = end;
        gone = r.outcome == sys::InstallOutcome::kGone;
        return r;
      }
    }));
    return !gone;
  }

  // After memory was unmapped: memory mapped there again is not registered, and its writes
  // would go unseen.
  Status check_not_mapped_again() {
    LAZYMEM_ASSIGN_OR_RETURN(std::vector<sys::Vma> vmas, sys::read_vmas(pid_));
    for (size_t r = 0; r < ranges.size(); ++r) {
      const size_t end = first_[r] + ranges[r].length / kPage;
      for (size_t i = gone_.next(first_[r], end); i < end;) {
        size_t j = i;
        while (j < end && gone_.test(j)) ++j;
        const uintptr_t a = address_of(r, i), b = address_of(r, j);
        // The first mapping that ends past `a`: mapped again if it begins before `b`.
        auto v = std::upper_bound(vmas.begin(), vmas.end(), a, [](uintptr_t x, const sys::Vma& m) { return x < m.end; });
        if (v != vmas.end() && v->start < b) {
          return Error(Errc::kUnsupported,
                       fmt::format("dirty tracking: tracked memory at {:#x}-{:#x} was unmapped and mapped again: its "
                                   "pages can no longer be told apart; copy the range afresh",
                                   std::max(a, v->start), std::min(b, v->end)));
        }
        i = gone_.next(j, end);
      }
    }
    return ok_status();
  }

  void run() {
    std::vector<uffd_msg> msgs(64);
    std::deque<Fault> waiting;  // resolutions that met a map change not read yet (EAGAIN)
    for (;;) {
      pollfd p[2] = {{uffd_.fd(), POLLIN, 0}, {stop_.get(), POLLIN, 0}};
      if (::poll(p, 2, waiting.empty() ? -1 : 1) < 0 && errno != EINTR) {
        std::lock_guard lock(mu_);
        return fail(sys_error("dirty tracking: poll", errno));
      }
      if (p[1].revents != 0) return;
      // Read under the lock: an event read lets its madvise() or munmap() return, and a
      // collect() after that must find it noted. (collect() releases the lock while it waits
      // for an event to be read.)
      std::lock_guard lock(mu_);
      auto n = uffd_.read_events(msgs);
      if (!n.ok()) return fail(std::move(n).error());
      for (size_t i = 0; i < *n; ++i) {
        const uffd_msg& m = msgs[i];
        switch (m.event) {
          case UFFD_EVENT_PAGEFAULT:
            waiting.push_back({m.arg.pagefault.address & ~(kPage - 1)});
            break;
          case UFFD_EVENT_UNMAP:
            forget(m.arg.remove.start, m.arg.remove.end);
            break;
          case UFFD_EVENT_REMAP:
            forget(m.arg.remap.from, m.arg.remap.from + m.arg.remap.len);
            break;
          default:
            break;
        }
      }
      for (size_t k = waiting.size(); k > 0; --k) {
        Fault f = waiting.front();
        waiting.pop_front();
        if (!resolve(f)) waiting.push_back(f);
      }
    }
  }

  void forget(uintptr_t start, uintptr_t end) {
    each_page(start, end, [&](size_t i) {
      dirty_.clear(i);
      gone_.set(i);
    });
    unmapped_ = true;
  }

  // Notes the fault and lets the write through; false to try again after the next events.
  bool resolve(const Fault& f) {
    const std::optional<size_t> i = failed_ ? std::nullopt : index_of(f.page);
    if (i) dirty_.set(*i);
    // Lifted and the writer woken (no longer tracking, or memory moved past the ranges: only that).
    sys::InstallResult r = uffd_.write_protect(f.page, kPage, false);
    if (r.outcome == sys::InstallOutcome::kAgain) return false;
    if (r.outcome == sys::InstallOutcome::kFailed) {
      fail(sys_error(fmt::format("dirty tracking: lifting the write-protect at {:#x}", f.page), r.err));
      (void)uffd_.wake(f.page, kPage);
    }
    return true;
  }

  // Ends the tracking without leaving a writer waiting: the ranges are unregistered (the process
  // goes on untracked) and collect() says why. (mu_)
  void fail(Error e) {
    if (failed_) return;
    failed_ = std::move(e).wrap("the dirty-page tracker stopped; copy the tracked ranges afresh");
    for (const AddressRange& r : ranges) (void)uffd_.unregister(r.start, r.length);
  }

  const pid_t pid_;
  sys::Uffd uffd_;
  sys::UniqueFd stop_;
  std::vector<size_t> first_;  // per range: the index of its first page
  std::mutex mu_;
  PageBits dirty_;                // (mu_) written or dropped since the last collect()
  PageBits gone_;                 // (mu_) unmapped or moved away: not reported again
  bool unmapped_ = false;         // (mu_) gone_ has pages: collect() checks nothing is mapped there again
  std::optional<Error> failed_;   // (mu_)
  std::thread thread_;
};

}  // namespace

Result<std::unique_ptr<DirtyTracker::Impl>> start_write_fault_tracking(std::vector<AddressRange> ranges, pid_t pid) {
  const bool other = pid != 0 && pid != ::getpid();
  auto uffd = other ? sys::Uffd::open_in(pid, kEvents) : sys::Uffd::open(kEvents, kEvents);
  if (!uffd.ok()) {
    return std::move(uffd).error().wrap(other ? fmt::format("dirty tracking of process {}", pid) : "dirty tracking");
  }
  // Non-blocking, for the thread's read after poll (a uffd of another process comes blocking).
  const int fl = ::fcntl(uffd->fd(), F_GETFL);
  if (fl < 0 || ::fcntl(uffd->fd(), F_SETFL, fl | O_NONBLOCK) != 0) return sys_error("dirty tracking: O_NONBLOCK on its uffd", errno);
  sys::UniqueFd stop(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!stop.valid()) return sys_error("dirty tracking: eventfd", errno);
  for (size_t i = 0; i < ranges.size(); ++i) {
    Status registered = uffd->register_write_protected(ranges[i].start, ranges[i].length);
    if (!registered.ok()) {
      // Only what this call registered: range i is not ours (EBUSY: another uffd's).
      for (size_t j = 0; j < i; ++j) (void)uffd->unregister(ranges[j].start, ranges[j].length);
      if (registered.error().sys_errno() == EBUSY) {
        return Error(Errc::kExists, fmt::format("dirty tracking: {:#x}-{:#x} is registered with another userfaultfd "
                                                "(a lazy restore still serving it? finish() it first)",
                                                ranges[i].start, ranges[i].end()));
      }
      return std::move(registered).error().wrap("dirty tracking");
    }
  }
  // From here, first writes wait for the thread, which start() begins once the holes are filled.
  auto t = std::make_unique<WriteFaults>(std::move(ranges), pid, std::move(*uffd), std::move(stop));
  LAZYMEM_TRY(t->start());
  return std::unique_ptr<DirtyTracker::Impl>(std::move(t));
}

}  // namespace lazymem
