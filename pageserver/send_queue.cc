// SendQueue: replies sent from pinned extents, with MSG_ZEROCOPY where the kernel really does it.
#include "send_queue.h"

#include <linux/errqueue.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>

namespace lazymem::pageserver {
namespace {
void add(std::atomic<uint64_t>& c, uint64_t n = 1) { c.fetch_add(n, std::memory_order_relaxed); }
}  // namespace

void SendQueue::push(OutFrame f) {
  bytes_ += f.size();
  if (!f.urgent) {
    frames_.push_back(std::move(f));
    return;
  }
  // After a partly sent frame (the stream must stay whole) and earlier urgent frames.
  auto it = frames_.begin();
  if (front_off_ > 0 && it != frames_.end()) ++it;
  while (it != frames_.end() && it->urgent) ++it;
  frames_.insert(it, std::move(f));
}

SendQueue::Outcome SendQueue::send(int fd, SendCounters& counters) {
  while (!frames_.empty()) {
    iovec iov[kMaxIov];
    size_t n = 0, total = 0, slice_bytes = 0, skip = front_off_;
    auto put = [&](const std::byte* p, size_t len, bool slice) {
      if (skip >= len) {
        skip -= len;
        return;
      }
      iov[n++] = iovec{const_cast<std::byte*>(p) + skip, len - skip};
      total += len - skip;
      if (slice) slice_bytes += len - skip;
      skip = 0;
    };
    for (const OutFrame& f : frames_) {
      if (n + 1 + f.slices.size() > kMaxIov) break;
      put(f.head.data(), f.head.size(), false);
      for (const auto& s : f.slices) put(s.second.data(), s.second.size(), true);
    }
    bool zc = zerocopy_ && slice_bytes >= kZeroCopyMin;
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = n;
    ssize_t r = ::sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT | (zc ? MSG_ZEROCOPY : 0));
    if (r < 0 && zc && errno == ENOBUFS) {  // out of notification memory (optmem_max): copy this one
      zc = false;
      r = ::sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    }
    if (r < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) return Outcome::kBlocked;
      if (errno == EINTR) continue;
      return Outcome::kError;
    }
    if (zc) {
      inflight_.push_back(Inflight{next_id_++, false, {}});
      add(counters.zerocopy_sends);
      add(counters.zerocopy_bytes, static_cast<uint64_t>(r));
    } else {
      add(counters.plain_sends);
      add(counters.plain_bytes, static_cast<uint64_t>(r));
    }
    advance(static_cast<size_t>(r), zc);
    if (static_cast<size_t>(r) < total) return Outcome::kBlocked;
  }
  return Outcome::kDrained;
}

void SendQueue::advance(size_t n, bool zc) {
  sent_total_ += n;
  while (n > 0) {
    OutFrame& f = frames_.front();
    size_t left = f.size() - front_off_;
    if (zc) f.zc_touched = true;
    if (n < left) {
      front_off_ += n;
      return;
    }
    n -= left;
    front_off_ = 0;
    OutFrame done = std::move(frames_.front());
    frames_.pop_front();
    // Ids complete in order of release (see on_error_queue), so the newest send covers every
    // earlier one that touched this frame.
    if (done.zc_touched && !inflight_.empty()) {
      inflight_.back().frames.push_back(std::move(done));
    } else {
      bytes_ -= done.size();  // unpins as it goes
    }
  }
}

void SendQueue::mark_done(uint32_t id) {
  if (inflight_.empty()) return;
  uint32_t off = id - inflight_.front().id;
  if (off < inflight_.size()) inflight_[off].done = true;
}

void SendQueue::on_error_queue(int fd, SendCounters& counters) {
  for (;;) {
    alignas(cmsghdr) char control[256];
    msghdr msg{};
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    if (::recvmsg(fd, &msg, MSG_ERRQUEUE | MSG_DONTWAIT) < 0) break;  // EAGAIN: drained
    for (cmsghdr* cm = CMSG_FIRSTHDR(&msg); cm != nullptr; cm = CMSG_NXTHDR(&msg, cm)) {
      bool recverr = (cm->cmsg_level == SOL_IP && cm->cmsg_type == IP_RECVERR) ||
                     (cm->cmsg_level == SOL_IPV6 && cm->cmsg_type == IPV6_RECVERR);
      if (!recverr) continue;
      sock_extended_err err;
      std::memcpy(&err, CMSG_DATA(cm), sizeof err);
      if (err.ee_errno != 0 || err.ee_origin != SO_EE_ORIGIN_ZEROCOPY) continue;
      uint32_t lo = err.ee_info, hi = err.ee_data;
      for (uint32_t id = lo;; ++id) {
        mark_done(id);
        if (id == hi) break;
      }
      if (err.ee_code & SO_EE_CODE_ZEROCOPY_COPIED) {
        add(counters.copied_sends, uint64_t{hi - lo} + 1);
        if (zerocopy_) {
          zerocopy_ = false;
          add(counters.fallbacks);
        }
      }
    }
  }
  // Release in order: a frame is filed under the last send that touched it.
  while (!inflight_.empty() && inflight_.front().done) {
    for (const OutFrame& f : inflight_.front().frames) bytes_ -= f.size();
    inflight_.pop_front();
  }
}

std::deque<OutFrame> SendQueue::take_in_flight() {
  std::deque<OutFrame> out;
  for (Inflight& i : inflight_)
    for (OutFrame& f : i.frames) out.push_back(std::move(f));
  inflight_.clear();
  if (!frames_.empty() && (front_off_ > 0 || frames_.front().zc_touched)) {
    out.push_back(std::move(frames_.front()));
    frames_.pop_front();
    front_off_ = 0;
  }
  bytes_ = 0;
  for (const OutFrame& f : frames_) bytes_ += f.size();
  return out;
}

}  // namespace lazymem::pageserver
