// Dialer: a connection to a page server made without blocking — TCP connect, hello, and the
// token's challenge-response — moved on by step() whenever its socket is ready.
//
// The fault engine's thread reconnects with it while it keeps serving every other session (a
// blocking reconnect would stall them all for as long as a dead server takes to time out, or a
// name lookup for as long as DNS does); open_connection() drives the same steps with poll().
// What to wait for changes as it goes (a lookup's descriptor, then a socket per address tried):
// callers watch fd() and events() afresh after every step().
//
// Thread-safety: one thread at a time.
#pragma once

#include <sys/socket.h>

#include <optional>
#include <string>
#include <vector>

#include "lazymem/result.h"
#include "lazymem/snapshot.h"
#include "net/auth.h"
#include "net/frame.h"
#include "net/resolver.h"
#include "sys/unique_fd.h"

namespace lazymem::net {

// A non-blocking TCP socket (TCP_NODELAY) with connect() started.
Result<sys::UniqueFd> start_connect(const SocketAddress& a);

class Dialer {
 public:
  // `reads` (non-zero): the manifest checksum of the version of snapshot loc.name this connection
  // reads, named in the hello (wire Hello.manifestChecksum): the server serves that version to it.
  // Servers (loc.servers()) are tried from `first_server` (modulo their number) on, each of
  // their addresses in turn while connecting is refused: a caller retrying after a failed
  // attempt passes its attempt count, so that a server that accepts and then fails is not the
  // only one it ever tries.
  static Result<Dialer> start(const SnapshotLocation& loc, const std::string& token, uint64_t reads = 0,
                              size_t first_server = 0);
  Dialer(Dialer&&) = default;
  Dialer& operator=(Dialer&&) = default;

  // true: connected and authenticated (take() the socket); false: wait for events() on fd().
  // An error ends the attempt.
  Result<bool> step();
  int fd() const { return phase_ == Phase::kResolving ? lookup_->fd() : fd_.get(); }
  short events() const;           // POLLIN or POLLOUT
  const char* doing() const;      // for timeout messages: "connecting", ...
  Error timed_out() const;        // the attempt's time is up: which server, and doing what
  bool resolving() const { return phase_ == Phase::kResolving; }
  // The server being dialed (connected to, once step() says so): its index in loc.servers().
  size_t server() const { return (first_server_ + next_server_ - 1) % order_.size(); }
  sys::UniqueFd take() { return std::move(fd_); }
  // Whether the server reads Request.complete (its hello reply says so; older ones do not).
  bool takes_complete() const { return takes_complete_; }

 private:
  enum class Phase { kResolving, kConnecting, kSending, kAwaitHello, kAwaitAuth, kDone };
  Dialer() = default;
  Status connect_next();
  void take_lookup();
  void send_next(capnp::MessageBuilder& m, Phase after);
  Result<bool> on_reply(Header& h);

  SnapshotLocation loc_;
  std::string token_;
  uint64_t reads_ = 0;
  std::vector<SnapshotLocation::Server> order_;  // the servers, in the order they are tried
  size_t first_server_ = 0;                       // order_[0]'s index in loc.servers()
  size_t next_server_ = 0;
  std::shared_ptr<Lookup> lookup_;          // the current server's name (see take_lookup)
  std::vector<std::shared_ptr<Lookup>> retired_lookups_;  // servers' before, until the next step()
  std::vector<SocketAddress> addrs_;  // the current server's
  std::string server_;                // the one being dialed (HOST:PORT, for messages)
  size_t next_addr_ = 0;
  std::optional<Error> last_;         // the last server or address that failed: the error if all do
  sys::UniqueFd fd_;
  Phase phase_ = Phase::kConnecting;
  Phase after_send_ = Phase::kDone;
  std::vector<std::byte> out_;
  size_t out_off_ = 0;
  bool takes_complete_ = false;
  FrameBuffer in_;
  Nonce client_nonce_{};
  Nonce server_nonce_{};  // from its hello: what its proof (Reply.authenticated) is checked against
};

}  // namespace lazymem::net
