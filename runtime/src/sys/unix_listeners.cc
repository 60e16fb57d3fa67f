// unix_listener_bound_to: one sock_diag dump of listening Unix sockets, matched by file.
#include "sys/unix_listeners.h"

#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/sock_diag.h>
#include <linux/unix_diag.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>

#include "sys/syscall_result.h"
#include "sys/unique_fd.h"

namespace lazymem::sys {

Result<bool> unix_listener_bound_to(const struct stat& st) {
  UniqueFd nl(::socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG));
  if (!nl.valid()) return sys_error("netlink socket diagnostics", errno);
  struct {
    nlmsghdr nlh;
    unix_diag_req req;
  } msg{};
  msg.nlh.nlmsg_len = sizeof msg;
  msg.nlh.nlmsg_type = SOCK_DIAG_BY_FAMILY;
  msg.nlh.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
  msg.nlh.nlmsg_seq = 1;
  msg.req.sdiag_family = AF_UNIX;
  msg.req.udiag_states = 1u << TCP_LISTEN;
  msg.req.udiag_show = UDIAG_SHOW_VFS;
  SysResult sent = call([&] { return ::send(nl.get(), &msg, sizeof msg, 0); });
  if (!sent.ok()) return sent.error("netlink socket diagnostics request");
  alignas(nlmsghdr) char buf[32768];
  bool found = false;
  for (;;) {
    SysResult got = call([&] { return ::recv(nl.get(), buf, sizeof buf, 0); });
    if (!got.ok()) return got.error("netlink socket diagnostics reply");
    if (got.value == 0) return Error(Errc::kIo, "netlink socket diagnostics: the kernel closed the dump");
    int len = static_cast<int>(got.value);
    for (auto* h = reinterpret_cast<nlmsghdr*>(buf); NLMSG_OK(h, len); h = NLMSG_NEXT(h, len)) {
      if (h->nlmsg_type == NLMSG_DONE) return found;
      if (h->nlmsg_type == NLMSG_ERROR) {
        const auto* e = static_cast<const nlmsgerr*>(NLMSG_DATA(h));
        return sys_error("netlink socket diagnostics of Unix sockets (CONFIG_UNIX_DIAG)", -e->error);
      }
      if (h->nlmsg_type != SOCK_DIAG_BY_FAMILY || h->nlmsg_len < NLMSG_LENGTH(sizeof(unix_diag_msg))) continue;
      auto* m = static_cast<unix_diag_msg*>(NLMSG_DATA(h));
      int alen = static_cast<int>(h->nlmsg_len - NLMSG_LENGTH(sizeof *m));
      for (auto* a = reinterpret_cast<rtattr*>(m + 1); RTA_OK(a, alen); a = RTA_NEXT(a, alen)) {
        if (a->rta_type != UNIX_DIAG_VFS || RTA_PAYLOAD(a) < sizeof(unix_diag_vfs)) continue;
        unix_diag_vfs v;
        std::memcpy(&v, RTA_DATA(a), sizeof v);
        // The kernel reports a 32-bit inode, and the superblock's device, which stat() does not
        // always report (btrfs subvolumes, overlayfs): a match on the inode's low 32 bits is
        // taken as live. Wrongly taken, a path is refused that could have been replaced; the
        // other way, a running daemon's socket would be taken over.
        if (v.udiag_vfs_ino == static_cast<uint32_t>(st.st_ino)) found = true;
      }
    }
  }
}

}  // namespace lazymem::sys
