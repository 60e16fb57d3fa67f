// Shared-token authentication: the token never crosses the wire. The server sends a random
// nonce, the client answers HMAC-SHA256(token, server nonce || client nonce), the server
// compares in constant time and, asked to, proves it holds the token as well (server_proof).
#pragma once

#include <fcntl.h>

#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "lazymem/result.h"

namespace lazymem::net {

using Nonce = std::array<std::byte, 32>;
using Mac = std::array<std::byte, 32>;

Nonce random_nonce();
Mac auth_mac(const std::string& token, std::span<const std::byte> server_nonce, std::span<const std::byte> client_nonce);
// The server's answer: HMAC-SHA256(token, "lazymem server" || server nonce || client nonce). The
// label keeps it from being the client's MAC of some other pair of nonces.
Mac server_proof(const std::string& token, std::span<const std::byte> server_nonce, std::span<const std::byte> client_nonce);
bool mac_equal(std::span<const std::byte> a, std::span<const std::byte> b);

// A token file is a regular file of at most this many bytes, holding a token of at least this
// many characters (surrounding white space ignored).
constexpr size_t kMaxTokenFileBytes = 4096;
constexpr size_t kMinTokenChars = 16;

// How a token file is opened (by read_token_file; by the agent, as the user it reads for):
// non-blocking, so that a FIFO given by mistake is refused instead of waited on.
constexpr int kTokenFileFlags = O_RDONLY | O_CLOEXEC | O_NONBLOCK;

// Reads a token file; refuses anything else (a FIFO, a device, a directory, a huge file) and a
// token too short to resist guessing, saying how to make one.
Result<std::string> read_token_file(const std::string& path);
// The same, of a token file open already (read from where its offset is); `path` names it in
// messages.
Result<std::string> read_token_fd(int fd, const std::string& path);

}  // namespace lazymem::net
