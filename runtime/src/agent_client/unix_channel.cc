// Frames over a Unix socket, with file descriptors riding along (SCM_RIGHTS).
#include "agent_client/unix_channel.h"

#include <fmt/format.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>

namespace lazymem::agent {

Status send_frame_fd(int sock, capnp::MessageBuilder& header, std::span<const std::byte> payload, int pass_fd) {
  std::vector<std::byte> bytes = net::encode_frame(header, static_cast<uint32_t>(payload.size()));
  bytes.insert(bytes.end(), payload.begin(), payload.end());
  return send_with_fd(sock, bytes, pass_fd);
}

Status send_with_fd(int sock, std::span<const std::byte> bytes, int pass_fd) {
  size_t done = 0;
  bool fd_sent = pass_fd < 0;
  while (done < bytes.size()) {
    iovec iov{const_cast<std::byte*>(bytes.data()) + done, bytes.size() - done};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
    if (!fd_sent) {
      msg.msg_control = control;
      msg.msg_controllen = sizeof control;
      cmsghdr* c = CMSG_FIRSTHDR(&msg);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int));
      std::memcpy(CMSG_DATA(c), &pass_fd, sizeof(int));
    }
    ssize_t n = ::sendmsg(sock, &msg, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) {
        pollfd p{sock, POLLOUT, 0};
        ::poll(&p, 1, 5000);
        continue;
      }
      return sys_error("send to lazymem-agent", errno);
    }
    fd_sent = true;
    done += static_cast<size_t>(n);
  }
  return ok_status();
}

Status recv_some(int sock, net::FrameBuffer& buf, std::deque<sys::UniqueFd>& fds, int timeout_ms) {
  if (timeout_ms != 0) {
    pollfd p{sock, POLLIN, 0};
    int r;
    do r = ::poll(&p, 1, timeout_ms);
    while (r < 0 && errno == EINTR);
    if (r == 0) return Error(Errc::kTimeout, "no answer from the other end of the agent socket");
  }
  auto space = buf.writable();
  iovec iov{space.data(), space.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 4)];
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  ssize_t n;
  do n = ::recvmsg(sock, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  while (n < 0 && errno == EINTR);
  if (n < 0 && errno == EAGAIN) return ok_status();
  if (n < 0) return sys_error("receive on the agent socket", errno);
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
      size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < count; ++i) {
        int fd;
        std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
        fds.emplace_back(fd);
      }
    }
  }
  if (n == 0) return Error(Errc::kPeerGone, "the other end of the agent socket closed it");
  buf.commit(static_cast<size_t>(n));
  // More descriptors than fit here: the kernel closed the rest, and a message carries one at most.
  if (msg.msg_flags & MSG_CTRUNC) return Error(Errc::kProtocol, "more descriptors sent at once than a message carries");
  return ok_status();
}

Result<sys::UniqueFd> connect_unix(const std::string& path) {
  sys::UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return sys_error("socket", errno);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path) return Error(Errc::kInvalidArgument, "agent socket path too long: " + path);
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    const int e = errno;
    // The hint depends on why: nobody there, not a socket at all, or not ours to use.
    struct stat st {};
    std::string hint = fmt::format("is `lazymem-agent run --socket {}` running?", path);
    if (e == EACCES || e == EPERM) {
      hint = "the socket is the agent owner's: run as that user, or start the agent with --group for yours";
    } else if (::stat(path.c_str(), &st) == 0 && !S_ISSOCK(st.st_mode)) {
      hint = "that path is not a socket: give the agent's --socket";
    }
    return sys_error(fmt::format("connect to lazymem-agent at {} ({})", path, hint), e);
  }
  return fd;
}

}  // namespace lazymem::agent
