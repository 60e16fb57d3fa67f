// Shared-token challenge-response with HMAC-SHA256 (OpenSSL).
#include "net/auth.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <string_view>
#include <stdexcept>

#include "sys/syscall_result.h"
#include "sys/unique_fd.h"

namespace lazymem::net {

Nonce random_nonce() {
  Nonce n;
  if (RAND_bytes(reinterpret_cast<unsigned char*>(n.data()), static_cast<int>(n.size())) != 1) {
    throw std::runtime_error("no randomness for an authentication nonce (OpenSSL RAND_bytes failed)");
  }
  return n;
}

namespace {

Mac hmac(const std::string& token, std::string_view label, std::span<const std::byte> server_nonce,
         std::span<const std::byte> client_nonce) {
  std::vector<unsigned char> msg(label.size() + server_nonce.size() + client_nonce.size());
  std::memcpy(msg.data(), label.data(), label.size());
  std::memcpy(msg.data() + label.size(), server_nonce.data(), server_nonce.size());
  std::memcpy(msg.data() + label.size() + server_nonce.size(), client_nonce.data(), client_nonce.size());
  Mac out{};
  unsigned len = 0;
  HMAC(EVP_sha256(), token.data(), static_cast<int>(token.size()), msg.data(), msg.size(),
       reinterpret_cast<unsigned char*>(out.data()), &len);
  return out;
}

}  // namespace

Mac auth_mac(const std::string& token, std::span<const std::byte> server_nonce, std::span<const std::byte> client_nonce) {
  return hmac(token, "", server_nonce, client_nonce);
}

Mac server_proof(const std::string& token, std::span<const std::byte> server_nonce, std::span<const std::byte> client_nonce) {
  return hmac(token, "lazymem server", server_nonce, client_nonce);
}

bool mac_equal(std::span<const std::byte> a, std::span<const std::byte> b) {
  return a.size() == b.size() && CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

Result<std::string> read_token_file(const std::string& path) {
  sys::UniqueFd fd(::open(path.c_str(), kTokenFileFlags));
  if (!fd.valid()) return sys_error("token file " + path + " cannot be read", errno);
  return read_token_fd(fd.get(), path);
}

Result<std::string> read_token_fd(int fd, const std::string& path) {
  struct stat st{};
  if (::fstat(fd, &st) != 0) return sys_error("token file " + path, errno);
  if (!S_ISREG(st.st_mode)) return Error(Errc::kInvalidArgument, "token file " + path + " is not a regular file");
  if (st.st_size > static_cast<off_t>(kMaxTokenFileBytes)) {
    return Error(Errc::kInvalidArgument, fmt::format("token file {} is {} bytes; a token file holds at most {}", path,
                                                     st.st_size, kMaxTokenFileBytes));
  }
  std::string t(static_cast<size_t>(st.st_size), '\0');
  size_t done = 0;
  while (done < t.size()) {
    auto r = sys::call([&] { return ::read(fd, t.data() + done, t.size() - done); });
    if (!r.ok()) return r.error("read token file " + path);
    if (r.value == 0) break;
    done += static_cast<size_t>(r.value);
  }
  t.resize(done);
  while (!t.empty() && std::isspace(static_cast<unsigned char>(t.back()))) t.pop_back();
  size_t b = 0;
  while (b < t.size() && std::isspace(static_cast<unsigned char>(t[b]))) ++b;
  t = t.substr(b);
  // The challenge-response shows a listener one HMAC of known nonces: a short token is then
  // guessed offline.
  if (t.size() < kMinTokenChars) {
    return Error(Errc::kInvalidArgument,
                 fmt::format("token file {} holds {} characters; a token needs at least {} (make one with: head -c 32 "
                             "/dev/urandom | base64 > {})", path, t.size(), kMinTokenChars, path));
  }
  return t;
}

}  // namespace lazymem::net
