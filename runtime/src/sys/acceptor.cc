#include "sys/acceptor.h"

#include <fcntl.h>

#include <cerrno>

namespace lazymem::sys {

Acceptor::Acceptor() : spare_(::open("/dev/null", O_RDONLY | O_CLOEXEC)) {}

Acceptor::Next Acceptor::accept(int listen_fd, sockaddr* addr, socklen_t* len) {
  // Taken back if lost: between giving it up and taking it back, another thread (or, at the
  // system's limit, another process) may have had the descriptor.
  if (!spare_.valid()) spare_.reset(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  Next next;
  next.fd.reset(::accept4(listen_fd, addr, len, SOCK_NONBLOCK | SOCK_CLOEXEC));
  if (next.fd.valid() || (errno != EMFILE && errno != ENFILE) || !spare_.valid()) return next;
  spare_.reset();
  UniqueFd doomed(::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC));
  next.shed = doomed.valid();
  doomed.reset();
  spare_.reset(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  return next;
}

}  // namespace lazymem::sys
