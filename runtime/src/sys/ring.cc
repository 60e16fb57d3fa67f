// Ring: an owned io_uring instance.
#include "sys/ring.h"

#include <fmt/format.h>

#include <cstring>

namespace lazymem::sys {

Result<std::unique_ptr<Ring>> Ring::create(unsigned entries, unsigned flags) {
  std::unique_ptr<Ring> ring(new Ring());
  int r = io_uring_queue_init(entries, &ring->ring_, flags);
  if (r < 0) {
    return Error(r == -EPERM || r == -EACCES ? Errc::kPermission : Errc::kUnsupported,
                 fmt::format("io_uring: setup with {} entries failed: {} (is kernel.io_uring_disabled set?)", entries,
                             std::strerror(-r)),
                 -r);
  }
  io_uring_ring_dontfork(&ring->ring_);
  return ring;
}

Ring::~Ring() { io_uring_queue_exit(&ring_); }

io_uring_sqe* Ring::sqe() {
  io_uring_sqe* s = io_uring_get_sqe(&ring_);
  if (s == nullptr) {
    io_uring_submit(&ring_);
    s = io_uring_get_sqe(&ring_);
  }
  return s;
}

}  // namespace lazymem::sys
