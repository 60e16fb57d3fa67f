// Shared-token challenge-response with HMAC-SHA256 (OpenSSL).
#include "net/auth.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace lazymem::net {

Nonce random_nonce() {
  Nonce n;
  if (RAND_bytes(reinterpret_cast<unsigned char*>(n.data()), static_cast<int>(n.size())) != 1) {
    throw std::runtime_error("no randomness for an authentication nonce (OpenSSL RAND_bytes failed)");
  }
  return n;
}

Mac auth_mac(const std::string& token, std::span<const std::byte> server_nonce, std::span<const std::byte> client_nonce) {
  std::vector<unsigned char> msg(server_nonce.size() + client_nonce.size());
  std::memcpy(msg.data(), server_nonce.data(), server_nonce.size());
  std::memcpy(msg.data() + server_nonce.size(), client_nonce.data(), client_nonce.size());
  Mac out{};
  unsigned len = 0;
  HMAC(EVP_sha256(), token.data(), static_cast<int>(token.size()), msg.data(), msg.size(),
       reinterpret_cast<unsigned char*>(out.data()), &len);
  return out;
}

bool mac_equal(std::span<const std::byte> a, std::span<const std::byte> b) {
  return a.size() == b.size() && CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

Result<std::string> read_token_file(const std::string& path) {
  std::ifstream f(path);
  if (!f) return Error(Errc::kNotFound, "token file " + path + " cannot be read");
  std::stringstream ss;
  ss << f.rdbuf();
  std::string t = ss.str();
  while (!t.empty() && std::isspace(static_cast<unsigned char>(t.back()))) t.pop_back();
  size_t b = 0;
  while (b < t.size() && std::isspace(static_cast<unsigned char>(t[b]))) ++b;
  t = t.substr(b);
  if (t.empty()) return Error(Errc::kInvalidArgument, "token file " + path + " is empty; put a secret in it");
  return t;
}

}  // namespace lazymem::net
