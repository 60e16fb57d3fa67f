// Frames over a Unix socket, with file descriptors riding along (SCM_RIGHTS). Used by the
// agent and its clients; the frame format is the page server's (net/frame.h).
#pragma once

#include <capnp/message.h>

#include <chrono>
#include <deque>
#include <span>
#include <vector>

#include "lazymem/result.h"
#include "net/frame.h"
#include "sys/unique_fd.h"

namespace lazymem::agent {

// Sends one frame; `pass_fd` (if >= 0) travels with its first byte.
Status send_frame_fd(int sock, capnp::MessageBuilder& header, std::span<const std::byte> payload, int pass_fd);
// Sends `bytes` as they are (a peer's own format, Firecracker's handshake); `pass_fd` the same.
Status send_with_fd(int sock, std::span<const std::byte> bytes, int pass_fd);

// Receives what is available (or waits up to `timeout_ms`, -1 forever) into `buf`, keeping any
// received descriptors in `fds`. kPeerGone when the other end closed; kProtocol when more
// descriptors came at once than it takes (MSG_CTRUNC: four), those it took still in `fds`.
Status recv_some(int sock, net::FrameBuffer& buf, std::deque<sys::UniqueFd>& fds, int timeout_ms);

// Connects to a Unix socket path.
Result<sys::UniqueFd> connect_unix(const std::string& path);

}  // namespace lazymem::agent
