// RoutedSource: chunks unchanged since an earlier version read from that version, the rest from
// the snapshot itself.
#include "snapshot/routed_source.h"

#include <fmt/format.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <array>

#include "snapshot/manifest.h"
#include "sys/unique_fd.h"

namespace lazymem::snapshot {
namespace {

bool same_entry(const ChunkInfo& a, const ChunkInfo& b) {
  return a.codec == b.codec && a.offset == b.offset && a.stored_length == b.stored_length && a.checksum == b.checksum &&
         a.stored_checksum == b.stored_checksum;
}

// One reader per side. The engine waits on one fd per reader: ours is an epoll set holding both
// sides' fds, and an eventfd we signal while a side without one (a pread store: its poll() does
// the reads) has work, so that the engine comes back to poll it.
class RoutedReader final : public ChunkReader {
 public:
  RoutedReader(const RoutedSource& source, std::unique_ptr<ChunkReader> primary, std::unique_ptr<ChunkReader> base,
               sys::UniqueFd epoll, sys::UniqueFd kick)
      : source_(source), sides_{std::move(primary), std::move(base)}, epoll_(std::move(epoll)), kick_(std::move(kick)) {}

  Status submit(std::span<const ChunkRequest> requests) override {
    std::array<std::vector<ChunkRequest>, 2> split;
    for (const ChunkRequest& rq : requests) split[source_.from_base(rq.ref) ? 1 : 0].push_back(rq);
    for (size_t i = 0; i < 2; ++i) {
      if (!split[i].empty()) LAZYMEM_TRY(sides_[i]->submit(split[i]));
    }
    kick_if_synchronous_work();
    return ok_status();
  }

  Result<size_t> poll(ChunkSink& sink, bool block, size_t max) override {
    uint64_t junk;
    (void)!::read(kick_.get(), &junk, sizeof junk);
    size_t delivered = 0;
    for (;;) {
      for (auto& side : sides_) {
        if (delivered >= max) break;
        LAZYMEM_ASSIGN_OR_RETURN(size_t n, side->poll(sink, false, max - delivered));
        delivered += n;
      }
      if (delivered > 0 || !block || in_flight() == 0) break;
      ChunkReader* sync = synchronous_with_work();
      if (sync != nullptr) {
        LAZYMEM_ASSIGN_OR_RETURN(size_t n, sync->poll(sink, true, max));
        delivered += n;
        continue;
      }
      epoll_event ev[2];
      if (::epoll_wait(epoll_.get(), ev, 2, -1) < 0 && errno != EINTR) return sys_error("epoll_wait (routed chunk reader)", errno);
    }
    kick_if_synchronous_work();
    return delivered;
  }

  int wait_fd() const override { return epoll_.get(); }
  size_t in_flight() const override { return sides_[0]->in_flight() + sides_[1]->in_flight(); }
  // Every request may go to the same side: no more than the smaller side takes.
  size_t capacity() const override { return std::min(sides_[0]->capacity(), sides_[1]->capacity()); }

 private:
  ChunkReader* synchronous_with_work() const {
    for (const auto& side : sides_) {
      if (side->wait_fd() < 0 && side->in_flight() > 0) return side.get();
    }
    return nullptr;
  }
  void kick_if_synchronous_work() {
    if (synchronous_with_work() == nullptr) return;
    uint64_t one = 1;
    (void)!::write(kick_.get(), &one, sizeof one);
  }

  const RoutedSource& source_;
  std::array<std::unique_ptr<ChunkReader>, 2> sides_;  // primary, base
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
