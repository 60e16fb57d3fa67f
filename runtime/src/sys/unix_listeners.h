// Whether some process listens on the Unix socket file a stat() describes.
//
// Why: a daemon that finds a socket file where it wants to listen must tell a stale one (its
// owner died: remove it) from a live one (another daemon, or a VM's pending handshake: leave it
// alone). Connecting to find out is not harmless: the listener accepts, and a socket that takes
// one handshake only would have spent it on the probe. The kernel's socket diagnostics
// (sock_diag, UNIX_DIAG_VFS) name the file each listening socket is bound to, without touching it.
#pragma once

#include <sys/stat.h>

#include "lazymem/result.h"

namespace lazymem::sys {

// True when a listening Unix stream socket in this network namespace is bound to a file with
// the inode of `st` (its low 32 bits: what the kernel reports; a false match only refuses). An error when the kernel offers no Unix socket diagnostics (CONFIG_UNIX_DIAG).
Result<bool> unix_listener_bound_to(const struct stat& st);

}  // namespace lazymem::sys
