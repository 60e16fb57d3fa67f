// Who is at the other end of a Unix socket, taken once, when it is accepted.
//
// Thread-safety: any thread.
#pragma once

#include <sys/types.h>

#include <vector>

#include "lazymem/result.h"
#include "sys/unique_fd.h"

namespace lazymem::sys {

// Whose a process is: its ids and supplementary groups, as taken at one moment (read later
// from /proc/PID/status, the groups could be another process's, its pid reused).
struct Credentials {
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
  std::vector<gid_t> groups;
};

struct PeerCred : Credentials {  // groups as at connect() (SO_PEERGROUPS)
  // The process that connected. A pid read later (its /proc files, pidfd_open, kill) may name
  // another process by then: the peer exits and its pid is reused. This does not.
  UniqueFd pidfd;
};

// The peer's credentials and a pidfd of it, from SO_PEERCRED, SO_PEERGROUPS and SO_PEERPIDFD
// (Linux 6.5). Before 6.5 the pidfd is opened by pid right after accept, and kept only if the
// peer still holds its end of the connection: its pid cannot have been reused while it lives
// (a socket end passed on to another process by a peer that then exited, and whose pid was
// reused in between, is the one case that is not told). kPeerGone when the peer has exited.
Result<PeerCred> peer_cred(int sock);

// Sends `sig` to the process `pidfd` refers to (never to one that took its pid since).
Status pidfd_signal(int pidfd, int sig);

}  // namespace lazymem::sys
