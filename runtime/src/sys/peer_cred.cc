// Who is at the other end of a Unix socket.
#include "sys/peer_cred.h"

#include <fmt/format.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "sys/uapi_compat.h"

namespace lazymem::sys {
namespace {

// Readable once the process has exited.
bool exited(int pidfd) {
  pollfd p{pidfd, POLLIN, 0};
  return ::poll(&p, 1, 0) == 1;
}

}  // namespace

Result<PeerCred> peer_cred(int sock) {
  PeerCred out;
  ucred cred{};
  socklen_t len = sizeof cred;
  if (::getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return sys_error("SO_PEERCRED", errno);
  out.pid = cred.pid;
  out.uid = cred.uid;
  out.gid = cred.gid;
  out.groups.resize(64);
  for (;;) {
    len = static_cast<socklen_t>(out.groups.size() * sizeof(gid_t));
    if (::getsockopt(sock, SOL_SOCKET, SO_PEERGROUPS, out.groups.data(), &len) == 0) break;
    // ERANGE: `len` now says how much room they need.
    if (errno != ERANGE || len <= out.groups.size() * sizeof(gid_t)) return sys_error("SO_PEERGROUPS", errno);
    out.groups.resize(len / sizeof(gid_t));
  }
  out.groups.resize(len / sizeof(gid_t));
  int fd = -1;
  len = sizeof fd;
  if (::getsockopt(sock, SOL_SOCKET, SO_PEERPIDFD, &fd, &len) == 0) {
    out.pidfd.reset(fd);
  } else if (errno == ESRCH) {
    return Error(Errc::kPeerGone, fmt::format("process {} connected and exited", out.pid));
  } else {  // before Linux 6.5 (ENOPROTOOPT)
    out.pidfd.reset(static_cast<int>(::syscall(SYS_pidfd_open, out.pid, 0)));
    if (!out.pidfd.valid()) {
      if (errno == ESRCH) return Error(Errc::kPeerGone, fmt::format("process {} connected and exited", out.pid));
      return sys_error(fmt::format("pidfd_open({})", out.pid), errno);
    }
    // Its end closed: the process may be gone and the pid another's now.
    pollfd p{sock, POLLRDHUP, 0};
    if (::poll(&p, 1, 0) == 1 && (p.revents & (POLLHUP | POLLRDHUP))) {
      return Error(Errc::kPeerGone, fmt::format("process {} connected and closed its end", out.pid));
    }
  }
  if (exited(out.pidfd.get())) return Error(Errc::kPeerGone, fmt::format("process {} connected and exited", out.pid));
  return out;
}

Status pidfd_signal(int pidfd, int sig) {
  if (::syscall(SYS_pidfd_send_signal, pidfd, sig, nullptr, 0) != 0) return sys_error("pidfd_send_signal", errno);
  return ok_status();
}

}  // namespace lazymem::sys
