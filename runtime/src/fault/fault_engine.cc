// FaultEngine: one event loop resolving missing-page faults from chunk sources.
#include "fault/fault_engine.h"

#include <fmt/format.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <ctime>
#include <map>

#include "core/log.h"
#include "fault/decode_pool.h"
#include "snapshot/chunk_codec.h"
#include "sys/clock.h"
#include "sys/cpu_latency.h"
#include "sys/mapping.h"
#include "sys/syscall_result.h"
#include "sys/uapi_compat.h"

namespace lazymem::fault {
namespace {

using snapshot::ChunkRef;
using snapshot::ChunkRequest;

// Chunk states. Values >= kInFlight are kInFlight + the pending slot fetching the chunk.
constexpr uint32_t kAbsent = 0;
constexpr uint32_t kPresent = 1;
constexpr uint32_t kFailed = 2;
constexpr uint32_t kZeroRetry = 3;  // a zero chunk whose install met EAGAIN: on Session::retry
constexpr uint32_t kStaged = 4;     // huge pages: in its page's stage, the page not installed yet
constexpr uint32_t kInFlight = 16;

constexpr uint64_t kControlTag = ~uint64_t{0};
constexpr uint64_t kDecodeTag = ~uint64_t{0} - 1;
constexpr size_t kEventsPerRead = 64;
constexpr size_t kCompletionsPerPoll = 4;  // between two looks at the uffds: bounds fault latency
constexpr int kRoundsPerPoll = 16;         // then back to epoll
constexpr size_t kZeroInstallsPerRound = 256;
constexpr uint64_t kNoFault = ~uint64_t{0};
constexpr uint64_t kZeroTag = ~uint64_t{0};  // a Retry of a zero chunk (no pending slot)

uint64_t now_ns() { return static_cast<uint64_t>(sys::monotonic_ns()); }  // the engine counts unsigned

enum class InstallStatus { kOk, kRetry, kFailed };

}  // namespace

struct FaultEngine::Session {
  SessionId id = 0;
  std::string name;
  pid_t pid = 0;
  bool prefetch = true;
  std::shared_ptr<MapFollower> follower;  // faults served on the faulting threads (SessionSpec)
  sys::Uffd uffd;
  std::shared_ptr<snapshot::ChunkSource> source;
  const Manifest* manifest = nullptr;
  std::shared_ptr<const snapshot::DecodeDictionary> dict;  // the snapshot's (null: none)
  std::unique_ptr<snapshot::ChunkReader> reader;
  AddressMap map;
  std::vector<std::vector<uint32_t>> state;
  std::vector<std::unique_ptr<LiveRegionStats>> stats;
  uint64_t chunks_total = 0;
  std::atomic<uint64_t> chunks_present{0};
  uint64_t chunks_failed = 0;
  std::atomic<bool> complete{false};
  std::atomic<bool> failed{false};
  bool said_finished = false;  // ChunkReader::finished(), once (say_finished)
  std::atomic<bool> exited{false};  // its process is gone (ESRCH): nothing more to serve
  // Engine thread: SessionSpec::hold_failures until release_failures(); `held`: some failed
  // chunk waits for that to be poisoned (the session is not complete meanwhile).
  bool hold_failures = false;
  bool held = false;
  bool removing = false;            // remove_session() was called (guarded by FaultEngine::mu_)
  std::string failure;  // guarded by FaultEngine::mu_
  bool live = false;    // reader open and fds in the epoll set (engine thread)
  // The reader has completions ready that its fd no longer signals (a bounded poll stopped
  // early): poll it again without waiting for the fd.
  bool backlog = false;
  bool grew = false;  // a fault came past every snapshot range (logged once)

  // Prefetch planning (engine thread).
  uint32_t sweep_region = 0, sweep_chunk = 0;
  uint32_t hint_region = 0, hint_chunk = 0;
  bool hint_valid = false;
  ChunkRef last_fault{~0u, ~0u};  // the chunk of the last fault that missed (a scan's previous one)
  size_t window = 4;
  size_t prefetch_in_flight = 0;
  size_t prefetch_done_since_demand = 0;
  std::vector<ChunkRequest> demand_q, prefetch_q;
  // Installs that met EAGAIN (a mapping change pending: a REMOVE/UNMAP/REMAP/FORK event queued
  // or its process not yet resumed), done again once the events are read. Dropping one would
  // leave its faulting thread asleep and the chunk behind prefetch's cursor for good.
  struct Retry {
    ChunkRef ref;
    uint64_t tag;      // the pending slot's (fetched again), or kZeroTag
    uint64_t fault_ns;  // a zero chunk's fault (0: prefetch), for its latency
  };
  std::vector<Retry> retry;

  // Huge pages (SessionSpec::page_size over 4 KiB; 0 otherwise). The kernel installs a huge page
  // only whole, so the chunks of one are gathered in a stage, the page installed once the last
  // is in, and only then are they present. Keyed by region and the page's region offset, not
  // by address: a stage moves with mremap, and installs wherever the map puts it then.
  uint64_t huge = 0;
  struct Stage {
    sys::Mapping bytes;     // mmap'ed: given back to the kernel when no longer kept spare
    uint32_t staged = 0;    // chunks in
    uint32_t data_pages = 0, zero_pages = 0;  // counted in the stats once installed
    bool waiting = false;   // complete, its install met EAGAIN: done again after the events
    uint64_t fault_ns = 0;  // the first fault on the page (0: none), for its latency
    uint32_t faults = 0;
  };
  std::map<std::pair<uint32_t, uint64_t>, Stage> stages;
  bool stages_waiting() const {
    return std::any_of(stages.begin(), stages.end(), [](const auto& kv) { return kv.second.waiting; });
  }
  std::atomic<uint64_t> pages_gathering{0};  // stages.size() as of the engine's last round
  // Pages installed while the faults of one read of the uffd are handled (`handling_read`). The
  // kernel takes a woken fault's message off its queue, but not one read already: a fault in the
  // same read as the fault that completed its page is stale, not a page gone missing (which
  // would fetch it all again).
  bool handling_read = false;
  std::vector<std::pair<uint32_t, uint64_t>> installed_in_read;

  uint32_t chunk_size() const { return manifest->chunk_size; }
  // The chunks [first, end) of the huge page holding `ref` (fewer at a region's end).
  std::pair<uint32_t, uint32_t> page_chunks(ChunkRef ref) const {
    const uint32_t per_page = static_cast<uint32_t>(huge / chunk_size());
    const uint32_t first = ref.chunk / per_page * per_page;
    return {first, std::min<uint32_t>(first + per_page, static_cast<uint32_t>(state[ref.region].size()))};
  }
};

struct FaultEngine::Pending {
  uint32_t gen = 0;
  bool used = false;
  Session* s = nullptr;
  ChunkRef ref;
  bool demand = false;
  bool queued_as_demand = false;
  uint64_t fault_ns = 0;  // when the first fault on it was read (0: none yet)
  uint64_t fault_offset = kNoFault;  // region offset of the first faulting page
  bool scanning = false;  // faulted on right after the chunk before it: the next page comes next
  uint32_t faults = 0;
  uint32_t attempts = 0;
};

// The engine thread's state. Everything here is touched by that thread only.
class FaultEngine::Loop final : public snapshot::ChunkSink {
 public:
  explicit Loop(FaultEngine& e) : e_(e), log_(log::get("runtime")) {}

  void run();

  void on_chunk(uint64_t tag, std::span<const std::byte> stored) override;
  void on_chunk_error(uint64_t tag, const Error& error) override;

 private:
  void finish_fetch(uint64_t tag, const Status& decoded, std::span<std::byte> out, size_t stored_size,
                    uint32_t installed_page = snapshot::ChunkDecoder::kNoPage);
  bool install_faulting_page(size_t slot, const ChunkInfo& info, std::span<const std::byte> stored,
                             std::span<std::byte> out, uint32_t& index);
  void drain_decoded();
  Pending* pending_of(uint64_t tag) {
    size_t slot = tag & 0xffffffffu;
    if (slot >= pending_.size()) return nullptr;
    Pending& p = pending_[slot];
    if (!p.used || p.gen != (tag >> 32)) return nullptr;
    return &p;
  }
  uint64_t tag_of(size_t slot) const { return (uint64_t{pending_[slot].gen} << 32) | slot; }
  size_t new_pending(Session& s, ChunkRef ref, bool demand, uint64_t fault_ns);
  void free_pending(size_t slot);

  void process_commands();
  void activate(const std::shared_ptr<Session>& s);
  void deactivate(Session& s);
  void drain_uffd(Session& s);
  void on_pagefault(Session& s, uint64_t addr, uint64_t t);
  void on_huge_fault(Session& s, const MappedRange& r, uint64_t addr, uint64_t t);
  static bool follows_last_fault(const Session& s, ChunkRef ref) {
    return s.last_fault.region == ref.region && s.last_fault.chunk + 1 == ref.chunk;
  }
  void on_remove(Session& s, uint64_t start, uint64_t end);
  void on_fork(Session& parent, int fd);
  void fill_prefetch(Session& s);
  bool next_absent(Session& s, ChunkRef& out);
  void flush(Session& s);
  void poll_reader(Session& s);
  void release_reader_if_complete(Session& s);
  void say_finished(Session& s);
  void reopen_reader(Session& s);
  void check_deadlines();
  void mark_exited(Session& s);
  void probe_orphans();

  static snapshot::ChunkLayout layout(const Session& s, uint32_t region) {
    return snapshot::ChunkLayout{s.manifest->regions[region].page_size, s.dict ? s.dict->get() : nullptr};
  }
  InstallStatus install(Session& s, ChunkRef ref, const std::byte* data, uint32_t len,
                        uint32_t skip_page = snapshot::ChunkDecoder::kNoPage);
  InstallStatus install_range(Session& s, uint32_t region, uint64_t roff, const std::byte* data, uint64_t len);
  InstallStatus install_span(Session& s, uint64_t addr, const std::byte* src, uint64_t len, uint32_t page,
                             bool wake = true);
  void install_zero_chunk(Session& s, ChunkRef ref, bool by_fault, uint64_t fault_ns);
  void stage_chunk(Session& s, ChunkRef ref, const std::byte* data, uint32_t len);
  std::span<std::byte> stage_slot(Session& s, ChunkRef ref, uint32_t len);
  sys::Mapping stage_buffer(uint64_t len);
  void spare_stage(sys::Mapping bytes);
  void install_stage(Session& s, std::pair<uint32_t, uint64_t> key);
  void retry_stages(Session& s);
  const std::byte* zeros(uint64_t len);
  void zero_past_snapshot(Session& s, uint64_t addr);
  void count_prefetch_done(Session& s);
  // Huge pages: room for two pages' chunks, so the next page can be complete before a scan
  // gets there while this one's last chunks come in.
  size_t window_max(const Session& s) const {
    const size_t max = e_.options_.prefetch_window_max;
    return s.huge ? std::max(max, 2 * static_cast<size_t>(s.huge / s.chunk_size())) : max;
  }
  void retry_installs(Session& s);
  void mark_present(Session& s, ChunkRef ref);
  void check_complete(Session& s);
  void fail_chunk(Session& s, ChunkRef ref, const Error& why);
  bool mark_failed(Session& s, ChunkRef ref);
  void poison_chunk(Session& s, ChunkRef ref);
  void release_failures(Session& s);
  void retry_or_fail(size_t slot, const Error& why);

  FaultEngine& e_;
  std::shared_ptr<spdlog::logger> log_;
  sys::UniqueFd epoll_;
  std::vector<std::shared_ptr<Session>> live_;
  std::unordered_map<SessionId, Session*> by_id_;
  std::vector<Pending> pending_;
  std::vector<size_t> free_slots_;
  size_t demand_in_flight_ = 0;
  snapshot::ChunkDecoder decoder_;
  std::unique_ptr<DecodePool> pool_;  // decodes prefetched chunks on the other cores
  sys::CpuLatencyHold cpu_latency_;   // held while faults and fetches are under way
  uint64_t last_activity_ns_ = 0;     // the last fault read or chunk received
  uint64_t last_probe_ns_ = 0;        // probe_orphans() last ran
  // Any page-aligned user address does for the liveness probe (sys::Uffd::mm_alive).
  static constexpr uintptr_t kProbeAddress = uintptr_t{1} << 30;
  bool has_orphans() const {
    for (const auto& s : live_)
      if (s->pid <= 0 && !s->exited && !s->complete) return true;
    return false;
  }
  std::vector<std::byte> buf_;
  sys::Mapping zeros_;  // read-only, never written: a huge page's worth of zeros to copy from
  std::vector<sys::Mapping> spare_stages_;  // stage buffers kept for the next pages, a few
  std::vector<uffd_msg> msgs_ = std::vector<uffd_msg>(kEventsPerRead);
  bool more_ready_ = false;
};

// ---- pending slots ----

size_t FaultEngine::Loop::new_pending(Session& s, ChunkRef ref, bool demand, uint64_t fault_ns) {
  size_t slot;
  if (!free_slots_.empty()) {
    slot = free_slots_.back();
    free_slots_.pop_back();
  } else {
    slot = pending_.size();
    pending_.emplace_back();
  }
  Pending& p = pending_[slot];
  p.used = true;
  p.s = &s;
  p.ref = ref;
  p.demand = demand;
  p.queued_as_demand = demand;
  p.fault_ns = fault_ns;
  p.fault_offset = kNoFault;
  p.scanning = false;
  p.faults = demand ? 1 : 0;
  p.attempts = 0;
  s.state[ref.region][ref.chunk] = kInFlight + static_cast<uint32_t>(slot);
  if (demand) ++demand_in_flight_;
  else ++s.prefetch_in_flight;
  return slot;
}

void FaultEngine::Loop::free_pending(size_t slot) {
  Pending& p = pending_[slot];
  if (p.demand) --demand_in_flight_;
  if (!p.queued_as_demand) --p.s->prefetch_in_flight;
  p.used = false;
  ++p.gen;  // a late completion for the old tag is ignored
  free_slots_.push_back(slot);
}

// ---- sessions ----

void FaultEngine::Loop::process_commands() {
  std::vector<Command> cmds;
  std::vector<std::shared_ptr<Session>> to_add;
  {
    std::lock_guard lock(e_.mu_);
    cmds.swap(e_.commands_);
    for (const Command& c : cmds) {
      if (c.kind != Command::kAdd) continue;
      auto it = e_.sessions_.find(c.id);
      if (it != e_.sessions_.end()) to_add.push_back(it->second);
    }
  }
  for (auto& s : to_add) activate(s);
  for (const Command& c : cmds) {
    auto it = by_id_.find(c.id);
    if (it == by_id_.end()) continue;
    Session& s = *it->second;
    if (c.kind == Command::kPrefetch) {
      s.prefetch = c.flag;
    } else if (c.kind == Command::kReleaseFailures) {
      release_failures(s);
    } else if (c.kind == Command::kRemove) {
      deactivate(s);
    }
  }
}

void FaultEngine::Loop::activate(const std::shared_ptr<Session>& s) {
  // Returns at once whatever the source (ChunkSource::open_reader): a page server that does not
  // answer is waited for by the reader's own poll(), and the other sessions go on being served.
  auto reader = s->source->open_reader();
  if (reader.ok()) {
    s->reader = std::move(*reader);
    buf_.resize(std::max<size_t>(buf_.size(), s->chunk_size()));
    if (pool_) pool_->reserve_chunk(s->chunk_size());
  }
  // The uffd is read even without a reader: the kernel holds the process's munmap, madvise,
  // mremap and fork until their events are read, and its faults must be answered.
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = s->id << 1;
  ::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, s->uffd.fd(), &ev);
  if (s->reader && s->reader->wait_fd() >= 0) {
    ev.data.u64 = (s->id << 1) | 1;
    ::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, s->reader->wait_fd(), &ev);
  }
  s->live = true;
  live_.push_back(s);
  by_id_[s->id] = s.get();
  if (!reader.ok()) {
    // No stored page will come: each such chunk is failed now (poisoned, or the process killed),
    // and a fault on it fails again (on_pagefault); zero chunks need nothing read and are
    // installed. Nobody is told of a session before it went live, so no hold is kept.
    const Error why = std::move(reader).error().wrap("cannot open a chunk reader");
    s->hold_failures = false;
    for (uint32_t region = 0; region < s->state.size(); ++region) {
      for (uint32_t chunk = 0; chunk < s->state[region].size(); ++chunk) {
        if (s->state[region][chunk] != kAbsent) continue;
        const ChunkRef ref{region, chunk};
        if (s->manifest->regions[region].chunks[chunk].codec == Codec::kZero) {
          install_zero_chunk(*s, ref, false, 0);
        } else {
          fail_chunk(*s, ref, why);
        }
      }
    }
  }
  drain_uffd(*s);  // faults may have queued before we listened
  check_complete(*s);  // nothing to fetch (no regions, or none mapped here): complete at once
}

// A complete session fetches nothing more (a page dropped since is given back to the kernel,
// on_remove; a forked child gets a reader of its own): its reader, and the page-server
// connections it holds, go.
void FaultEngine::Loop::release_reader_if_complete(Session& s) {
  if (!s.complete || !s.reader || s.backlog || s.reader->in_flight() > 0 || !s.demand_q.empty() ||
      !s.prefetch_q.empty()) {
    return;
  }
  if (s.reader->wait_fd() >= 0) ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, s.reader->wait_fd(), nullptr);
  say_finished(s);
  s.reader.reset();
}

// The source is told the restore is done with it (a migration source then stops at once),
// whether the reader goes here or with its session (removed before the loop came by), once, by
// the last of the sessions reading it: a forked child still fetching from the same source, or a
// complete session fetching a page again (its reader reopened), would otherwise lose it under
// its feet. Not by a session with failed chunks: those may be the source's to give (a huge page
// fails whole, chunks never asked for included), and a migration source that waits is left
// paused for whoever decides which copy runs, where one told so would be killed.
void FaultEngine::Loop::say_finished(Session& s) {
  if (!s.complete || !s.reader || s.said_finished || s.chunks_failed > 0 || s.failed) return;
  const bool others_read_it = std::any_of(by_id_.begin(), by_id_.end(), [&](const auto& kv) {
    const Session& o = *kv.second;
    return &o != &s && o.source == s.source && !o.exited && (!o.complete || o.reader);
  });
  if (others_read_it) return;
  s.said_finished = true;
  s.reader->finished();
}

void FaultEngine::Loop::deactivate(Session& s) {
  say_finished(s);
  if (s.live) {
    ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, s.uffd.fd(), nullptr);
    if (s.reader && s.reader->wait_fd() >= 0) ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, s.reader->wait_fd(), nullptr);
  }
  for (size_t i = 0; i < pending_.size(); ++i) {
    if (pending_[i].used && pending_[i].s == &s) free_pending(i);
  }
  SessionId id = s.id;
  by_id_.erase(id);
  std::shared_ptr<Session> keep;
  auto it = std::find_if(live_.begin(), live_.end(), [&](const auto& p) { return p.get() == &s; });
  if (it != live_.end()) {
    keep = *it;
    live_.erase(it);
  }
  std::lock_guard lock(e_.mu_);
  e_.sessions_.erase(id);
  e_.cv_.notify_all();
    e_.signal_change();
}

// ---- events ----

void FaultEngine::Loop::drain_uffd(Session& s) {
  struct Follow {  // holds the follower's readers off until the events read are applied
    Session& s;
    explicit Follow(Session& s) : s(s) {
      if (s.follower) s.follower->begin_update();
    }
    ~Follow() {
      if (s.follower) s.follower->end_update(s.map.ranges());
    }
  } follow(s);
  for (;;) {
    auto n = s.uffd.read_events(msgs_);
    if (!n.ok()) {
      log_->debug("session {}: {}", s.name, n.error().message());
      return;
    }
    if (*n == 0) return;
    s.installed_in_read.clear();
    s.handling_read = true;
    uint64_t t = now_ns();
    last_activity_ns_ = t;
    for (size_t i = 0; i < *n; ++i) {
      const uffd_msg& m = msgs_[i];
      switch (m.event) {
        case UFFD_EVENT_PAGEFAULT:
          on_pagefault(s, m.arg.pagefault.address, t);
          break;
        case UFFD_EVENT_REMOVE:
          on_remove(s, m.arg.remove.start, m.arg.remove.end);
          break;
        case UFFD_EVENT_UNMAP:
          s.map.remove(m.arg.remove.start, m.arg.remove.end - m.arg.remove.start);
          break;
        case UFFD_EVENT_REMAP:
          s.map.move(m.arg.remap.from, m.arg.remap.to, m.arg.remap.len);
          break;
        case UFFD_EVENT_FORK:
          on_fork(s, static_cast<int>(m.arg.fork.ufd));
          break;
        default:
          log_->debug("session {}: ignoring uffd event {}", s.name, m.event);
      }
    }
    s.handling_read = false;
    if (*n < msgs_.size()) return;
  }
}

void FaultEngine::Loop::on_pagefault(Session& s, uint64_t addr, uint64_t t) {
  const MappedRange* r = s.map.find(addr);
  if (r == nullptr) {
    zero_past_snapshot(s, addr);
    return;
  }
  if (s.huge) {
    on_huge_fault(s, *r, addr, t);
    return;
  }
  uint64_t roff = addr - r->start + r->region_offset;
  ChunkRef ref{r->region, static_cast<uint32_t>(roff / s.chunk_size())};
  s.stats[ref.region]->add_fault();
  uint32_t& st = s.state[ref.region][ref.chunk];
  const ChunkInfo& info = s.manifest->regions[ref.region].chunks[ref.chunk];
  if (st >= kInFlight) {
    Pending& p = pending_[st - kInFlight];
    if (!p.demand) {
      p.demand = true;
      ++demand_in_flight_;
    }
    if (p.fault_ns == 0) {  // the first fault on a prefetch already under way
      p.fault_ns = t;
      p.scanning = follows_last_fault(s, ref);
      s.last_fault = ref;
    }
    if (p.fault_offset == kNoFault) p.fault_offset = roff;
    ++p.faults;
    return;
  }
  if (st == kFailed) {
    // Fail this access too: poison again (a no-op if it is) and wake, or the thread hangs.
    fail_chunk(s, ref, Error(Errc::kIo, "chunk failed earlier"));
    return;
  }
  const bool scanning = follows_last_fault(s, ref);
  s.last_fault = ref;
  if (info.codec == Codec::kZero) {
    install_zero_chunk(s, ref, true, t);
    return;
  }
  if (st == kPresent) s.chunks_present--;  // the page is missing after all (fork, races): fetch again
  size_t slot = new_pending(s, ref, true, t);
  pending_[slot].fault_offset = roff;
  pending_[slot].scanning = scanning;
  s.demand_q.push_back(ChunkRequest{ref, tag_of(slot), true});
  // Faults are arriving: follow them, and make room for them.
  s.hint_region = ref.region;
  s.hint_chunk = ref.chunk + 1;
  s.hint_valid = true;
  if (s.prefetch_in_flight > 0) s.window = std::max<size_t>(1, s.window / 2);
  s.prefetch_done_since_demand = 0;
}

// A fault on a huge page: every chunk of the page is needed before it can be installed. Those
// not yet asked for are fetched as demand, those under way become demand, and the page is
// installed when the last is in (stage_chunk); its latency counts from the first fault.
void FaultEngine::Loop::on_huge_fault(Session& s, const MappedRange& r, uint64_t addr, uint64_t t) {
  const uint64_t roff = (addr - r.start + r.region_offset) / s.huge * s.huge;
  const ChunkRef first{r.region, static_cast<uint32_t>(roff / s.chunk_size())};
  const auto [lo, hi] = s.page_chunks(first);
  std::vector<uint32_t>& state = s.state[r.region];
  s.stats[r.region]->add_fault();
  for (uint32_t c = lo; c < hi; ++c) {
    if (state[c] == kFailed) {
      // Fail this access too: poison again (a no-op if it is) and wake, or the thread hangs.
      fail_chunk(s, ChunkRef{r.region, c}, Error(Errc::kIo, "chunk failed earlier"));
      return;
    }
  }
  const std::pair<uint32_t, uint64_t> key{r.region, roff};
  if (std::find(s.installed_in_read.begin(), s.installed_in_read.end(), key) != s.installed_in_read.end()) {
    // Read before its page was installed, and woken by that install. Woken again all the same:
    // where the page went elsewhere (a REMAP read with it, not applied at the install), the
    // thread faults again, and that fault comes in a later read.
    (void)s.uffd.wake(addr / s.huge * s.huge, s.huge);
    return;
  }
  Session::Stage& stage = s.stages[{r.region, roff}];
  if (stage.fault_ns == 0) stage.fault_ns = t;
  ++stage.faults;
  std::vector<ChunkRef> zero;
  for (uint32_t c = lo; c < hi; ++c) {
    const ChunkRef ref{r.region, c};
    uint32_t& st = state[c];
    if (st == kPresent) {  // the page is missing after all (fork, races): fetch it again
      st = kAbsent;
      s.chunks_present--;
    }
    if (st >= kInFlight) {
      Pending& p = pending_[st - kInFlight];
      if (!p.demand) {
        p.demand = true;
        ++demand_in_flight_;
      }
      if (p.fault_ns == 0) p.fault_ns = t;  // the deadline counts from here
    } else if (st == kAbsent) {
      if (s.manifest->regions[r.region].chunks[c].codec == Codec::kZero) {
        zero.push_back(ref);
      } else {
        s.demand_q.push_back(ChunkRequest{ref, tag_of(new_pending(s, ref, true, t)), true});
      }
    }
  }
  // Last: the page may be complete with them, and its stage then gone.
  for (ChunkRef ref : zero) install_zero_chunk(s, ref, false, 0);
  s.hint_region = r.region;
  s.hint_chunk = hi;
  s.hint_valid = true;
  // A scan (the page after the last one faulted on) runs into prefetch's pages because the
  // window is too short, not too long: it is widened then, and narrowed for faults elsewhere.
  const bool scanning = s.last_fault.region == r.region && s.last_fault.chunk + (hi - lo) == lo;
  s.last_fault = ChunkRef{r.region, lo};
  if (scanning) s.window = std::min(window_max(s), s.window * 2);
  else if (s.prefetch_in_flight > 0) s.window = std::max<size_t>(1, s.window / 2);
  s.prefetch_done_since_demand = 0;
}

// A fault on this uffd at an address no snapshot range holds: the process grew a mapping we
// serve (mremap, in place or moving it: the kernel keeps the new tail registered and says
// nothing of it). That memory is new, and the kernel would have zero-filled it. Pages that an
// mremap moved are never taken for it: mremap returns only once its REMAP event is read, and
// the events of one read are applied in order, so the process cannot touch the new address
// before the map knows it.
void FaultEngine::Loop::zero_past_snapshot(Session& s, uint64_t addr) {
  const uint64_t page_size = s.huge ? s.huge : 4096;
  const uint64_t page = addr & ~(page_size - 1);
  if (!s.grew) {
    s.grew = true;
    log_->info("session {}: fault at {:#x}, past every snapshot range (a mapping grew): zero-filled", s.name, addr);
  }
  sys::InstallResult res;
  if (s.huge) {
    // No UFFDIO_ZEROPAGE for huge pages: zeros are copied.
    const std::byte* src = zeros(s.huge);
    res = src ? s.uffd.copy(page, src, s.huge) : sys::InstallResult{sys::InstallOutcome::kFailed, 0, ENOMEM};
  } else {
    // 64 KiB at once where the tail allows (a tail is touched in order, like any new memory),
    // never over a snapshot range's pages.
    constexpr uint64_t kBlock = 64 * 1024;
    const uint64_t lo = std::max(page & ~(kBlock - 1), s.map.end_before(page));
    const uint64_t hi = std::min((page & ~(kBlock - 1)) + kBlock, s.map.start_after(page));
    res = s.uffd.zeropage(lo, hi - lo);
    if (res.outcome != sys::InstallOutcome::kDone && lo + 4096 != hi) res = s.uffd.zeropage(page, 4096);
  }
  switch (res.outcome) {
    case sys::InstallOutcome::kDone:
    case sys::InstallOutcome::kExited:
      return;
    case sys::InstallOutcome::kExists:  // in already: the thread only needs waking
    case sys::InstallOutcome::kAgain:   // a mapping change pending: the thread faults again after it
    case sys::InstallOutcome::kGone:    // unmapped meanwhile: the retried access decides
      (void)s.uffd.wake(page, page_size);
      return;
    case sys::InstallOutcome::kFailed:
      break;
  }
  log_->error("session {}: zero-filling {:#x} past every snapshot range failed (errno {}): poisoned", s.name, page,
              res.err);
  if (e_.features_.has_uffd_poison()) (void)s.uffd.poison(page, page_size);
  (void)s.uffd.wake(page, page_size);
}

// Zeros to copy a huge page from: a read-only anonymous mapping, never touched but by the
// kernel's reads (which find the shared zero page). Null if it cannot be mapped.
const std::byte* FaultEngine::Loop::zeros(uint64_t len) {
  if (zeros_.size() < len) {
    auto m = sys::Mapping::anonymous(len, PROT_READ);
    if (!m.ok()) return nullptr;
    zeros_ = std::move(*m);
  }
  return zeros_.data();
}

void FaultEngine::Loop::on_remove(Session& s, uint64_t start, uint64_t end) {
  // madvise(DONTNEED) dropped these pages: the process expects zeros there from now on. Hand
  // the range back to the kernel (which zero-fills it) and never install into it again.
  (void)s.uffd.unregister(start, end - start);
  s.map.remove(start, end - start);
}

void FaultEngine::Loop::on_fork(Session& parent, int fd) {
  auto child = std::make_shared<Session>();
  {
    std::lock_guard lock(e_.mu_);
    child->id = e_.next_id_++;
  }
  child->name = parent.name + "/fork";
  child->prefetch = parent.prefetch;
  child->uffd = sys::Uffd::adopt(sys::UniqueFd(fd), parent.uffd.features());
  child->source = parent.source;
  child->manifest = parent.manifest;
  child->dict = parent.dict;
  child->map = parent.map;
  child->huge = parent.huge;
  child->state = parent.state;
  uint64_t present = 0, failed = 0;
  for (auto& region : child->state) {
    for (auto& st : region) {
      // The parent's fetches, retries and stages will not land in the child.
      if (st >= kInFlight || st == kZeroRetry || st == kStaged) st = kAbsent;
      if (st == kPresent) ++present;
      if (st == kFailed) ++failed;
    }
  }
  child->chunks_total = parent.chunks_total;
  child->chunks_present = present;
  child->chunks_failed = failed;
  for (const auto& r : parent.manifest->regions) child->stats.push_back(std::make_unique<LiveRegionStats>(r.name, r.length));
  {
    std::lock_guard lock(e_.mu_);
    e_.sessions_[child->id] = child;
  }
  activate(child);
  e_.signal_change();  // a session appeared: the agent learns whose it is while the parent is known
}

// ---- fetching ----

bool FaultEngine::Loop::next_absent(Session& s, ChunkRef& out) {
  const auto& regions = s.manifest->regions;
  // Huge pages: the pages begun first. A fault moves the hint to the page after its own; a
  // page the hint was filling would otherwise hold its stage until the sweep came by.
  for (const auto& [key, stage] : s.stages) {
    const auto [lo, hi] = s.page_chunks(ChunkRef{key.first, static_cast<uint32_t>(key.second / s.chunk_size())});
    for (uint32_t c = lo; c < hi; ++c) {
      if (s.state[key.first][c] == kAbsent) {
        out = ChunkRef{key.first, c};
        return true;
      }
    }
  }
  if (s.hint_valid) {
    for (int step = 0; step < 16 && s.hint_region < regions.size(); ++step) {
      if (s.hint_chunk >= s.state[s.hint_region].size()) break;
      uint32_t c = s.hint_chunk++;
      if (s.state[s.hint_region][c] == kAbsent) {
        out = ChunkRef{s.hint_region, c};
        return true;
      }
    }
    s.hint_valid = false;
  }
  while (s.sweep_region < regions.size()) {
    auto& st = s.state[s.sweep_region];
    while (s.sweep_chunk < st.size()) {
      uint32_t c = s.sweep_chunk++;
      if (st[c] == kAbsent) {
        out = ChunkRef{s.sweep_region, c};
        return true;
      }
    }
    ++s.sweep_region;
    s.sweep_chunk = 0;
  }
  return false;
}

void FaultEngine::Loop::fill_prefetch(Session& s) {
  if (!s.prefetch || !s.reader || s.complete || s.exited) return;
  size_t cap = s.reader->capacity() > e_.options_.demand_reserve ? s.reader->capacity() - e_.options_.demand_reserve : 1;
  size_t limit = std::min(s.window, cap);
  // Top the window up in batches (once half of it has come back), not one request per
  // completion: a remote source then gets one request frame per batch and the server sends
  // its replies in one go, instead of waking up for every chunk.
  if (s.prefetch_in_flight > limit / 2) return;
  size_t zeros = 0;
  while (s.prefetch_in_flight < limit) {
    ChunkRef ref;
    if (!next_absent(s, ref)) return;
    if (s.manifest->regions[ref.region].chunks[ref.chunk].codec == Codec::kZero) {
      install_zero_chunk(s, ref, false, 0);
      if (++zeros >= kZeroInstallsPerRound) {
        more_ready_ = true;
        return;
      }
      continue;
    }
    size_t slot = new_pending(s, ref, false, 0);
    s.prefetch_q.push_back(ChunkRequest{ref, tag_of(slot), false});
  }
}

void FaultEngine::Loop::flush(Session& s) {
  if (!s.reader && !s.demand_q.empty()) reopen_reader(s);
  if (!s.reader) return;
  auto submit = [&](std::vector<ChunkRequest>& q) {
    size_t room = s.reader->capacity() - s.reader->in_flight();
    size_t n = std::min(room, q.size());
    if (n == 0) return;
    Status st = s.reader->submit(std::span<const ChunkRequest>(q.data(), n));
    if (!st.ok()) {
      for (size_t i = 0; i < n; ++i) on_chunk_error(q[i].tag, st.error());
    }
    q.erase(q.begin(), q.begin() + static_cast<long>(n));
  };
  submit(s.demand_q);  // demand first
  submit(s.prefetch_q);
}

// A complete session's reader is gone (release_reader_if_complete), but a page may still go
// missing after (reclaimed after MADV_FREE where the uffd takes no REMOVE events) and fault: its
// chunk is fetched again.
void FaultEngine::Loop::reopen_reader(Session& s) {
  auto reader = s.source->open_reader();
  if (!reader.ok()) {
    std::vector<ChunkRequest> lost;
    lost.swap(s.demand_q);
    for (const ChunkRequest& rq : lost) on_chunk_error(rq.tag, reader.error());
    return;
  }
  s.reader = std::move(*reader);
  if (s.reader->wait_fd() >= 0) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = (s.id << 1) | 1;
    ::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, s.reader->wait_fd(), &ev);
  }
}

void FaultEngine::Loop::drain_decoded() {
  if (pool_) {
    pool_->drain_done([&](DecodeJob& j) {
      finish_fetch(j.tag, j.status, {j.out.data(), j.length}, j.stored_size, j.installed_page);
    });
  }
}

void FaultEngine::Loop::poll_reader(Session& s) {
  if (!s.reader) return;
  // Bounded: with a fast source and a full prefetch window there is always another completion,
  // and the loop must get back to epoll (other sessions, commands) now and then.
  s.backlog = false;
  for (int round = 0;; ++round) {
    if (round == kRoundsPerPoll) {
      s.backlog = true;
      return;
    }
    auto n = s.reader->poll(*this, false, kCompletionsPerPoll);
    if (!n.ok()) {
      // The reader is broken: everything it had in flight is lost.
      Error err = std::move(n).error();
      for (size_t i = 0; i < pending_.size(); ++i) {
        if (pending_[i].used && pending_[i].s == &s) fail_chunk(s, pending_[i].ref, err), free_pending(i);
      }
      return;
    }
    // Faults that arrived meanwhile go ahead of the remaining completions; decoded prefetches
    // are installed; then the prefetch window is refilled so reads overlap decoding.
    drain_uffd(s);
    drain_decoded();
    fill_prefetch(s);
    flush(s);
    if (*n < kCompletionsPerPoll) return;
  }
}

void FaultEngine::Loop::check_deadlines() {
  if (demand_in_flight_ == 0) return;
  uint64_t now = now_ns();
  uint64_t limit = static_cast<uint64_t>(e_.options_.demand_deadline.count()) * 1000000ULL;
  for (size_t i = 0; i < pending_.size(); ++i) {
    Pending& p = pending_[i];
    if (p.used && p.demand && p.fault_ns != 0 && now - p.fault_ns > limit) {
      Session& s = *p.s;
      ChunkRef ref = p.ref;
      free_pending(i);
      fail_chunk(s, ref, Error(Errc::kTimeout, fmt::format("no data for chunk {} of region '{}' within {} ms from {}",
                                                           ref.chunk, s.manifest->regions[ref.region].name,
                                                           e_.options_.demand_deadline.count(), s.source->describe())));
    }
  }
}

// ---- completions ----

void FaultEngine::Loop::on_chunk(uint64_t tag, std::span<const std::byte> stored) {
  Pending* p = pending_of(tag);
  if (p == nullptr) return;  // given up on already (deadline), or session gone
  last_activity_ns_ = now_ns();
  Session& s = *p->s;
  ChunkRef ref = p->ref;
  const ChunkInfo& info = s.manifest->regions[ref.region].chunks[ref.chunk];
  uint32_t len = s.manifest->chunk_length(ref.region, ref.chunk);
  // Prefetched chunks are decoded by the pool when it has room; nobody is waiting on them. A
  // huge page's thread waits for all its chunks: they are decoded on every core, the pool's
  // workers kept busy and this thread decoding the rest.
  const uint32_t page = s.manifest->regions[ref.region].page_size;
  const bool to_pool = s.huge ? pool_ && pool_->busy() < pool_->threads() : !p->demand;
  if (to_pool && pool_ && pool_->try_submit(tag, info, len, page, s.dict, stored)) return;
  // A huge page's chunk is decoded straight into its stage.
  std::span<std::byte> out = s.huge ? stage_slot(s, ref, len) : std::span<std::byte>(buf_.data(), len);
  // A thread scanning memory would fault on the next page at once: give it the whole chunk in
  // one go (one fault per chunk, as in format 1). Elsewhere its page goes first.
  if (p->demand && !p->scanning && p->fault_offset != kNoFault && info.codec == Codec::kZstdPages) {
    uint32_t index;
    if (!install_faulting_page(tag & 0xffffffffu, info, stored, out, index)) return;
    // The thread runs again; the rest is decoded on another core when one is free, and this
    // one gets back to reading faults (the next one is elsewhere).
    if (pool_ && pool_->try_submit(tag, info, len, page, s.dict, stored, index, out.subspan(size_t{index} * page, page))) {
      return;
    }
    Status st = decoder_.decode_rest(info, stored, out, layout(s, ref.region), index);
    finish_fetch(tag, st, out, stored.size(), index);
    return;
  }
  Status st = decoder_.decode(info, stored, out, layout(s, ref.region));
  finish_fetch(tag, st, out, stored.size());
}

// A demand fault on a page-frame chunk: the faulting page is verified, decoded and installed
// alone, so the thread resumes before the rest of the chunk is decoded (then the caller
// installs the rest around it). False when the chunk is done with (retried, failed or
// re-queued); then nothing was installed.
bool FaultEngine::Loop::install_faulting_page(size_t slot, const ChunkInfo& info, std::span<const std::byte> stored,
                                              std::span<std::byte> out, uint32_t& index) {
  Pending& p = pending_[slot];
  Session& s = *p.s;
  ChunkRef ref = p.ref;
  const snapshot::ChunkLayout lay = layout(s, ref.region);
  const uint64_t chunk_off = uint64_t{ref.chunk} * s.chunk_size();
  index = static_cast<uint32_t>((p.fault_offset - chunk_off) / lay.page_size);
  auto page = out.subspan(size_t{index} * lay.page_size, lay.page_size);
  Status st = decoder_.verify_stored(info, stored, static_cast<uint32_t>(out.size()), lay.page_size);
  if (st.ok()) st = decoder_.decode_page(stored, static_cast<uint32_t>(out.size()), index, page, lay);
  if (!st.ok()) {
    retry_or_fail(slot, st.error().wrap(fmt::format("{} region '{}' chunk {}", s.source->describe(),
                                                    s.manifest->regions[ref.region].name, ref.chunk)));
    return false;
  }
  InstallStatus is = install_range(s, ref.region, chunk_off + uint64_t{index} * lay.page_size, page.data(), page.size());
  if (is == InstallStatus::kRetry) {
    s.retry.push_back(Session::Retry{ref, tag_of(slot), 0});
    return false;
  }
  if (is == InstallStatus::kFailed) {
    free_pending(slot);
    fail_chunk(s, ref, Error(Errc::kIo, fmt::format("installing a page of chunk {} of region '{}' failed", ref.chunk,
                                                    s.manifest->regions[ref.region].name)));
    return false;
  }
  // The first fault is answered now; any others on this chunk when the rest is in. Should the
  // rest need fetching again, the page is in: no page goes first then.
  if (p.faults > 0) {
    s.stats[ref.region]->add_latency_us((now_ns() - p.fault_ns) / 1000);
    --p.faults;
  }
  p.fault_offset = kNoFault;
  return true;
}

void FaultEngine::Loop::finish_fetch(uint64_t tag, const Status& decoded, std::span<std::byte> out, size_t stored_size,
                                     uint32_t installed_page) {
  Pending* p = pending_of(tag);
  if (p == nullptr) return;
  size_t slot = tag & 0xffffffffu;
  Session& s = *p->s;
  ChunkRef ref = p->ref;
  uint32_t len = static_cast<uint32_t>(out.size());
  if (!decoded.ok()) {
    retry_or_fail(slot, decoded.error().wrap(fmt::format("{} region '{}' chunk {}", s.source->describe(),
                                                         s.manifest->regions[ref.region].name, ref.chunk)));
    return;
  }
  LiveRegionStats& stats = *s.stats[ref.region];
  stats.add_fetched(stored_size, len);
  if (s.huge) {  // counted installed with its page
    const bool was_prefetch = !p->queued_as_demand;
    free_pending(slot);
    if (was_prefetch) count_prefetch_done(s);
    stage_chunk(s, ref, out.data(), len);
    return;
  }
  InstallStatus is = install(s, ref, out.data(), len, installed_page);
  if (is == InstallStatus::kRetry) {
    s.retry.push_back(Session::Retry{ref, tag, 0});  // fetched and installed again after the events
    return;
  }
  if (is == InstallStatus::kFailed) {
    bool demand = p->demand;
    free_pending(slot);
    (void)demand;
    fail_chunk(s, ref, Error(Errc::kIo, fmt::format("installing chunk {} of region '{}' failed", ref.chunk,
                                                    s.manifest->regions[ref.region].name)));
    return;
  }
  uint32_t pages = len / s.manifest->regions[ref.region].page_size;
  stats.add_installed(pages, p->demand);
  if (p->fault_ns != 0) {
    uint64_t us = (now_ns() - p->fault_ns) / 1000;
    for (uint32_t i = 0; i < p->faults; ++i) stats.add_latency_us(us);
  }
  bool was_prefetch = !p->queued_as_demand;
  free_pending(slot);
  mark_present(s, ref);
  if (was_prefetch) count_prefetch_done(s);
}

// Prefetches done without a fault in between widen the window.
void FaultEngine::Loop::count_prefetch_done(Session& s) {
  if (++s.prefetch_done_since_demand >= s.window) {
    s.window = std::min(window_max(s), s.window * 2);
    s.prefetch_done_since_demand = 0;
  }
}

void FaultEngine::Loop::on_chunk_error(uint64_t tag, const Error& error) {
  if (pending_of(tag) == nullptr) return;
  retry_or_fail(tag & 0xffffffffu, error);
}

void FaultEngine::Loop::retry_or_fail(size_t slot, const Error& why) {
  Pending& p = pending_[slot];
  Session& s = *p.s;
  if (++p.attempts < e_.options_.fetch_attempts) {
    log_->debug("session {}: retrying chunk after: {}", s.name, why.message());
    (p.demand ? s.demand_q : s.prefetch_q).push_back(ChunkRequest{p.ref, tag_of(slot), p.demand});
    return;
  }
  ChunkRef ref = p.ref;
  free_pending(slot);
  fail_chunk(s, ref, why);
}

// ---- installing ----

// Without `wake`, the threads waiting on what was installed are left for the caller to wake.
InstallStatus FaultEngine::Loop::install_span(Session& s, uint64_t addr, const std::byte* src, uint64_t len,
                                              uint32_t page, bool wake) {
  sys::InstallResult r = src ? s.uffd.copy(addr, src, len, wake) : s.uffd.zeropage(addr, len, wake);
  switch (r.outcome) {
    case sys::InstallOutcome::kDone: return InstallStatus::kOk;
    case sys::InstallOutcome::kAgain:
      // The kernel says EAGAIN both for a pending mapping change (nothing copied) and for a
      // copy that stopped at a page already present (some copied): the latter goes on below.
      if (r.bytes == 0) return InstallStatus::kRetry;
      break;
    case sys::InstallOutcome::kFailed:
      log_->error("session {}: install at {:#x} ({} bytes): {}", s.name, addr, len, std::strerror(r.err));
      return InstallStatus::kFailed;
    case sys::InstallOutcome::kExited: mark_exited(s); return InstallStatus::kOk;
    case sys::InstallOutcome::kExists:
    case sys::InstallOutcome::kGone:
      break;
  }
  // Some page is already there (a racing install, a page a faulting thread installed itself, a
  // write after fork) or part of the range is gone: go page by page from where the kernel
  // stopped, then wake whoever waits on the range.
  uint64_t done = r.bytes / page * page;
  bool present = false;
  for (uint64_t off = done; off < len; off += page) {
    sys::InstallResult p = src ? s.uffd.copy(addr + off, src + off, page, wake) : s.uffd.zeropage(addr + off, page, wake);
    switch (p.outcome) {
      case sys::InstallOutcome::kDone: break;
      case sys::InstallOutcome::kExists: present = true; break;
      case sys::InstallOutcome::kGone: break;
      case sys::InstallOutcome::kExited: mark_exited(s); return InstallStatus::kOk;
      case sys::InstallOutcome::kAgain: return InstallStatus::kRetry;
      case sys::InstallOutcome::kFailed:
        log_->error("session {}: install at {:#x}: {}", s.name, addr + off, std::strerror(p.err));
        return InstallStatus::kFailed;
    }
  }
  if (present && wake) (void)s.uffd.wake(addr, len);
  return InstallStatus::kOk;
}

InstallStatus FaultEngine::Loop::install(Session& s, ChunkRef ref, const std::byte* data, uint32_t len,
                                         uint32_t skip_page) {
  uint64_t off = static_cast<uint64_t>(ref.chunk) * s.chunk_size();
  if (skip_page == snapshot::ChunkDecoder::kNoPage) return install_range(s, ref.region, off, data, len);
  // That page is in already: the two spans around it (page by page past it measured slower).
  uint64_t page = s.manifest->regions[ref.region].page_size;
  uint64_t before = skip_page * page, after = before + page;
  InstallStatus result = before ? install_range(s, ref.region, off, data, before) : InstallStatus::kOk;
  if (result == InstallStatus::kOk && after < len) result = install_range(s, ref.region, off + after, data + after, len - after);
  return result;
}

InstallStatus FaultEngine::Loop::install_range(Session& s, uint32_t region, uint64_t roff, const std::byte* data,
                                               uint64_t len) {
  uint32_t page = s.manifest->regions[region].page_size;
  InstallStatus result = InstallStatus::kOk;
  s.map.for_each_span(region, roff, len, [&](uint64_t addr, uint64_t at, uint64_t n) {
    if (result != InstallStatus::kOk) return;
    result = install_span(s, addr, data ? data + (at - roff) : nullptr, n, page);
  });
  return result;
}

void FaultEngine::Loop::install_zero_chunk(Session& s, ChunkRef ref, bool by_fault, uint64_t fault_ns) {
  uint32_t len = s.manifest->chunk_length(ref.region, ref.chunk);
  uint32_t& st = s.state[ref.region][ref.chunk];
  if (s.huge) {  // into its page's stage; a fault's latency is the page's
    if (st == kStaged || st == kPresent || st == kFailed) return;
    stage_chunk(s, ref, nullptr, len);
    return;
  }
  bool was_present = st == kPresent;
  InstallStatus is = install(s, ref, nullptr, len);
  if (is == InstallStatus::kRetry) {
    // Nobody else would: the faulting thread sleeps until woken and prefetch's cursor has passed.
    if (st != kZeroRetry) s.retry.push_back(Session::Retry{ref, kZeroTag, by_fault ? fault_ns : 0});
    if (!was_present) st = kZeroRetry;
    return;
  }
  if (is == InstallStatus::kFailed) {
    fail_chunk(s, ref, Error(Errc::kIo, "installing zero pages failed"));
    return;
  }
  LiveRegionStats& stats = *s.stats[ref.region];
  if (by_fault) stats.add_latency_us((now_ns() - fault_ns) / 1000);
  if (!was_present) {
    stats.add_zero(len / s.manifest->regions[ref.region].page_size);
    mark_present(s, ref);
  }
}

// A stage's buffer: a spare one of that size, else mapped anew. Out of memory is thrown, as any
// allocation's in the engine.
sys::Mapping FaultEngine::Loop::stage_buffer(uint64_t len) {
  for (auto it = spare_stages_.begin(); it != spare_stages_.end(); ++it) {
    if (it->size() != len) continue;
    sys::Mapping m = std::move(*it);
    spare_stages_.erase(it);
    return m;
  }
  auto m = sys::Mapping::anonymous(len);
  if (!m.ok()) throw std::bad_alloc();
  return std::move(*m);
}

// Keeps a few buffers for the next pages (a scan's), and gives the rest back to the kernel.
void FaultEngine::Loop::spare_stage(sys::Mapping bytes) {
  constexpr size_t kSpareStages = 4;
  if (bytes.data() && spare_stages_.size() < kSpareStages) spare_stages_.push_back(std::move(bytes));
}

// Where a chunk of a huge page goes in its page's stage (made if need be).
std::span<std::byte> FaultEngine::Loop::stage_slot(Session& s, ChunkRef ref, uint32_t len) {
  const uint64_t page_off = uint64_t{s.page_chunks(ref).first} * s.chunk_size();
  Session::Stage& stage = s.stages[{ref.region, page_off}];
  if (!stage.bytes.data()) stage.bytes = stage_buffer(s.huge);  // every byte is written before use
  return {stage.bytes.data() + (uint64_t{ref.chunk} * s.chunk_size() - page_off), len};
}

// A chunk of a huge page is in (`data`, or zeros if null; decoded in place already if `data` is
// its stage slot): into the page's stage, and the page installed if it was the last.
void FaultEngine::Loop::stage_chunk(Session& s, ChunkRef ref, const std::byte* data, uint32_t len) {
  const auto [lo, hi] = s.page_chunks(ref);
  const std::pair<uint32_t, uint64_t> key{ref.region, uint64_t{lo} * s.chunk_size()};
  std::byte* at = stage_slot(s, ref, len).data();
  Session::Stage& stage = s.stages[key];
  const uint32_t pages = len / s.manifest->regions[ref.region].page_size;
  if (data == nullptr) {
    std::memset(at, 0, len);
    stage.zero_pages += pages;
  } else {
    if (data != at) std::memcpy(at, data, len);
    stage.data_pages += pages;
  }
  s.state[ref.region][ref.chunk] = kStaged;
  if (++stage.staged == hi - lo) install_stage(s, key);
}

// Installs a complete stage wherever the map has its page (nowhere, if it was dropped or
// unmapped meanwhile), then its chunks are present, and only then are the threads waiting on it
// woken: a thread that runs again finds its page counted. (A retry or a failure wakes them too:
// an install that meets the page present, and a poison, wake the range.)
void FaultEngine::Loop::install_stage(Session& s, std::pair<uint32_t, uint64_t> key) {
  auto it = s.stages.find(key);
  Session::Stage& stage = it->second;
  InstallStatus result = InstallStatus::kOk;
  std::vector<std::pair<uint64_t, uint64_t>> placed;  // address, length
  s.map.for_each_span(key.first, key.second, s.huge, [&](uint64_t addr, uint64_t at, uint64_t n) {
    if (result != InstallStatus::kOk) return;
    result = install_span(s, addr, stage.bytes.data() + (at - key.second), n, s.huge, false);
    placed.emplace_back(addr, n);
  });
  const ChunkRef first{key.first, static_cast<uint32_t>(key.second / s.chunk_size())};
  if (result == InstallStatus::kRetry) {
    stage.waiting = true;
    return;
  }
  if (result == InstallStatus::kFailed) {
    fail_chunk(s, first, Error(Errc::kIo, fmt::format("installing the huge page at offset {:#x} of region '{}' failed",
                                                      key.second, s.manifest->regions[key.first].name)));
    return;
  }
  LiveRegionStats& stats = *s.stats[key.first];
  if (stage.faults > 0) {
    const uint64_t us = (now_ns() - stage.fault_ns) / 1000;
    for (uint32_t i = 0; i < stage.faults; ++i) stats.add_latency_us(us);
  }
  if (!placed.empty()) {
    stats.add_installed(stage.data_pages, stage.faults > 0);
    stats.add_zero(stage.zero_pages);
  }
  const auto [lo, hi] = s.page_chunks(first);
  spare_stage(std::move(stage.bytes));
  s.stages.erase(it);
  if (s.handling_read) s.installed_in_read.push_back(key);
  for (uint32_t c = lo; c < hi; ++c) {
    s.state[key.first][c] = kPresent;
    ++s.chunks_present;
  }
  for (const auto& [addr, n] : placed) (void)s.uffd.wake(addr, n);
  check_complete(s);
}

// Called with the session's events read, as retry_installs().
void FaultEngine::Loop::retry_stages(Session& s) {
  std::vector<std::pair<uint32_t, uint64_t>> keys;
  for (const auto& [key, stage] : s.stages)
    if (stage.waiting) keys.push_back(key);
  for (const auto& key : keys) install_stage(s, key);
}

// Called with the session's events read: the mapping changes that made these installs fail
// with EAGAIN have been applied (a range removed or moved meanwhile is skipped by the map).
void FaultEngine::Loop::retry_installs(Session& s) {
  retry_stages(s);
  if (s.retry.empty()) return;
  std::vector<Session::Retry> list;
  list.swap(s.retry);
  for (const Session::Retry& r : list) {
    if (r.tag == kZeroTag) {
      // Installed again even if a fault put it in meanwhile: a chunk marked present whose page
      // a fault found missing (after fork, races) has a thread waiting on it too, and a page
      // already there only costs an EEXIST.
      uint32_t& st = s.state[r.ref.region][r.ref.chunk];
      if (st == kFailed) continue;
      if (st == kZeroRetry) st = kAbsent;
      install_zero_chunk(s, r.ref, r.fault_ns != 0, r.fault_ns);
    } else if (Pending* p = pending_of(r.tag)) {
      // The decoded bytes are not kept (the buffer is the next chunk's): fetch them again.
      (p->demand ? s.demand_q : s.prefetch_q).push_back(ChunkRequest{p->ref, r.tag, p->demand});
    }
  }
  // Left over from swap(): keep the capacity so a burst of retries does not allocate twice.
  if (s.retry.empty()) {
    list.clear();
    s.retry.swap(list);
  }
}

void FaultEngine::Loop::mark_present(Session& s, ChunkRef ref) {
  s.state[ref.region][ref.chunk] = kPresent;
  ++s.chunks_present;
  check_complete(s);
}

// Every chunk present or failed, and every failed page poisoned: nothing left to wait for.
void FaultEngine::Loop::check_complete(Session& s) {
  if (s.chunks_present + s.chunks_failed == s.chunks_total && !s.complete && !s.held) {
    std::lock_guard lock(e_.mu_);
    s.complete = true;
    e_.cv_.notify_all();
    e_.signal_change();
  }
}

void FaultEngine::Loop::mark_exited(Session& s) {
  if (s.exited.exchange(true)) return;
  log_->info("session {}: its process has exited; nothing more to serve", s.name);
  s.demand_q.clear();
  s.prefetch_q.clear();
  s.retry.clear();
  std::lock_guard lock(e_.mu_);
  e_.cv_.notify_all();
  e_.signal_change();
}

// Sessions without a process id (a forked child's: UFFD_EVENT_FORK does not say which pid) have
// no pidfd to tell us when they exit; a failed install does, but only if something is installed.
// Ask the kernel about them once a second instead.
void FaultEngine::Loop::probe_orphans() {
  uint64_t now = now_ns();
  if (now - last_probe_ns_ < 1'000'000'000ULL) return;
  last_probe_ns_ = now;
  for (auto& s : live_) {
    if (s->pid > 0 || s->exited || s->complete) continue;
    if (!s->uffd.mm_alive(kProbeAddress)) mark_exited(*s);
  }
}

void FaultEngine::Loop::fail_chunk(Session& s, ChunkRef ref, const Error& why) {
  const bool first_for_chunk = mark_failed(s, ref);
  if (first_for_chunk) s.stats[ref.region]->add_error();
  bool first_for_session = false;
  {
    std::lock_guard lock(e_.mu_);
    if (!s.failed) {
      first_for_session = true;
      s.failure = why.message();
      s.failed = true;
    }
    e_.cv_.notify_all();
    e_.signal_change();
  }
  if (first_for_session) log_restore_failure(s.name, why.message());
  if (s.hold_failures) {  // poisoned by release_failures(), once the process has been told
    s.held = true;
    return;
  }
  poison_chunk(s, ref);
  if (first_for_chunk) check_complete(s);
}

// False if it had failed already. A huge page fails whole: every chunk of it, those under way
// given up on (but `ref`'s own, which its caller frees), its stage dropped.
bool FaultEngine::Loop::mark_failed(Session& s, ChunkRef ref) {
  std::vector<uint32_t>& state = s.state[ref.region];
  if (state[ref.chunk] == kFailed) return false;
  const auto [lo, hi] = s.huge ? s.page_chunks(ref) : std::pair{ref.chunk, ref.chunk + 1};
  for (uint32_t c = lo; c < hi; ++c) {
    uint32_t& st = state[c];
    if (st == kFailed) continue;
    if (st >= kInFlight && c != ref.chunk) free_pending(st - kInFlight);
    if (st == kPresent) s.chunks_present--;
    st = kFailed;
    ++s.chunks_failed;
  }
  if (s.huge) {
    if (auto it = s.stages.find({ref.region, uint64_t{lo} * s.chunk_size()}); it != s.stages.end()) {
      spare_stage(std::move(it->second.bytes));
      s.stages.erase(it);
    }
  }
  return true;
}

void FaultEngine::Loop::poison_chunk(Session& s, ChunkRef ref) {
  uint64_t off = static_cast<uint64_t>(ref.chunk) * s.chunk_size();
  uint64_t len = s.manifest->chunk_length(ref.region, ref.chunk);
  if (s.huge) {  // its whole page
    off = off / s.huge * s.huge;
    len = s.huge;
  }
  if (e_.features_.has_uffd_poison()) {
    // Faulting threads get SIGBUS on these pages: visible, never a hang, never a wrong page.
    s.map.for_each_span(ref.region, off, len, [&](uint64_t addr, uint64_t, uint64_t n) {
      sys::InstallResult r = s.uffd.poison(addr, n);
      if (r.outcome != sys::InstallOutcome::kDone) {
        const uint64_t page = s.huge ? s.huge : s.manifest->regions[ref.region].page_size;
        for (uint64_t o = r.bytes / page * page; o < n; o += page) (void)s.uffd.poison(addr + o, page);
        (void)s.uffd.wake(addr, n);
      }
    });
  } else if (e_.options_.kill_on_failure && s.pid > 0) {
    log_->error("session {}: kernel has no UFFDIO_POISON; killing pid {} rather than leave it hanging", s.name, s.pid);
    ::kill(s.pid, SIGKILL);
  }
}

void FaultEngine::Loop::release_failures(Session& s) {
  s.hold_failures = false;
  if (!s.held) return;
  s.held = false;
  // The chunks failed so far, where the map puts them now (it may have changed since); a huge
  // page once, not once per chunk.
  for (uint32_t region = 0; region < s.state.size(); ++region) {
    for (uint32_t chunk = 0; chunk < s.state[region].size(); ++chunk) {
      if (s.state[region][chunk] != kFailed) continue;
      poison_chunk(s, ChunkRef{region, chunk});
      if (s.huge) chunk = s.page_chunks(ChunkRef{region, chunk}).second - 1;
    }
  }
  check_complete(s);
}

// ---- the loop ----

void FaultEngine::Loop::run() {
  epoll_.reset(::epoll_create1(EPOLL_CLOEXEC));
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = kControlTag;
  ::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, e_.control_.get(), &ev);
  unsigned decoders = e_.options_.decode_threads;
  if (decoders == 0) decoders = std::max(1u, std::thread::hardware_concurrency()) - 1;
  if (decoders > 0) {
    pool_ = std::make_unique<DecodePool>(decoders, e_.options_.decode_jobs, kDefaultChunkSize);
    ev.data.u64 = kDecodeTag;
    ::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, pool_->done_fd(), &ev);
  }
  std::vector<epoll_event> events(64);
  while (!e_.stopping_.load()) {
    process_commands();
    more_ready_ = false;
    bool sync_reader_busy = false;
    bool retrying = false;
    for (auto& s : live_) {
      retry_installs(*s);  // events read by the last round came first
      retrying |= !s->retry.empty() || s->stages_waiting();
      fill_prefetch(*s);
      flush(*s);
      if (s->backlog || (s->reader && s->reader->wait_fd() < 0 && s->reader->in_flight() > 0)) sync_reader_busy = true;
    }
    int timeout = (more_ready_ || sync_reader_busy) ? 0 : -1;
    if (demand_in_flight_ > 0 && timeout != 0) timeout = 100;  // to enforce the deadline
    if (timeout == -1 && has_orphans()) timeout = 1000;          // to probe them
    // An install met EAGAIN again although the events were read: the process applying the
    // mapping change has not resumed yet (the kernel clears mmap_changing then, with no event
    // to tell us). Look again shortly; this lasts as long as that thread takes to run.
    if (retrying && (timeout == -1 || timeout > 1)) timeout = 1;
    // Keep CPUs quick to wake while fetching, and let them sleep deeply within 100 ms of the
    // last activity (we wake up to give the request back).
    constexpr uint64_t kQosLingerNs = 100'000'000;
    if (e_.options_.cpu_latency_qos) {
      bool busy = now_ns() - last_activity_ns_ < kQosLingerNs;
      if (cpu_latency_.set(busy) && timeout == -1) timeout = 100;
    }
    int n = ::epoll_wait(epoll_.get(), events.data(), static_cast<int>(events.size()), timeout);
    if (n < 0 && errno != EINTR) {
      log_->error("fault engine: epoll_wait: {}", std::strerror(errno));
      break;
    }
    for (int i = 0; i < n; ++i) {
      uint64_t tag = events[static_cast<size_t>(i)].data.u64;
      if (tag == kControlTag) {
        uint64_t v;
        (void)!::read(e_.control_.get(), &v, sizeof v);
        continue;
      }
      if (tag == kDecodeTag) {
        drain_decoded();
        continue;
      }
      auto it = by_id_.find(tag >> 1);
      if (it == by_id_.end()) continue;
      if (tag & 1) poll_reader(*it->second);
      else drain_uffd(*it->second);
    }
    for (size_t i = 0; i < live_.size(); ++i) {
      Session& s = *live_[i];
      if (s.backlog || (s.reader && s.reader->wait_fd() < 0)) poll_reader(s);
      release_reader_if_complete(s);
      s.pages_gathering = s.stages.size();
    }
    check_deadlines();
    probe_orphans();
  }
  // Removals queued before stop() still happen, so callers that removed a session and then
  // stopped know its uffd is closed (the kernel waits on an open uffd at munmap).
  process_commands();
}

// ---- FaultEngine ----

void log_restore_failure(const std::string& session, const std::string& why) {
  log::get("runtime")->error("session {}: {}; failing accesses to the pages that could not be had", session, why);
}

FaultEngine::FaultEngine(const KernelFeatures& features, EngineOptions options)
    : features_(features), options_(options), control_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)),
      changes_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {}

void FaultEngine::signal_change() {
  uint64_t one = 1;
  (void)!::write(changes_.get(), &one, sizeof one);
}

FaultEngine::~FaultEngine() { stop(); }

Status FaultEngine::start() {
  if (!control_.valid()) return sys_error("eventfd for the fault engine", errno);
  if (thread_.joinable()) return ok_status();
  thread_ = std::thread([this] {
    Loop loop(*this);
    loop.run();
  });
  return ok_status();
}

void FaultEngine::stop() {
  if (!thread_.joinable()) return;
  stopping_ = true;
  notify();
  thread_.join();
}

void FaultEngine::notify() {
  uint64_t one = 1;
  (void)!::write(control_.get(), &one, sizeof one);
}

namespace {

// Huge pages are installed whole, each from the chunks that make it up: chunks no larger than
// a page, ranges on page boundaries in memory and in the snapshot.
Status check_page_size(const SessionSpec& spec, const Manifest& m) {
  const uint64_t page = spec.page_size;
  if (page < 4096 || page > kMaxHugePage || (page & (page - 1)) != 0) {
    return Error(Errc::kUnsupported, fmt::format("fault engine: page size {} is not a power of two from 4 KiB to {} MiB",
                                                 page, kMaxHugePage >> 20));
  }
  if (page == 4096) return ok_status();
  if (spec.follower) {
    return Error(Errc::kUnsupported, "fault engine: faults on the faulting threads are served for 4 KiB pages only");
  }
  if (m.chunk_size == 0 || m.chunk_size > page || page % m.chunk_size != 0) {
    return Error(Errc::kUnsupported, fmt::format("fault engine: the snapshot's chunks ({} KiB) are larger than the "
                                                 "{} KiB pages it would restore, or do not divide them: capture it "
                                                 "with chunks of at most the page size",
                                                 m.chunk_size >> 10, page >> 10));
  }
  for (const MappedRange& r : spec.ranges) {
    if (r.start % page != 0 || r.length % page != 0 || r.region_offset % page != 0) {
      return Error(Errc::kInvalidArgument,
                   fmt::format("fault engine: range {:#x}+{:#x} at snapshot offset {:#x} is not on {} KiB page "
                               "boundaries",
                               r.start, r.length, r.region_offset, page >> 10));
    }
  }
  return ok_status();
}

}  // namespace

Result<SessionId> FaultEngine::add_session(SessionSpec spec) {
  if (!spec.source) return Error(Errc::kInvalidArgument, "fault engine: session without a chunk source");
  auto s = std::make_shared<Session>();
  s->name = spec.name;
  s->pid = spec.pid;
  s->prefetch = spec.prefetch;
  s->hold_failures = spec.hold_failures;
  s->follower = std::move(spec.follower);
  s->uffd = std::move(spec.uffd);
  s->source = std::move(spec.source);
  s->manifest = &s->source->manifest();
  LAZYMEM_ASSIGN_OR_RETURN(s->dict, s->source->dictionary());
  LAZYMEM_TRY(check_page_size(spec, *s->manifest));
  if (spec.page_size > 4096) s->huge = spec.page_size;
  for (const MappedRange& r : spec.ranges) {
    // Written so that nothing wraps: a range's region offset indexes the region's chunks.
    if (r.region >= s->manifest->regions.size() || r.length > s->manifest->regions[r.region].length ||
        r.region_offset > s->manifest->regions[r.region].length - r.length) {
      return Error(Errc::kInvalidArgument, fmt::format("fault engine: range {:#x}+{} lies outside snapshot region {}",
                                                       r.start, r.length, r.region));
    }
    // And inside its chunks: a fault indexes them without looking (a source whose manifest was
    // not validated, or a check there that failed, must not turn into a read past the vector).
    const RegionInfo& region = s->manifest->regions[r.region];
    if (r.length > 0 && (r.region_offset + r.length - 1) / s->manifest->chunk_size >= region.chunks.size()) {
      return Error(Errc::kInvalidArgument,
                   fmt::format("fault engine: range {:#x}+{} reaches past the {} chunks of snapshot region {}", r.start,
                               r.length, region.chunks.size(), r.region));
    }
  }
  // A region no range of this session maps is another session's (a restore serves each page
  // size through a session of its own) or nobody's: nothing of it is fetched here, its chunks
  // counted present from the start.
  std::vector<bool> mapped(s->manifest->regions.size(), false);
  for (const MappedRange& r : spec.ranges) mapped[r.region] = true;
  s->map = AddressMap(std::move(spec.ranges));
  for (size_t i = 0; i < s->manifest->regions.size(); ++i) {
    const RegionInfo& r = s->manifest->regions[i];
    s->state.emplace_back(r.chunks.size(), mapped[i] ? kAbsent : kPresent);
    s->chunks_total += r.chunks.size();
    if (!mapped[i]) s->chunks_present += r.chunks.size();
    s->stats.push_back(std::make_unique<LiveRegionStats>(r.name, r.length));
  }
  {
    std::lock_guard lock(mu_);
    s->id = next_id_++;
    sessions_[s->id] = s;
    commands_.push_back(Command{Command::kAdd, s->id, false});
  }
  notify();
  return s->id;
}

void FaultEngine::remove_session(SessionId id) {
  {
    std::lock_guard lock(mu_);
    // Gone from sessions() at once, although the engine thread closes it a moment later.
    if (auto it = sessions_.find(id); it != sessions_.end()) it->second->removing = true;
    commands_.push_back(Command{Command::kRemove, id, false});
  }
  notify();
}

void FaultEngine::release_failures(SessionId id) {
  {
    std::lock_guard lock(mu_);
    commands_.push_back(Command{Command::kReleaseFailures, id, false});
  }
  notify();
}

void FaultEngine::set_prefetch(SessionId id, bool on) {
  {
    std::lock_guard lock(mu_);
    commands_.push_back(Command{Command::kPrefetch, id, on});
  }
  notify();
}

std::optional<SessionInfo> FaultEngine::session_info(SessionId id) const {
  std::lock_guard lock(mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return std::nullopt;
  const Session& s = *it->second;
  SessionInfo info;
  info.id = s.id;
  info.name = s.name;
  info.pid = s.pid;
  info.stats.source = s.source->describe();
  for (const auto& r : s.stats) info.stats.regions.push_back(r->read());
  info.chunks_total = s.chunks_total;
  info.chunks_present = s.chunks_present.load();
  info.pages_gathering = s.pages_gathering.load();
  info.page_size = s.huge ? s.huge : 4096;
  info.complete = s.complete.load();
  info.failed = s.failed.load();
  info.exited = s.exited.load();
  info.failure = s.failure;
  info.stats.complete = info.complete;
  info.stats.failed = info.failed;
  return info;
}

std::vector<SessionInfo> FaultEngine::sessions() const {
  std::vector<SessionId> ids;
  {
    std::lock_guard lock(mu_);
    for (const auto& [id, s] : sessions_)
      if (!s->removing) ids.push_back(id);
  }
  std::sort(ids.begin(), ids.end());
  std::vector<SessionInfo> out;
  for (SessionId id : ids) {
    if (auto i = session_info(id)) out.push_back(std::move(*i));
  }
  return out;
}

Status FaultEngine::wait_complete(SessionId id, std::chrono::milliseconds timeout, Wait until) {
  std::unique_lock lock(mu_);
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    auto it = sessions_.find(id);
    if (it == sessions_.end()) return Error(Errc::kNotFound, fmt::format("fault engine: no session {}", id));
    const Session& s = *it->second;
    // `complete` counts failed chunks too, once they are poisoned (check_complete). A process
    // gone has nothing left to lose, but only kSettled callers asked to hear of that.
    const bool settled = s.complete || (until == Wait::kSettled && s.exited);
    if (s.failed && (until == Wait::kFirstFailure || settled)) return Error(Errc::kIo, s.failure);
    if (settled) return ok_status();
    if (cv_.wait_until(lock, deadline) == std::cv_status::timeout) {
      return Error(Errc::kTimeout, fmt::format("session {}: not complete after {} ms ({} of {} chunks present)", s.name,
                                               timeout.count(), s.chunks_present.load(), s.chunks_total));
    }
  }
}

}  // namespace lazymem::fault
