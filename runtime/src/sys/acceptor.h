// Acceptor: takes connections from a listening socket that a level-triggered event loop watches,
// without that loop spinning when the process is out of file descriptors.
//
// Out of descriptors, accept4() fails and leaves the peer queued: the listener stays readable
// and the loop wakes for it again at once, for good. A spare descriptor, given up for the
// moment, makes room to take that peer and close it (it sees its connection closed at once, not
// an unanswered one) and is taken back.
//
// Thread-safety: one thread.
#pragma once

#include <sys/socket.h>

#include "sys/unique_fd.h"

namespace lazymem::sys {

class Acceptor {
 public:
  Acceptor();

  struct Next {
    UniqueFd fd;        // a connection (SOCK_NONBLOCK | SOCK_CLOEXEC), or invalid: none waits
    bool shed = false;  // a waiting peer was closed for want of a descriptor; more may wait
  };
  // The next waiting connection; `addr`/`len` as for accept4().
  Next accept(int listen_fd, sockaddr* addr = nullptr, socklen_t* len = nullptr);

 private:
  UniqueFd spare_;
};

}  // namespace lazymem::sys
