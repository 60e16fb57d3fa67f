#include "net/server_handshake.h"

#include <fmt/format.h>

#include <cstring>

namespace lazymem::net {
namespace wire = proto::wire;

std::optional<HandshakeRefusal> accept_hello(wire::Hello::Reader hello, Nonce& client_nonce, Nonce& server_nonce) {
  if (hello.getVersion() != wire::PROTOCOL_VERSION) {
    return HandshakeRefusal{wire::ErrorCode::UNSUPPORTED_VERSION,
                            fmt::format("protocol version {} is not supported (server speaks {}): use a lazymem of "
                                        "the same protocol version",
                                        hello.getVersion(), wire::PROTOCOL_VERSION)};
  }
  auto cn = hello.getClientNonce();
  if (cn.size() != client_nonce.size()) return HandshakeRefusal{wire::ErrorCode::BAD_REQUEST, "client nonce must be 32 bytes"};
  std::memcpy(client_nonce.data(), cn.begin(), cn.size());
  server_nonce = random_nonce();
  return std::nullopt;
}

void fill_hello_reply(wire::HelloReply::Builder reply, const Nonce& server_nonce, bool auth_required) {
  reply.setVersion(wire::PROTOCOL_VERSION);
  reply.setServerNonce(capnp::Data::Reader(reinterpret_cast<const kj::byte*>(server_nonce.data()), server_nonce.size()));
  reply.setAuthRequired(auth_required);
  reply.setTakesComplete(true);  // both servers read Request.complete
}

bool authentic(const std::string& token, capnp::Data::Reader mac, const Nonce& server_nonce, const Nonce& client_nonce) {
  return token.empty() || mac_equal(std::span(reinterpret_cast<const std::byte*>(mac.begin()), mac.size()),
                                    auth_mac(token, server_nonce, client_nonce));
}

void fill_authenticated(wire::Reply::Builder reply, bool prove, const std::string& token, const Nonce& server_nonce,
                        const Nonce& client_nonce) {
  if (!prove) return reply.setOk();
  const Mac proof = server_proof(token, server_nonce, client_nonce);
  reply.setAuthenticated(capnp::Data::Reader(reinterpret_cast<const kj::byte*>(proof.data()), proof.size()));
}

}  // namespace lazymem::net
