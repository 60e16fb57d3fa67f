// Ring: an owned io_uring instance.
//
// Thread-safety: a Ring belongs to one thread at a time (submission and completion queues are
// not locked). Each thread that does I/O owns its own Ring.
#pragma once

#include <liburing.h>

#include <memory>

#include "lazymem/result.h"

namespace lazymem::sys {

class Ring {
 public:
  // `entries` submission slots. The ring's memory is excluded from fork() so a child never
  // shares (and corrupts) the parent's queues.
  static Result<std::unique_ptr<Ring>> create(unsigned entries, unsigned flags = 0);
  ~Ring();
  Ring(const Ring&) = delete;
  Ring& operator=(const Ring&) = delete;

  io_uring* get() { return &ring_; }
  // Returns a free SQE, submitting queued ones first if the queue is full.
  io_uring_sqe* sqe();

 private:
  Ring() = default;
  io_uring ring_{};
};

}  // namespace lazymem::sys
