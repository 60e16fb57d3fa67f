// The server's side of the wire protocol's handshake (wire.capnp: hello, then authenticate when
// a token is set), shared by the page server and the migration source (MemoryServer): one place
// that checks what a peer says before it is trusted.
#pragma once

#include <optional>
#include <string>

#include "net/auth.h"
#include "wire.capnp.h"

namespace lazymem::net {

struct HandshakeRefusal {
  proto::wire::ErrorCode code;
  std::string message;
};

// Checks a hello (protocol version, client nonce). Accepted: the client's nonce is kept in
// `client_nonce` and a fresh one drawn into `server_nonce` (a MAC seen once is good for nothing
// else). Refused: answer with the refusal's code and message, then close.
std::optional<HandshakeRefusal> accept_hello(proto::wire::Hello::Reader hello, Nonce& client_nonce, Nonce& server_nonce);

// The hello reply's fields.
void fill_hello_reply(proto::wire::HelloReply::Builder reply, const Nonce& server_nonce, bool auth_required);

// Whether `mac` proves the peer holds `token` (always true with no token set).
bool authentic(const std::string& token, capnp::Data::Reader mac, const Nonce& server_nonce, const Nonce& client_nonce);

// The reply to a successful authenticate: `authenticated`, the server's proof, where the hello
// asked for it (proveServer), else `ok` (older clients).
void fill_authenticated(proto::wire::Reply::Builder reply, bool prove, const std::string& token, const Nonce& server_nonce,
                        const Nonce& client_nonce);

// The connection to close when every slot is taken: the one still in its handshake that has
// waited longest, or -1 if every one is authenticated. Peers that connect and say nothing then
// cannot keep every client out by holding each slot for the handshake timeout, and an
// authenticated connection is never dropped for a newcomer. `conns`: fd -> connection (with
// `authed` and `opened`), as both servers keep them.
template <typename Conns>
int oldest_unauthenticated(const Conns& conns) {
  int oldest = -1;
  for (const auto& [fd, c] : conns) {
    if (!c->authed && (oldest < 0 || c->opened < conns.at(oldest)->opened)) oldest = fd;
  }
  return oldest;
}

}  // namespace lazymem::net
