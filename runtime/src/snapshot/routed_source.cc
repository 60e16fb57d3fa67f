// RoutedSource: chunks unchanged since an earlier version read from that version, the rest from
// the snapshot itself.
#include "snapshot/routed_source.h"

#include <fmt/format.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <deque>
#include <optional>
#include <unordered_set>

#include "snapshot/manifest.h"
#include "sys/unique_fd.h"

namespace lazymem::snapshot {
namespace {

bool same_entry(const ChunkInfo& a, const ChunkInfo& b) {
  return a.codec == b.codec && a.offset == b.offset && a.stored_length == b.stored_length && a.checksum == b.checksum &&
         a.stored_checksum == b.stored_checksum;
}

// One reader per side. The engine waits on one fd per reader: ours is an epoll set holding both
// sides' fds, and an eventfd we signal while there is work poll() does without a fd to wake it
// (a pread store's reads, failures to deliver).
//
// The sides fail apart: a side that breaks (the paused source gone, say) fails the chunks it had
// in flight and those asked of it later, never the other side's: a broken reader is the
// engine's signal to fail every chunk it has in flight, and pages the base holds would be
// poisoned for the source's sake.
class RoutedReader final : public ChunkReader {
 public:
  RoutedReader(const RoutedSource& source, std::unique_ptr<ChunkReader> primary, std::unique_ptr<ChunkReader> base,
               sys::UniqueFd epoll, sys::UniqueFd kick)
      : source_(source), epoll_(std::move(epoll)), kick_(std::move(kick)) {
    sides_[0].reader = std::move(primary);
    sides_[1].reader = std::move(base);
  }

  Status submit(std::span<const ChunkRequest> requests) override {
    std::array<std::vector<ChunkRequest>, 2> split;
    for (const ChunkRequest& rq : requests) split[source_.from_base(rq.ref) ? 1 : 0].push_back(rq);
    for (size_t i = 0; i < 2; ++i) {
      Side& side = sides_[i];
      if (split[i].empty()) continue;
      if (!side.broken) {
        Status s = side.reader->submit(split[i]);
        if (s.ok()) {
          for (const ChunkRequest& rq : split[i]) side.tags.insert(rq.tag);
          continue;
        }
        break_side(side, std::move(s).error());
      }
      for (const ChunkRequest& rq : split[i]) failed_.emplace_back(rq.tag, *side.broken);
    }
    kick_if_work_without_fd();
    return ok_status();
  }

  Result<size_t> poll(ChunkSink& sink, bool block, size_t max) override {
    uint64_t junk;
    (void)!::read(kick_.get(), &junk, sizeof junk);
    size_t delivered = 0;
    const auto give_up_at = std::chrono::steady_clock::now() + kBlockSlice;
    for (;;) {
      delivered += deliver_failed(sink, max - delivered);
      // The side polled first alternates: neither's completions wait behind the other's.
      first_ ^= 1;
      for (size_t k = 0; k < 2 && delivered < max; ++k) {
        Side& side = sides_[first_ ^ k];
        if (side.broken) continue;
        Forward fwd(side, sink);
        auto n = side.reader->poll(fwd, false, max - delivered);
        if (n.ok()) {
          delivered += *n;
        } else {
          break_side(side, std::move(n).error());
          delivered += deliver_failed(sink, max - delivered);
        }
      }
      if (delivered > 0 || !block || in_flight() == 0) break;
      if (Side* sync = synchronous_with_work()) {
        Forward fwd(*sync, sink);
        auto n = sync->reader->poll(fwd, true, max);
        if (n.ok()) delivered += *n;
        else break_side(*sync, std::move(n).error());
        continue;
      }
      // Blocking, but not for ever: a caller that watches for stalls (read_chunks) gets 0 back.
      const auto now = std::chrono::steady_clock::now();
      if (now >= give_up_at) break;
      epoll_event ev[3];
      const int ms = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(give_up_at - now).count()) + 1;
      if (::epoll_wait(epoll_.get(), ev, 3, ms) < 0 && errno != EINTR) return sys_error("epoll_wait (routed chunk reader)", errno);
      (void)!::read(kick_.get(), &junk, sizeof junk);
    }
    kick_if_work_without_fd();
    return delivered;
  }

  int wait_fd() const override { return epoll_.get(); }
  size_t in_flight() const override {
    size_t n = failed_.size();
    for (const Side& side : sides_) n += side.broken ? 0 : side.reader->in_flight();
    return n;
  }
  // Every request may go to the same side: no more than the smaller side takes.
  size_t capacity() const override { return std::min(sides_[0].reader->capacity(), sides_[1].reader->capacity()); }
  // Both sides are told (a migration's paused source, behind its base store, stops at once).
  void finished() noexcept override {
    for (Side& side : sides_)
      if (!side.broken) side.reader->finished();
  }

 private:
  static constexpr auto kBlockSlice = std::chrono::milliseconds(200);

  struct Side {
    std::unique_ptr<ChunkReader> reader;
    std::unordered_set<uint64_t> tags;  // in flight on it
    std::optional<Error> broken;        // why it no longer reads
  };
  // Forgets each completion's tag on its side as it passes it on.
  struct Forward final : ChunkSink {
    Forward(Side& s, ChunkSink& to) : side(s), sink(to) {}
    void on_chunk(uint64_t tag, std::span<const std::byte> stored) override {
      side.tags.erase(tag);
      sink.on_chunk(tag, stored);
    }
    void on_chunk_error(uint64_t tag, const Error& error) override {
      side.tags.erase(tag);
      sink.on_chunk_error(tag, error);
    }
    Side& side;
    ChunkSink& sink;
  };

  void break_side(Side& side, Error why) {
    side.broken = std::move(why);
    for (uint64_t tag : side.tags) failed_.emplace_back(tag, *side.broken);
    side.tags.clear();
  }
  size_t deliver_failed(ChunkSink& sink, size_t max) {
    size_t n = 0;
    for (; n < max && !failed_.empty(); ++n) {
      auto [tag, why] = std::move(failed_.front());
      failed_.pop_front();
      sink.on_chunk_error(tag, why);
    }
    return n;
  }
  Side* synchronous_with_work() {
    for (Side& side : sides_) {
      if (!side.broken && side.reader->wait_fd() < 0 && side.reader->in_flight() > 0) return &side;
    }
    return nullptr;
  }
  void kick_if_work_without_fd() {
    if (failed_.empty() && synchronous_with_work() == nullptr) return;
    uint64_t one = 1;
    (void)!::write(kick_.get(), &one, sizeof one);
  }

  const RoutedSource& source_;
  std::array<Side, 2> sides_;  // primary, base
  std::deque<std::pair<uint64_t, Error>> failed_;
  size_t first_ = 0;
  sys::UniqueFd epoll_, kick_;
};

}  // namespace

Result<std::shared_ptr<RoutedSource>> RoutedSource::open(std::shared_ptr<ChunkSource> primary, std::shared_ptr<ChunkSource> base) {
  const Manifest& p = primary->manifest();
  const Manifest& b = base->manifest();
  const std::string base_name = base->describe(), primary_name = primary->describe();  // both are moved below
  auto differ = [&](const std::string& what) {
    return Error(Errc::kInvalidArgument,
                 fmt::format("{} is not an earlier version of {}: {} differ; give the base the snapshot was made from",
                             base_name, primary_name, what));
  };
  if (p.chunk_size != b.chunk_size) return differ(fmt::format("chunk sizes ({} and {})", b.chunk_size, p.chunk_size));
  if (p.regions.size() != b.regions.size()) {
    return differ(fmt::format("region counts ({} and {})", b.regions.size(), p.regions.size()));
  }
  auto routed = std::shared_ptr<RoutedSource>(new RoutedSource(std::move(primary), std::move(base)));
  bool needs_dictionary = false;
  for (size_t r = 0; r < p.regions.size(); ++r) {
    const RegionInfo& pr = p.regions[r];
    const RegionInfo& br = b.regions[r];
    if (pr.name != br.name || pr.start_address != br.start_address || pr.length != br.length ||
        pr.page_size != br.page_size || pr.kind != br.kind) {
      return differ(fmt::format("regions #{} ('{}' and '{}': name, address, length, page size or kind)", r,
                                escape_name(br.name), escape_name(pr.name)));
    }
    auto& route = routed->from_base_.emplace_back(pr.chunks.size(), false);
    for (size_t c = 0; c < pr.chunks.size(); ++c) {
      if (pr.chunks[c].codec == Codec::kZero || !same_entry(pr.chunks[c], br.chunks[c])) continue;
      route[c] = true;
      ++routed->chunks_from_base_;
      needs_dictionary |= pr.chunks[c].codec == Codec::kZstdPages;
    }
  }
  // Chunks from the base are decoded with the snapshot's dictionary: it must be the base's.
  if (needs_dictionary && p.dictionary != b.dictionary) return differ("dictionaries");
  return routed;
}

Result<std::unique_ptr<ChunkReader>> RoutedSource::open_reader() {
  LAZYMEM_ASSIGN_OR_RETURN(auto primary, primary_->open_reader());
  LAZYMEM_ASSIGN_OR_RETURN(auto base, base_->open_reader());
  sys::UniqueFd epoll(::epoll_create1(EPOLL_CLOEXEC));
  if (!epoll.valid()) return sys_error("epoll_create1 (routed chunk reader)", errno);
  sys::UniqueFd kick(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!kick.valid()) return sys_error("eventfd (routed chunk reader)", errno);
  for (int fd : {primary->wait_fd(), base->wait_fd(), kick.get()}) {
    if (fd < 0) continue;
    epoll_event ev{};
    ev.events = EPOLLIN;
    if (::epoll_ctl(epoll.get(), EPOLL_CTL_ADD, fd, &ev) != 0) return sys_error("epoll_ctl (routed chunk reader)", errno);
  }
  return std::unique_ptr<ChunkReader>(
      std::make_unique<RoutedReader>(*this, std::move(primary), std::move(base), std::move(epoll), std::move(kick)));
}

std::string RoutedSource::describe() const {
  return fmt::format("{} (its {} chunks unchanged since {} read from there)", primary_->describe(), chunks_from_base_,
                     base_->describe());
}

}  // namespace lazymem::snapshot
