// What kind of kernel object a descriptor received from a peer is, checked before it is used.
//
// Thread-safety: any thread.
#pragma once

#include "lazymem/result.h"

namespace lazymem::sys {

// Ok if `fd` is a userfaultfd; kInvalidArgument naming what it is otherwise. A descriptor that
// came over SCM_RIGHTS is whatever the peer chose: a pipe it pre-filled with a fake
// UFFD_EVENT_FORK, adopted as a uffd, made the fault engine take another session's uffd as the
// "child's" and fill the peer's bytes into that process's memory. Both the inode's filesystem
// (the anonymous-inode one, which no file can be put on) and its name tell: the name alone could
// be spoofed only by a path, which always starts with '/', but checking both costs nothing.
Status check_userfaultfd(int fd);

}  // namespace lazymem::sys
