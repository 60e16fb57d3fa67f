// Dirty-page tracking by write-protect faults, taken by a thread of ours (before Linux 6.7).
#include "dirty_write_faults.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <mutex>
#include <new>
#include <optional>
#include <thread>

#include "sys/mapping.h"
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

// One bit per tracked page: its own words, or words kept elsewhere (WriteFaults::Shared).
class PageBits {
 public:
  explicit PageBits(size_t pages) : own_((pages + 63) / 64), w_(own_.data()), n_(own_.size()) {}
  PageBits(uint64_t* words, size_t pages) : w_(words), n_((pages + 63) / 64) {}
  PageBits(const PageBits&) = delete;
  PageBits& operator=(const PageBits&) = delete;
  bool test(size_t i) const { return (w_[i / 64] >> (i % 64)) & 1; }
  void set(size_t i) { w_[i / 64] |= uint64_t{1} << (i % 64); }
  void clear(size_t i) { w_[i / 64] &= ~(uint64_t{1} << (i % 64)); }
  // The first set bit at or after `i`, or `end`.
  size_t next(size_t i, size_t end) const {
    while (i < end) {
      const uint64_t w = w_[i / 64] >> (i % 64);
      if (w != 0) return std::min(end, i + static_cast<size_t>(__builtin_ctzll(w)));
      i = (i / 64 + 1) * 64;
    }
    return end;
  }
  // Same sizes: these allocate nothing.
  void add(const PageBits& o) {
    for (size_t w = 0; w < n_; ++w) w_[w] |= o.w_[w];
  }
  void remove(const PageBits& o) {
    for (size_t w = 0; w < n_; ++w) w_[w] &= ~o.w_[w];
  }
  void copy_from(const PageBits& o) { std::copy(o.w_, o.w_ + n_, w_); }
  void reset() { std::fill(w_, w_ + n_, 0); }

 private:
  std::vector<uint64_t> own_;
  uint64_t* w_;
  size_t n_;
};

// The pages of `r` in `pid`'s memory that are not write-protected, from /proc/PID/pagemap:
// fn(index in r, hole) for each, `hole` when nothing is behind it.
template <typename Fn>
Status each_unprotected(pid_t pid, const AddressRange& r, Fn&& fn) {
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
      if ((entries[i] & kUffdWp) == 0) fn(done + i, (entries[i] & (kPresent | kSwapped)) == 0);
    }
    done += read;
  }
  return ok_status();
}

// The memory the tracker writes may be tracked memory (a process tracking its own heap, where
// the tracker's own objects live), and a write there faults, which only the thread resolves. So
// the thread writes only to `Shared`, mapped apart from anything tracked, and to its stack; and
// nothing writes to the heap while holding the lock the thread needs.
class WriteFaults final : public DirtyTracker::Impl {
 public:
  WriteFaults(std::vector<AddressRange> ranges, pid_t pid, sys::Uffd uffd, sys::UniqueFd stop, sys::Mapping shared)
      : Impl(std::move(ranges), DirtyMethod::kWriteFaults),
        pid_(pid),
        uffd_(std::move(uffd)),
        stop_(std::move(stop)),
        first_(first_pages(this->ranges)),
        total_(first_.back() + this->ranges.back().length / kPage),
        mapping_(std::move(shared)),
        sh_(*new (mapping_.data()) Shared()),
        dirty_(bits_at(0), total_),
        gone_(bits_at(1), total_),
        scratch_(bits_at(2), total_) {}

  // Bytes of the `Shared` mapping for `pages` tracked pages.
  static size_t shared_bytes(size_t pages) { return sizeof(Shared) + 3 * words(pages) * sizeof(uint64_t); }

  ~WriteFaults() override {
    // Unregistering wakes every writer waiting on us, and lets the next ones through.
    for (size_t i = 0; i < registered_; ++i) (void)uffd_.unregister(ranges[i].start, ranges[i].length);
    if (thread_.joinable()) {
      const uint64_t one = 1;
      (void)!::write(stop_.get(), &one, sizeof one);
      thread_.join();
    }
    sh_.~Shared();
  }

  // The thread first: from the first protection on, a write (the tracker's own allocations
  // included) waits for it. Then the ranges are registered and protected. A page with nothing
  // behind it cannot be protected before 6.4 (UFFD_FEATURE_WP_UNPOPULATED), and its first write
  // would go unseen: each gets the zero page (shared: page tables are all it costs), protected.
  Status start() {
    try {
      thread_ = std::thread([this] { run(); });
    } catch (const std::system_error& e) {
      return Error(Errc::kIo, std::string("dirty tracking: cannot start its thread: ") + e.what());
    }
    for (const AddressRange& r : ranges) {
      Status s = uffd_.register_write_protected(r.start, r.length, false);
      if (!s.ok()) {
        // Only what this call registered: this range is not ours (EBUSY: another uffd's).
        if (s.error().sys_errno() == EBUSY) {
          return Error(Errc::kExists, fmt::format("dirty tracking: {:#x}-{:#x} is registered with another userfaultfd "
                                                  "(a lazy restore still serving it? finish() it first)",
                                                  r.start, r.end()));
        }
        return std::move(s).error().wrap("dirty tracking");
      }
      ++registered_;
    }
    PageBits pages(total_), none(total_);
    for (size_t i = 0; i < total_; ++i) pages.set(i);
    LAZYMEM_TRY(protect(pages, none));
    // What that could not protect: the holes, and pages filled since (protected now, and
    // counted clean: written during start(), before the caller's first copy).
    PageBits left(total_), holes(total_);
    for (size_t r = 0; r < ranges.size(); ++r) {
      LAZYMEM_TRY(each_unprotected(pid_, ranges[r], [&](size_t k, bool hole) {
        left.set(first_[r] + k);
        if (hole) holes.set(first_[r] + k);
      }));
    }
    return protect(left, holes);
  }

  Result<std::vector<AddressRange>> collect() override {
    PageBits taken(total_), holes(total_), gone(total_);
    bool unmapped = false;
    Failure failure;
    {
      std::lock_guard lock(sh_.mu);  // copied to the stack and to scratch_ under it, then on
      failure = sh_.failure;
      unmapped = sh_.unmapped;
      scratch_.copy_from(gone_);
    }
    gone.copy_from(scratch_);
    if (failure.what != nullptr) {
      return Error(Errc::kIo, fmt::format("the dirty-page tracker stopped ({} at {:#x}: {}); copy the tracked ranges "
                                          "afresh",
                                          failure.what, failure.at, std::strerror(failure.err)));
    }
    if (!uffd_.mm_alive(ranges.front().start)) {  // its memory is gone: no fault would come again
      return Error(Errc::kNotFound, fmt::format("process {} has exited", pid_ == 0 ? ::getpid() : pid_));
    }
    if (unmapped) LAZYMEM_TRY(check_not_mapped_again(gone));
    // Besides the faults noted: every page the walk finds unprotected. A page MADV_DONTNEED
    // dropped is a hole now (it reads as zeros: a change), or, written since, a fresh page
    // without the mark; so is one MADV_FREE let go and the kernel reclaimed. (The REMOVE event
    // comes before the page is zapped: a page noted from it and protected could be zapped
    // after, and written unseen. The walk sees what is there.) A page that loses its
    // protection after the walk is the thread's to note, or the next walk's to find.
    for (size_t r = 0; r < ranges.size(); ++r) {
      LAZYMEM_TRY(each_unprotected(pid_, ranges[r], [&](size_t k, bool hole) {
        taken.set(first_[r] + k);
        if (hole) holes.set(first_[r] + k);
      }));
    }
    {
      std::lock_guard lock(sh_.mu);
      scratch_.copy_from(dirty_);
      dirty_.reset();
    }
    taken.add(scratch_);
    // Protected again before the pages are reported: a write from now on faults, and is the
    // next collect()'s; one before this was, and the caller's copy, made after, holds it. (A
    // page the thread lifts meanwhile is noted for the next one too.)
    LAZYMEM_TRY(protect(taken, holes));
    {
      std::lock_guard lock(sh_.mu);  // unmapped meanwhile (its UNMAP read): not reported
      scratch_.copy_from(gone_);
    }
    taken.remove(scratch_);
    std::vector<AddressRange> out;
    for (size_t r = 0; r < ranges.size(); ++r) {
      const size_t end = first_[r] + ranges[r].length / kPage;
      for (size_t i = taken.next(first_[r], end); i < end;) {
        size_t j = i;
        while (j < end && taken.test(j)) ++j;
        const AddressRange run{address_of(r, i), (j - i) * kPage};
        if (!out.empty() && out.back().end() == run.start) out.back().length += run.length;
        else out.push_back(run);
        i = taken.next(j, end);
      }
    }
    return out;
  }

 private:
  // Why the thread stopped tracking: static text and numbers (it allocates nothing).
  struct Failure {
    const char* what = nullptr;
    uintptr_t at = 0;
    int err = 0;
  };

  // What the thread writes, and what is exchanged with it under `mu`.
  struct Shared {
    std::mutex mu;
    bool unmapped = false;  // (mu) gone_ has pages: collect() checks nothing is mapped there again
    Failure failure;        // (mu)
    bool stopped = false;   // (mu) `failure` is set: no longer tracking
    // The thread's alone.
    std::array<uffd_msg, 64> msgs{};
    std::array<uintptr_t, 1024> waiting{};  // faults whose lift met a map change not read yet
    size_t waiting_count = 0;
  };
  static size_t words(size_t pages) { return (pages + 63) / 64; }
  uint64_t* bits_at(size_t k) {
    auto* base = reinterpret_cast<uint64_t*>(static_cast<std::byte*>(mapping_.data()) + sizeof(Shared));
    return base + k * words(total_);
  }

  static std::vector<size_t> first_pages(const std::vector<AddressRange>& ranges) {
    std::vector<size_t> first;
    size_t n = 0;
    for (const AddressRange& r : ranges) {
      first.push_back(n);
      n += r.length / kPage;
    }
    return first;
  }
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

  // Gives each hole of `pages` the zero page and write-protects every run of `pages`, without
  // the lock. What turns out to be no mapping at all (unmapped, its UNMAP not read yet) is taken
  // out of `pages`.
  Status protect(PageBits& pages, const PageBits& holes) {
    for (size_t r = 0; r < ranges.size(); ++r) {
      const size_t end = first_[r] + ranges[r].length / kPage;
      for (int pass = 0; pass < 2; ++pass) {  // holes filled, then everything protected
        const PageBits& which = pass == 0 ? holes : pages;
        for (size_t i = which.next(first_[r], end); i < end;) {
          size_t j = i;
          while (j < end && which.test(j)) ++j;
          auto op = pass == 0 ? &WriteFaults::fill_zeros : &WriteFaults::write_protect;
          LAZYMEM_TRY(by_mapping(address_of(r, i), address_of(r, i) + (j - i) * kPage, op, [&](uintptr_t a, uintptr_t b) {
            for (uintptr_t p = a; p < b; p += kPage) pages.clear(first_[r] + (p - ranges[r].start) / kPage);
          }));
          i = which.next(j, end);
        }
      }
    }
    return ok_status();
  }

  // op(start, end) on the whole range, or, where it is no single mapping (before 6.5 one
  // UFFDIO_WRITEPROTECT, and any UFFDIO_ZEROPAGE, must stay within one), mapping by mapping;
  // gone(a, b) for each part that is no mapping at all.
  template <typename Gone>
  Status by_mapping(uintptr_t start, uintptr_t end, sys::InstallResult (WriteFaults::*op)(uintptr_t, uintptr_t), Gone&& gone) {
    sys::InstallResult r = again((this->*op)(start, end), op, start, end);
    if (r.outcome != sys::InstallOutcome::kGone) return outcome_status(r, start, end);
    LAZYMEM_ASSIGN_OR_RETURN(std::vector<sys::Vma> vmas, sys::read_vmas(pid_));
    uintptr_t at = start;
    for (const sys::Vma& v : vmas) {
      if (v.end <= at || v.start >= end) continue;
      if (v.start > at) gone(at, v.start);
      const uintptr_t a = std::max(at, v.start), b = std::min(end, v.end);
      sys::InstallResult piece = again((this->*op)(a, b), op, a, b);
      if (piece.outcome == sys::InstallOutcome::kGone) gone(a, b);
      else LAZYMEM_TRY(outcome_status(piece, a, b));
      at = b;
    }
    if (at < end) gone(at, end);
    return ok_status();
  }

  // Retries an op that met a map change the thread has not read yet (EAGAIN): the thread does
  // not need anything this one holds to read it.
  sys::InstallResult again(sys::InstallResult r, sys::InstallResult (WriteFaults::*op)(uintptr_t, uintptr_t),
                           uintptr_t start, uintptr_t end) {
    for (int tries = 0; r.outcome == sys::InstallOutcome::kAgain && tries < 10000; ++tries) {
      ::usleep(100);
      r = (this->*op)(start, end);
    }
    return r;
  }

  Status outcome_status(const sys::InstallResult& r, uintptr_t start, uintptr_t end) const {
    switch (r.outcome) {
      case sys::InstallOutcome::kDone:
      case sys::InstallOutcome::kExists:
      case sys::InstallOutcome::kGone:
        return ok_status();
      case sys::InstallOutcome::kExited:
        return Error(Errc::kNotFound, fmt::format("process {} has exited", pid_ == 0 ? ::getpid() : pid_));
      default:
        return sys_error(fmt::format("dirty tracking: protecting {:#x}-{:#x}", start, end), r.err);
    }
  }

  sys::InstallResult write_protect(uintptr_t start, uintptr_t end) { return uffd_.write_protect(start, end - start, true); }

  // The zero page at each page of [start, end) with nothing behind it; a page filled meanwhile
  // (by the process itself) is left as it is: it is protected next, and reported.
  sys::InstallResult fill_zeros(uintptr_t start, uintptr_t end) {
    for (uintptr_t at = start;;) {
      sys::InstallResult r = uffd_.zeropage(at, end - at, false);
      const bool past = r.outcome == sys::InstallOutcome::kExists || (r.outcome == sys::InstallOutcome::kAgain && r.bytes > 0);
      if (!past) return r;
      at += r.bytes + (r.outcome == sys::InstallOutcome::kExists ? kPage : 0);  // past the page already there
      if (at >= end) return {};
    }
  }

  // After memory was unmapped: memory mapped there again is not registered, and its writes
  // would go unseen.
  Status check_not_mapped_again(const PageBits& gone) const {
    LAZYMEM_ASSIGN_OR_RETURN(std::vector<sys::Vma> vmas, sys::read_vmas(pid_));
    for (size_t r = 0; r < ranges.size(); ++r) {
      const size_t end = first_[r] + ranges[r].length / kPage;
      for (size_t i = gone.next(first_[r], end); i < end;) {
        size_t j = i;
        while (j < end && gone.test(j)) ++j;
        const uintptr_t a = address_of(r, i), b = address_of(r, j);
        // The first mapping that ends past `a`: mapped again if it begins before `b`.
        auto v = std::upper_bound(vmas.begin(), vmas.end(), a, [](uintptr_t x, const sys::Vma& m) { return x < m.end; });
        if (v != vmas.end() && v->start < b) {
          return Error(Errc::kUnsupported,
                       fmt::format("dirty tracking: tracked memory at {:#x}-{:#x} was unmapped and mapped again: its "
                                   "pages can no longer be told apart; copy the range afresh",
                                   std::max(a, v->start), std::min(b, v->end)));
        }
        i = gone.next(j, end);
      }
    }
    return ok_status();
  }

  // The thread. Allocates nothing: its buffers are members.
  void run() {
    for (;;) {
      pollfd p[2] = {{uffd_.fd(), POLLIN, 0}, {stop_.get(), POLLIN, 0}};
      const int timeout = sh_.waiting_count > 0 ? 1 : (sh_.stopped ? 10 : -1);
      if (::poll(p, 2, timeout) < 0 && errno != EINTR) {
        std::lock_guard lock(sh_.mu);
        fail("poll", 0, errno);
        continue;
      }
      if (p[1].revents != 0) return;
      // Read under the lock: an UNMAP read lets the munmap() return, and a collect() after that
      // must find it noted.
      std::lock_guard lock(sh_.mu);
      const ssize_t got = ::read(uffd_.fd(), sh_.msgs.data(), sizeof sh_.msgs);
      if (got < 0 && errno != EAGAIN && errno != EINTR) fail("reading its userfaultfd", 0, errno);
      const size_t n = got > 0 ? static_cast<size_t>(got) / sizeof(uffd_msg) : 0;
      for (size_t i = 0; i < n; ++i) {
        const uffd_msg& m = sh_.msgs[i];
        switch (m.event) {
          case UFFD_EVENT_PAGEFAULT: {
            const uintptr_t page = m.arg.pagefault.address & ~(kPage - 1);
            if (sh_.waiting_count < sh_.waiting.size()) sh_.waiting[sh_.waiting_count++] = page;
            else (void)uffd_.wake(page, kPage);  // no room to hold it: the write faults again
            break;
          }
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
      size_t kept = 0;
      for (size_t i = 0; i < sh_.waiting_count; ++i) {
        if (!resolve(sh_.waiting[i])) sh_.waiting[kept++] = sh_.waiting[i];
      }
      sh_.waiting_count = kept;
    }
  }

  void forget(uintptr_t start, uintptr_t end) {
    each_page(start, end, [&](size_t i) {
      dirty_.clear(i);
      gone_.set(i);
    });
    sh_.unmapped = true;
  }

  // Notes a write-protect fault and lets the write through; false to try again after the next
  // events (a map change not read yet).
  bool resolve(uintptr_t page) {
    const std::optional<size_t> i = sh_.stopped ? std::nullopt : index_of(page);
    if (i) dirty_.set(*i);
    // Lifted, which wakes the writer (no longer tracking, or memory moved past the ranges: only that).
    const sys::InstallResult r = uffd_.write_protect(page, kPage, false);
    switch (r.outcome) {
      case sys::InstallOutcome::kAgain:
        return false;
      case sys::InstallOutcome::kFailed:
        fail("lifting a write-protect", page, r.err);
        [[fallthrough]];
      case sys::InstallOutcome::kGone:  // unmapped meanwhile: a failed lift wakes nobody
        (void)uffd_.wake(page, kPage);
        return true;
      default:
        return true;
    }
  }

  // Ends the tracking without leaving a writer waiting: the ranges are unregistered (the process
  // goes on untracked), and collect() says why. (mu)
  void fail(const char* what, uintptr_t at, int err) {
    if (sh_.stopped) return;
    sh_.stopped = true;
    sh_.failure = Failure{what, at, err};
    for (size_t r = 0; r < registered_; ++r) (void)uffd_.unregister(ranges[r].start, ranges[r].length);
  }

  const pid_t pid_;
  sys::Uffd uffd_;
  sys::UniqueFd stop_;
  const std::vector<size_t> first_;  // per range: the index of its first page
  const size_t total_;               // pages tracked
  std::atomic<size_t> registered_{0};  // ranges registered by start()
  sys::Mapping mapping_;             // holds sh_ and the bits below: no tracked memory
  Shared& sh_;
  PageBits dirty_;    // (sh_.mu) written since the last collect()
  PageBits gone_;     // (sh_.mu) unmapped or moved away: not reported again
  PageBits scratch_;  // (sh_.mu) collect()'s copies out of the two above
  std::thread thread_;
};

}  // namespace

Result<std::unique_ptr<DirtyTracker::Impl>> start_write_fault_tracking(std::vector<AddressRange> ranges, pid_t pid) {
  const bool other = pid != 0 && pid != ::getpid();
  // Not user-mode only: the thread resolves the faults, the kernel's own writes (a read(2) into
  // the memory) included, which a user-mode-only uffd would fail with EFAULT.
  auto uffd = other ? sys::Uffd::open_in(pid, kEvents, false) : sys::Uffd::open(kEvents, kEvents);
  if (!uffd.ok()) {
    return std::move(uffd).error().wrap(other ? fmt::format("dirty tracking of process {}", pid) : "dirty tracking");
  }
  // Non-blocking, for the thread's read after poll (a uffd of another process comes blocking).
  const int fl = ::fcntl(uffd->fd(), F_GETFL);
  if (fl < 0 || ::fcntl(uffd->fd(), F_SETFL, fl | O_NONBLOCK) != 0) return sys_error("dirty tracking: O_NONBLOCK on its uffd", errno);
  sys::UniqueFd stop(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!stop.valid()) return sys_error("dirty tracking: eventfd", errno);
  size_t pages = 0;
  for (const AddressRange& r : ranges) pages += r.length / kPage;
  LAZYMEM_ASSIGN_OR_RETURN(sys::Mapping shared, sys::Mapping::anonymous(WriteFaults::shared_bytes(pages)));
  auto t = std::make_unique<WriteFaults>(std::move(ranges), pid, std::move(*uffd), std::move(stop), std::move(shared));
  LAZYMEM_TRY(t->start());  // undone by the destructor if it fails
  return std::unique_ptr<DirtyTracker::Impl>(std::move(t));
}

}  // namespace lazymem
