// ThreadFaults: faults resolved on the faulting thread (see thread_faults.h).
//
// Everything the SIGBUS handler touches is made before the first fault: the connection pool
// (each connection with its page buffer, request and reply buffers, zstd context), the range
// table, the statistics. The handler itself uses atomics, syscalls and those buffers only.
#include "fault/thread_faults.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <mutex>

#include "core/log.h"
#include "sys/clock.h"
#include "sys/cpu_latency.h"
#include "sys/unique_fd.h"

namespace lazymem::fault {
namespace {

void nap_us(long us) noexcept {
  timespec ts{0, us * 1000};
  ::nanosleep(&ts, nullptr);
}

// write(2) of a message with one address in it: all a signal handler may do to report.
void report(uint64_t addr, const char* why, const char* what_next) noexcept {
  char hex[19] = "0x";
  for (int i = 0; i < 16; ++i) hex[2 + i] = "0123456789abcdef"[(addr >> (60 - 4 * i)) & 0xf];
  hex[18] = '\0';
  const char* parts[] = {"lazymem: the page at ", hex, " could not be restored: ", why, "; ", what_next, "\n"};
  for (const char* p : parts) (void)!::write(STDERR_FILENO, p, std::strlen(p));
}

// The process-wide registry the handler searches: a fixed array, so the handler never meets a
// container being resized. `users` counts handlers inside a slot's restore; a restore leaves
// only once it is zero.
constexpr int kSlots = 16;
struct Slot {
  std::atomic<ThreadFaults*> owner{nullptr};
  std::atomic<int> users{0};
};
Slot g_slots[kSlots];
std::mutex g_registry_mu;  // slot claims (normal context only)
struct sigaction g_previous {};
std::once_flag g_installed;

// The handler that was there before ours, for every SIGBUS that is not a missing page of ours.
void pass_on(int sig, siginfo_t* info, void* context) noexcept {
  // SIG_DFL and SIG_IGN are values of the handler whatever SA_SIGINFO says: compared first.
  const bool dfl = g_previous.sa_handler == SIG_DFL, ign = g_previous.sa_handler == SIG_IGN;
  if (!dfl && !ign) {
    if (g_previous.sa_flags & SA_SIGINFO) {
      g_previous.sa_sigaction(sig, info, context);
    } else {
      g_previous.sa_handler(sig);
    }
    return;
  }
  const bool sent = info->si_code <= 0;  // by kill(), tgkill(), sigqueue(): not a fault
  if (ign && sent) return;               // ignored, as it was before us
  // The default action, as without us (a fault cannot be ignored): put it back and raise the
  // signal again; it arrives as this handler returns and the process dies of SIGBUS at the
  // access (a core dump shows it).
  struct sigaction def {};
  def.sa_handler = SIG_DFL;
  ::sigaction(SIGBUS, &def, nullptr);
  ::raise(SIGBUS);
}

// initial-exec: the handler's first use on a thread must not allocate (a dlopen()ed library's
// dynamic TLS would, in __tls_get_addr).
#define LAZYMEM_HANDLER_TLS thread_local __attribute__((tls_model("initial-exec")))
// The page this thread last found already present, and when: faulting on it again at once
// means it is poisoned.
LAZYMEM_HANDLER_TLS uint64_t t_last_exists = 0;
LAZYMEM_HANDLER_TLS int64_t t_last_exists_ns = 0;
constexpr int64_t kRetryWindowNs = 100'000'000;  // a retried access comes back in microseconds
// The page of the last fault no restore knew, retried once (on_sigbus).
LAZYMEM_HANDLER_TLS uint64_t t_last_unknown = 0;

constexpr int kIdle = 0, kBusy = 1, kBroken = 2, kReopening = 3;
constexpr uint32_t kWriter = 1u << 31;

}  // namespace

// The address map as the handler sees it: a reader-writer spin lock (writer first), the engine
// writing while it reads and applies the uffd's events, handlers reading around each install.
struct ThreadFaults::Table {
  std::atomic<uint32_t> state{0};  // kWriter | readers
  std::vector<MappedRange> ranges;  // sorted by start
  uint64_t generation = 0;

  // False when the deadline passes first: the engine holds the table that long only if it is
  // stuck (on the allocator lock this thread holds, say), and a fault must not wait forever.
  bool read_lock(int64_t deadline_ns) noexcept {
    for (unsigned spins = 0;; ++spins) {
      uint32_t s = state.load(std::memory_order_relaxed);
      if ((s & kWriter) == 0 && state.compare_exchange_weak(s, s + 1, std::memory_order_acquire)) return true;
      if (spins % 64 == 63 && sys::monotonic_ns() >= deadline_ns) return false;
      ::sched_yield();
    }
  }
  void read_unlock() noexcept { state.fetch_sub(1, std::memory_order_release); }
  void write_lock() noexcept {
    for (;;) {
      uint32_t s = state.load(std::memory_order_relaxed);
      if ((s & kWriter) == 0 && state.compare_exchange_weak(s, s | kWriter, std::memory_order_acquire)) break;
      ::sched_yield();
    }
    while ((state.load(std::memory_order_acquire) & ~kWriter) != 0) ::sched_yield();  // readers drain
  }
  void write_unlock() noexcept { state.fetch_and(~kWriter, std::memory_order_release); }

  const MappedRange* find(uint64_t addr) const noexcept {
    auto it = std::upper_bound(ranges.begin(), ranges.end(), addr,
                               [](uint64_t a, const MappedRange& r) { return a < r.start; });
    if (it == ranges.begin()) return nullptr;
    --it;
    return addr < it->end() ? &*it : nullptr;
  }
};

// Connections, each with the buffer its page lands in. A handler checks one out by moving its
// state from idle to busy; a broken one waits for the keeper thread to reopen it.
struct ThreadFaults::Pool {
  struct Conn {
    std::atomic<int> state{kIdle};
    std::unique_ptr<snapshot::PageFetcher> fetcher;
    std::vector<std::byte> page;
  };
  std::vector<std::unique_ptr<Conn>> conns;
  sys::UniqueFd wake;  // eventfd: a connection broke (or stop)
  std::atomic<bool> stopping{false};
  std::atomic<unsigned> next{0};
  // The CPU latency hold (sys/cpu_latency.h) the keeper takes while faults come, as the engine
  // does for its own: a faulting thread waiting in poll() for the reply wakes from a shallow
  // idle state. The handler cannot open the device itself; it asks the keeper.
  std::atomic<int64_t> last_fault_ns{0};
  std::atomic<bool> quick_wakeups{false};

  void note_fault(int64_t now) noexcept {
    last_fault_ns.store(now, std::memory_order_relaxed);
    if (!quick_wakeups.load(std::memory_order_relaxed)) {
      uint64_t one = 1;
      (void)!::write(wake.get(), &one, sizeof one);
    }
  }

  Conn* checkout(int64_t deadline_ns) noexcept {
    for (;;) {
      unsigned first = next.fetch_add(1, std::memory_order_relaxed);
      bool any_alive = false;
      for (size_t i = 0; i < conns.size(); ++i) {
        Conn& c = *conns[(first + i) % conns.size()];
        int idle = kIdle;
        if (c.state.compare_exchange_strong(idle, kBusy, std::memory_order_acquire)) return &c;
        any_alive |= idle == kBusy;
      }
      if (sys::monotonic_ns() >= deadline_ns) return nullptr;
      nap_us(any_alive ? 10 : 200);  // busy: another thread's round trip; broken: a reconnect
    }
  }
  void checkin(Conn* c) noexcept { c->state.store(kIdle, std::memory_order_release); }
  void broke(Conn* c) noexcept {
    c->state.store(kBroken, std::memory_order_release);
    uint64_t one = 1;
    (void)!::write(wake.get(), &one, sizeof one);
  }
};

ThreadFaults::ThreadFaults() = default;

Result<std::shared_ptr<ThreadFaults>> ThreadFaults::start(std::shared_ptr<snapshot::ChunkSource> source, int uffd,
                                                          std::vector<MappedRange> ranges, ThreadFaultOptions options) {
  auto tf = std::make_shared<ThreadFaults>();
  tf->source_ = std::move(source);
  tf->manifest_ = &tf->source_->manifest();
  tf->options_ = std::move(options);
  tf->attempt_ns_ = std::chrono::duration_cast<std::chrono::nanoseconds>(
                        snapshot::attempt_slice(tf->options_.deadline, tf->options_.fetch_attempts))
                        .count();
  tf->owner_ = ::getpid();
  int dup = ::fcntl(uffd, F_DUPFD_CLOEXEC, 0);
  if (dup < 0) return Error(Errc::kIo, fmt::format("dup userfaultfd: {}", std::strerror(errno)));
  tf->uffd_ = sys::Uffd::adopt(sys::UniqueFd(dup), 0);

  tf->table_ = std::make_unique<Table>();
  tf->table_->ranges = AddressMap(std::move(ranges)).ranges();

  uint32_t max_page = 0;
  for (const RegionInfo& r : tf->manifest_->regions) {
    max_page = std::max(max_page, r.page_size);
    tf->stats_.push_back(std::make_unique<LiveRegionStats>(r.name, r.length));
  }
  tf->pool_ = std::make_unique<Pool>();
  tf->pool_->wake = sys::UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (tf->pool_->wake.get() < 0) return Error(Errc::kIo, fmt::format("eventfd: {}", std::strerror(errno)));
  for (unsigned i = 0; i < std::max(1u, tf->options_.connections); ++i) {
    auto c = std::make_unique<Pool::Conn>();
    LAZYMEM_ASSIGN_OR_RETURN(c->fetcher, tf->source_->open_page_fetcher());
    c->page.resize(max_page);
    tf->pool_->conns.push_back(std::move(c));
  }

  std::call_once(g_installed, [] {
    struct sigaction sa {};
    sa.sa_sigaction = &ThreadFaults::on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_RESTART | SA_ONSTACK;
    // Nothing else runs on this thread while it holds the table or a connection: a handler that
    // longjmp()ed out of ours would leave them held, and one touching a missing page would find
    // SIGBUS blocked (the kernel then kills the process).
    sigfillset(&sa.sa_mask);
    ::sigaction(SIGBUS, &sa, &g_previous);
  });
  {
    std::lock_guard lock(g_registry_mu);
    for (int i = 0; i < kSlots; ++i) {
      ThreadFaults* none = nullptr;
      if (g_slots[i].owner.compare_exchange_strong(none, tf.get())) {
        tf->slot_ = i;
        break;
      }
    }
  }
  if (tf->slot_ < 0) {
    return Error(Errc::kUnsupported, fmt::format("at most {} restores at once can serve faults on the faulting thread", kSlots));
  }
  tf->keeper_ = std::thread([t = tf.get()] { t->keep_connections(); });
  return tf;
}

ThreadFaults::~ThreadFaults() {
  if (slot_ >= 0) {
    std::lock_guard lock(g_registry_mu);
    g_slots[slot_].owner.store(nullptr);
    while (g_slots[slot_].users.load() != 0) ::sched_yield();  // handlers under way finish first
  }
  if (keeper_.joinable()) {
    pool_->stopping = true;
    uint64_t one = 1;
    (void)!::write(pool_->wake.get(), &one, sizeof one);
    keeper_.join();
  }
}

void ThreadFaults::keep_connections() {
  auto log = log::get("runtime");
  bool retry_soon = false;
  sys::CpuLatencyHold hold;
  constexpr int64_t kLingerNs = 100'000'000;  // as the engine: given back 100 ms after the last fault
  while (!pool_->stopping) {
    pollfd p{pool_->wake.get(), POLLIN, 0};
    (void)::poll(&p, 1, retry_soon || hold.held() ? 100 : -1);
    uint64_t n;
    (void)!::read(pool_->wake.get(), &n, sizeof n);
    retry_soon = false;
    bool busy = sys::monotonic_ns() - pool_->last_fault_ns.load(std::memory_order_relaxed) < kLingerNs;
    (void)hold.set(busy);
    // While busy the handler need not ask again (held, or not permitted: nothing to do).
    pool_->quick_wakeups.store(busy, std::memory_order_relaxed);
    for (auto& c : pool_->conns) {
      if (pool_->stopping) return;
      int broken = kBroken;
      if (!c->state.compare_exchange_strong(broken, kReopening)) continue;
      log->warn("{}: reopening a page-server connection ({})", source_->describe(), c->fetcher->failure());
      Status s = c->fetcher->reopen(std::min<std::chrono::milliseconds>(options_.deadline, std::chrono::seconds(5)));
      if (!s.ok()) {
        log->warn("{}: reconnecting: {}", source_->describe(), s.error().message());
        retry_soon = true;
      }
      c->state.store(s.ok() ? kIdle : kBroken);
    }
  }
}

void ThreadFaults::begin_update() { table_->write_lock(); }

void ThreadFaults::end_update(const std::vector<MappedRange>& ranges) {
  if (ranges.size() != table_->ranges.size() ||
      !std::equal(ranges.begin(), ranges.end(), table_->ranges.begin(), [](const MappedRange& a, const MappedRange& b) {
        return a.start == b.start && a.length == b.length && a.region == b.region && a.region_offset == b.region_offset;
      })) {
    table_->ranges = ranges;
    ++table_->generation;
  }
  table_->write_unlock();
}

std::vector<RegionStats> ThreadFaults::stats() const {
  std::vector<RegionStats> out;
  for (const auto& s : stats_) out.push_back(s->read());
  return out;
}

std::string ThreadFaults::failure() const {
  const char* why = failure_.load();
  if (why == nullptr) return {};
  return fmt::format("the page at {:#x} could not be restored: {}", failed_addr_.load(), why);
}

void ThreadFaults::on_sigbus(int sig, siginfo_t* info, void* context) {
  const int saved_errno = errno;
  if (info->si_code == BUS_ADRERR) {  // a missing page in SIGBUS mode (poisoned ones are BUS_MCEERR_AR)
    const uint64_t addr = reinterpret_cast<uint64_t>(info->si_addr);
    const int64_t start = sys::monotonic_ns();
    const pid_t self = ::getpid();
    bool failed = false;
    while (!failed) {
      bool changing = false;
      for (Slot& s : g_slots) {
        s.users.fetch_add(1);
        ThreadFaults* tf = s.owner.load();
        Served r = tf != nullptr && tf->owner_ == self ? tf->serve(addr, start) : Served::kNotOurs;
        s.users.fetch_sub(1);
        if (r == Served::kDone) {
          t_last_unknown = 0;
          errno = saved_errno;
          return;
        }
        failed |= r == Served::kFailed;  // reported and poisoned: the access fails as it would have
        changing |= r == Served::kMapChanging;
      }
      // An address no restore knows while the process is changing its map (mremap): the engine
      // is about to apply it. Anything else is not ours.
      if (failed || !changing || sys::monotonic_ns() - start > 1000000000) break;
      nap_us(20);
    }
    // Not ours now, but maybe a moment ago: madvise(MADV_DONTNEED) returns once the engine has
    // *read* its REMOVE event, and the engine unregisters the range while this thread waits for
    // the table. So the access is retried once (it zero-fills now) before the signal is passed
    // on; a genuine bus error comes straight back for the same address.
    const uint64_t page = addr & ~uint64_t{4095};
    if (!failed && t_last_unknown != page) {
      t_last_unknown = page;
      errno = saved_errno;
      return;
    }
    t_last_unknown = 0;
  }
  errno = saved_errno;
  pass_on(sig, info, context);
}

ThreadFaults::Served ThreadFaults::serve(uint64_t addr, int64_t start_ns) noexcept {
  const int64_t deadline = start_ns + std::chrono::duration_cast<std::chrono::nanoseconds>(options_.deadline).count();
  pool_->note_fault(start_ns);
  Pool::Conn* conn = nullptr;
  unsigned bad = 0;
  uint64_t refused_by = 0;  // servers (by index, modulo 64) that refused this page
  bool have = false;  // conn->page holds `have_ref`'s page
  snapshot::ChunkRef have_ref;
  uint32_t have_index = 0;
  for (;;) {
    if (!table_->read_lock(deadline)) {
      if (conn) pool_->checkin(conn);
      fail(addr & ~uint64_t{4095}, kNoRegion, "the restore's address map stayed locked past the fault deadline");
      return Served::kFailed;
    }
    const MappedRange* r = table_->find(addr);
    if (r == nullptr) {
      // Past every snapshot range. If the page is in a mapping registered with this restore's
      // uffd, the process grew that mapping (mremap: the new tail stays registered), and the
      // kernel would have zero-filled it; if not, the ioctl refuses and the fault is not ours.
      // Under the table's lock: a change not yet applied makes the ioctl EAGAIN.
      const sys::InstallResult res = uffd_.zeropage(addr & ~uint64_t{4095}, 4096, false);
      table_->read_unlock();
      if (conn) pool_->checkin(conn);
      // (kExists, a page there already, goes as not ours: the access is retried once.)
      if (res.outcome == sys::InstallOutcome::kDone) return Served::kDone;
      pollfd p{uffd_.fd(), POLLIN, 0};  // events not yet applied?
      return res.outcome == sys::InstallOutcome::kAgain || ::poll(&p, 1, 0) > 0 ? Served::kMapChanging
                                                                                 : Served::kNotOurs;
    }
    const uint32_t region = r->region;
    const uint32_t page_size = manifest_->regions[region].page_size;
    const uint64_t roff = (addr - r->start + r->region_offset) / page_size * page_size;
    const uint64_t page_addr = addr / page_size * page_size;
    const uint64_t generation = table_->generation;
    table_->read_unlock();

    const snapshot::ChunkRef ref{region, static_cast<uint32_t>(roff / manifest_->chunk_size)};
    const uint32_t index = static_cast<uint32_t>(roff % manifest_->chunk_size / page_size);
    const bool zero = manifest_->regions[region].chunks[ref.chunk].codec == Codec::kZero;
    if (!zero && !(have && have_ref == ref && have_index == index)) {
      if (conn == nullptr) conn = pool_->checkout(deadline);
      if (conn == nullptr) {
        fail(page_addr, region, "no page-server connection could be had before the fault deadline");
        return Served::kFailed;
      }
      // One connection gets a share of the deadline (as the engine's reconnects do): a server
      // that stops answering without closing (hung, stopped, a dead path) is given up on in
      // time to reopen (to the next server, where there are several) and ask again.
      const auto outcome = conn->fetcher->fetch(ref, index, std::span(conn->page.data(), page_size),
                                                std::min(deadline, sys::monotonic_ns() + attempt_ns_));
      const auto dg = conn->fetcher->datagrams();  // read before a broken connection goes to the keeper
      stats_[region]->add_datagrams(dg.answered, dg.lost, dg.on_connection);
      switch (outcome) {
        case snapshot::PageFetcher::Outcome::kOk:
          have = true, have_ref = ref, have_index = index;
          break;
        case snapshot::PageFetcher::Outcome::kBroken: {
          const char* why = conn->fetcher->failure();
          pool_->broke(conn);
          conn = nullptr;
          if (sys::monotonic_ns() >= deadline) {
            fail(page_addr, region, why);
            return Served::kFailed;
          }
          continue;  // on another connection, or this one reopened
        }
        case snapshot::PageFetcher::Outcome::kRefused: {
          // The connection goes to the keeper, to be reopened at the next server. A server's
          // refusal spends one attempt per fault, however many connections sit on it; once
          // every server has refused, the page fails.
          const char* why = conn->fetcher->failure();
          const size_t servers = std::min<size_t>(conn->fetcher->servers(), 64);
          const uint64_t bit = uint64_t{1} << (conn->fetcher->server() % 64);
          pool_->broke(conn);
          conn = nullptr;
          const bool again = (refused_by & bit) != 0;
          refused_by |= bit;
          if ((!again && ++bad >= std::max(1u, options_.fetch_attempts)) ||
              static_cast<size_t>(__builtin_popcountll(refused_by)) >= servers || sys::monotonic_ns() >= deadline) {
            fail(page_addr, region, why);
            return Served::kFailed;
          }
          continue;
        }
        case snapshot::PageFetcher::Outcome::kBad:
          if (++bad >= std::max(1u, options_.fetch_attempts) || sys::monotonic_ns() >= deadline) {
            const char* why = conn->fetcher->failure();
            pool_->checkin(conn);
            fail(page_addr, region, why);
            return Served::kFailed;
          }
          continue;
      }
    }

    // Install by the map the page was looked up in: the table is held across the ioctl, so the
    // engine cannot apply a change in between (a change not yet read makes the ioctl EAGAIN).
    if (!table_->read_lock(deadline)) {
      if (conn) pool_->checkin(conn);
      fail(page_addr, region, "the restore's address map stayed locked past the fault deadline");
      return Served::kFailed;
    }
    if (table_->generation != generation) {
      table_->read_unlock();
      continue;  // looked up again (the lock above is bounded by the deadline)
    }
    sys::InstallResult res = zero ? uffd_.zeropage(page_addr, page_size, false)
                                  : uffd_.copy(page_addr, conn->page.data(), page_size, false);
    table_->read_unlock();
    if (res.outcome == sys::InstallOutcome::kAgain) {
      if (sys::monotonic_ns() >= deadline) {
        if (conn) pool_->checkin(conn);
        fail(page_addr, region, "the process kept changing its memory map");
        return Served::kFailed;
      }
      nap_us(20);  // the engine reads the pending event, then the map is current
      continue;
    }
    const size_t received = conn ? conn->fetcher->received() : 0;
    if (conn) pool_->checkin(conn);
    LiveRegionStats& st = *stats_[region];
    switch (res.outcome) {
      case sys::InstallOutcome::kDone:
        t_last_exists = 0;
        st.add_fault();
        if (zero) {
          st.add_zero(1);
        } else {
          st.add_installed(1, true);
          st.add_fetched(received, page_size);
        }
        st.add_latency_us(static_cast<uint64_t>(sys::monotonic_ns() - start_ns) / 1000);
        return Served::kDone;
      case sys::InstallOutcome::kExists:
        // Prefetch or another thread was first, and the retried access finds the page. Unless
        // this thread was told so for this very page last time: then the page is poisoned (a
        // failure: the kernel reports those as BUS_ADRERR too without CONFIG_MEMORY_FAILURE).
        if (t_last_exists == page_addr && sys::monotonic_ns() - t_last_exists_ns < kRetryWindowNs) {
          t_last_exists = 0;
          const char* why = failure_.load();
          report(page_addr, why != nullptr ? why : "the page was poisoned", "the access dies of SIGBUS");
          return Served::kFailed;
        }
        t_last_exists = page_addr;
        t_last_exists_ns = sys::monotonic_ns();
        return Served::kDone;
      case sys::InstallOutcome::kGone:  // dropped or unmapped meanwhile: the retried access decides
      case sys::InstallOutcome::kExited:
        return Served::kDone;
      case sys::InstallOutcome::kAgain:
      case sys::InstallOutcome::kFailed:
        break;
    }
    fail(page_addr, region, "installing the page failed");
    return Served::kFailed;
  }
}

void ThreadFaults::fail(uint64_t page_addr, uint32_t region, const char* why) noexcept {
  const char* none = nullptr;
  if (failure_.compare_exchange_strong(none, why)) failed_addr_.store(page_addr);
  if (region != kNoRegion) stats_[region]->add_error();
  const uint32_t page_size = region != kNoRegion ? manifest_->regions[region].page_size : 4096;
  if (options_.can_poison) {
    report(page_addr, why, "poisoned: the access dies of SIGBUS");
    (void)uffd_.poison(page_addr, page_size);  // other threads touching it fail too
    return;
  }
  report(page_addr, why, "no UFFDIO_POISON on this kernel: killing the process");
  ::kill(::getpid(), SIGKILL);
}

}  // namespace lazymem::fault
