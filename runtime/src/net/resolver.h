// Page servers' names to addresses: at once where the caller may wait, in the background where
// it may not. And what a listener's failed bind() says of its address.
//
// getaddrinfo() waits as long as DNS takes: seconds per resolver listed in resolv.conf when one
// is down, 30 s and more in all. The fault engine's thread dials page servers (a reader's first
// connection, every reconnect) while it serves the faults of every other session of the host;
// a name looked up there would hold all of them up meanwhile. A Lookup runs getaddrinfo() on a
// thread of its own and says it is done through a descriptor the asking thread polls.
//
// Thread-safety: resolve() from any thread. A Lookup from any number of threads: done(), fd() and
// (once done) result() only read.
#pragma once

#include <sys/socket.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "lazymem/result.h"
#include "sys/unique_fd.h"

namespace lazymem::net {

struct SocketAddress {
  sockaddr_storage addr{};
  socklen_t len = 0;
};

// HOST:PORT to addresses, on the calling thread (numeric addresses never wait; names may).
Result<std::vector<SocketAddress>> resolve(const std::string& host, uint16_t port);

// A listener's bind() to `hostport` (given by `flag`, e.g. "--listen") failed with `err`: what
// that errno means of the address, and what to do (another port; an address of this machine; a
// port from 1024).
Error bind_error(const std::string& flag, const std::string& hostport, int err);

// A listening TCP socket (non-blocking, close-on-exec, SO_REUSEADDR) on `hostport`, "HOST:PORT"
// or "[V6]:PORT" with numeric port (0: the kernel picks one; `port` is what it is), named
// `flag` in errors as bind_error() does. The host is looked up on the calling thread.
struct Listener {
  sys::UniqueFd fd;
  uint16_t port = 0;
};
Result<Listener> listen_tcp(const std::string& flag, const std::string& hostport, int backlog);

class Lookup {
 public:
  // A numeric address is parsed here and the Lookup is done at once; a name is looked up on a
  // thread. One lookup of a name runs at a time in the process and every caller asking for it
  // meanwhile shares it: a DNS outage costs a thread per name, not one per reconnect of every
  // session. Its answer is not kept beyond the lookup (the next asks again: a name moved to a
  // standby server is followed).
  static std::shared_ptr<Lookup> start(const std::string& host, uint16_t port);

  bool done() const { return done_.load(std::memory_order_acquire); }
  // Readable once done() (level-triggered: stays readable). -1 for a Lookup done at once.
  int fd() const { return ready_.get(); }
  // Only once done().
  const Result<std::vector<SocketAddress>>& result() const { return *result_; }

  Lookup(const Lookup&) = delete;
  Lookup& operator=(const Lookup&) = delete;
  struct Key {  // only start() makes one (make_shared needs a public constructor)
   private:
    Key() = default;
    friend class Lookup;
  };
  explicit Lookup(Key) {}

 private:
  void finish(Result<std::vector<SocketAddress>> r);

  sys::UniqueFd ready_;  // an eventfd
  std::optional<Result<std::vector<SocketAddress>>> result_;
  std::atomic<bool> done_{false};
};

}  // namespace lazymem::net
