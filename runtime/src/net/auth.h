// Shared-token authentication: the token never crosses the wire. The server sends a random
// nonce, the client answers HMAC-SHA256(token, server nonce || client nonce), the server
// compares in constant time.
#pragma once

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
bool mac_equal(std::span<const std::byte> a, std::span<const std::byte> b);

// Reads a token file (one line; surrounding white space ignored). Refuses an empty token.
Result<std::string> read_token_file(const std::string& path);

}  // namespace lazymem::net
