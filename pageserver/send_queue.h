// SendQueue: a connection's replies, sent without copying their payloads.
//
// A frame is its header bytes (owned, small) plus slices of pinned extents; many frames go out
// in one sendmsg. With zero-copy on, large sends use MSG_ZEROCOPY: the kernel sends from the
// extents themselves, so their pins are kept until its completion notification (read from the
// socket's error queue) covers that send. Where the kernel reports that it copied anyway
// (SO_EE_CODE_ZEROCOPY_COPIED: loopback, devices without scatter-gather), the connection goes
// back to plain sends, which then cost less than page pinning plus notifications.
//
// Thread-safety: one thread (the server loop); SendCounters may be read from any thread.
#pragma once

#include <boost/container/small_vector.hpp>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <span>
#include <vector>

#include "extent_cache.h"

namespace lazymem::pageserver {

struct OutFrame {
  std::vector<std::byte> head;  // frame prefix + header (+ a small payload, copied)
  boost::container::small_vector<std::pair<Pin, std::span<const std::byte>>, 2> slices;
  bool urgent = false;      // a demand reply: goes ahead of queued prefetch replies
  bool zc_touched = false;  // some of it went out zero-copy: keep it until that completes
  size_t size() const {
    size_t n = head.size();
    for (const auto& s : slices) n += s.second.size();
    return n;
  }
};

// Server-wide counters.
struct SendCounters {
  std::atomic<uint64_t> zerocopy_sends{0}, zerocopy_bytes{0};
  std::atomic<uint64_t> copied_sends{0};  // zero-copy sends the kernel reported as copied
  std::atomic<uint64_t> plain_sends{0}, plain_bytes{0};
  std::atomic<uint64_t> fallbacks{0};  // connections switched to plain sends
};

class SendQueue {
 public:
  // Below this many payload bytes in one sendmsg, copying is cheaper than pinning pages and
  // reading a completion notification.
  static constexpr size_t kZeroCopyMin = 10 * 1024;
  static constexpr size_t kMaxIov = 64;

  explicit SendQueue(bool zerocopy) : zerocopy_(zerocopy) {}
  SendQueue(const SendQueue&) = delete;
  SendQueue& operator=(const SendQueue&) = delete;

  void push(OutFrame f);
  bool has_unsent() const { return !frames_.empty(); }
  // Nothing unsent and nothing the kernel may still read from.
  bool idle() const { return frames_.empty() && inflight_.empty(); }
  // Bytes queued plus bytes held for zero-copy completions: what backpressure limits.
  size_t bytes() const { return bytes_; }
  // Bytes the socket has taken, ever: whether the peer reads at all.
  uint64_t sent_total() const { return sent_total_; }
  bool zerocopy() const { return zerocopy_; }

  enum class Outcome { kDrained, kBlocked, kError };
  Outcome send(int fd, SendCounters& counters);
  // Reads zero-copy completions from the socket's error queue and releases what they cover.
  void on_error_queue(int fd, SendCounters& counters);
  // Frames the kernel may still read from (zero-copy in flight, or a frame partly sent), for
  // a caller that closes the socket before their completions arrive.
  std::deque<OutFrame> take_in_flight();

 private:
  struct Inflight {
    uint32_t id;
    bool done = false;
    std::deque<OutFrame> frames;
  };
  void advance(size_t n, bool zc);
  void mark_done(uint32_t id);

  std::deque<OutFrame> frames_;
  size_t front_off_ = 0;
  uint64_t sent_total_ = 0;  // bytes of frames_.front() already sent
  size_t bytes_ = 0;
  std::deque<Inflight> inflight_;  // one per zero-copy sendmsg, ids consecutive
  uint32_t next_id_ = 0;           // the kernel numbers a socket's zero-copy sends from 0
  bool zerocopy_;
};

}  // namespace lazymem::pageserver
