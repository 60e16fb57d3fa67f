// UniqueFd: owns one file descriptor and closes it exactly once.
#include "sys/unique_fd.h"

#include <unistd.h>

namespace lazymem::sys {

void UniqueFd::reset(int fd) {
  if (fd_ >= 0) {
    // close() is not retried on EINTR: on Linux the fd is released either way.
    ::close(fd_);
  }
  fd_ = fd;
}

}  // namespace lazymem::sys
