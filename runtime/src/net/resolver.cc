// Page servers' names to addresses (see resolver.h).
#include "net/resolver.h"

#include <fmt/format.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>

#include "lazymem/snapshot.h"
#include "sys/syscall_result.h"

namespace lazymem::net {
namespace {

Result<std::vector<SocketAddress>> getaddrinfo_(const std::string& host, uint16_t port, int flags) {
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = flags | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  int g = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res);
  if (g != 0) {
    const char* why = g == EAI_SYSTEM ? std::strerror(errno) : ::gai_strerror(g);
    return Error(g == EAI_AGAIN ? Errc::kAgain : Errc::kNotFound, fmt::format("page server {}: {}", host, why));
  }
  std::vector<SocketAddress> out;
  for (addrinfo* a = res; a != nullptr; a = a->ai_next) {
    SocketAddress s;
    std::memcpy(&s.addr, a->ai_addr, a->ai_addrlen);
    s.len = a->ai_addrlen;
    out.push_back(s);
  }
  ::freeaddrinfo(res);
  if (out.empty()) return Error(Errc::kNotFound, fmt::format("page server {}:{}: no address", host, port));
  return out;
}

bool is_numeric(const std::string& host) {
  addrinfo hints{};
  hints.ai_flags = AI_NUMERICHOST;
  addrinfo* res = nullptr;
  if (::getaddrinfo(host.c_str(), nullptr, &hints, &res) != 0) return false;
  ::freeaddrinfo(res);
  return true;
}

// Lookups under way, by HOST:PORT; an entry goes when its lookup is done. Never destroyed: a
// lookup's thread may outlive main(). A forked child gets a table of its own (the parent's
// threads are not in it: a lookup under way there would never finish here).
struct Running {
  std::mutex mu;
  std::map<std::string, std::shared_ptr<Lookup>> by_name;
};
// No lock is taken around a fork: the child never touches the parent's table (its lookups may be
// mid-change, its mutex held), and a prepare handler holding it could wait on a thread that
// waits on a lookup (ThreadFaults' own handler finishes a restore before a fork).
Running* table = nullptr;
Running& running() {
  static std::once_flag once;
  std::call_once(once, [] {
    table = new Running();
    ::pthread_atfork(nullptr, nullptr, [] { table = new Running(); });
  });
  return *table;
}
// Made, and the fork handler registered, before main(): a fork racing the first lookup would
// otherwise run no handler of ours and leave the child the parent's table.
[[maybe_unused]] const bool kTableMade = (running(), true);

}  // namespace

Result<std::vector<SocketAddress>> resolve(const std::string& host, uint16_t port) {
  return getaddrinfo_(host, port, 0);
}

Error bind_error(const std::string& flag, const std::string& hostport, int err) {
  std::string hint;
  if (err == EADDRINUSE) {
    hint = fmt::format(" (something else listens on that port: pick another {} port)", flag);
  } else if (err == EADDRNOTAVAIL) {
    hint = fmt::format(" (that address is not one of this machine's: give {} one of its own, or 0.0.0.0 for all)", flag);
  } else if (err == EACCES) {
    hint = fmt::format(" (ports below 1024 are privileged: give {} a port from 1024, or run with CAP_NET_BIND_SERVICE)", flag);
  }
  Error e = sys_error(fmt::format("bind {} {}", flag, hostport), err);
  return Error(e.code(), e.message() + hint, err);
}

Result<Listener> listen_tcp(const std::string& flag, const std::string& hostport, int backlog) {
  auto where = SnapshotLocation::Server::parse(hostport, true);
  if (!where.ok()) return Error(Errc::kInvalidArgument, flag + ": " + where.error().message());
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* ai = nullptr;
  const int rc = ::getaddrinfo(where->host.c_str(), std::to_string(where->port).c_str(), &hints, &ai);
  if (rc != 0) return Error(Errc::kInvalidArgument, fmt::format("{} {}: {}", flag, hostport, ::gai_strerror(rc)));
  std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> hold(ai, ::freeaddrinfo);
  Listener l;
  l.fd.reset(::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!l.fd.valid()) return sys_error(fmt::format("socket for {} {}", flag, hostport), errno);
  int one = 1;
  ::setsockopt(l.fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (::bind(l.fd.get(), ai->ai_addr, ai->ai_addrlen) != 0) return bind_error(flag, hostport, errno);
  if (::listen(l.fd.get(), backlog) != 0) return sys_error(fmt::format("listen {} {}", flag, hostport), errno);
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  if (::getsockname(l.fd.get(), reinterpret_cast<sockaddr*>(&ss), &len) != 0) {
    return sys_error(fmt::format("getsockname of {} {}", flag, hostport), errno);
  }
  l.port = ntohs(ss.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port
                                          : reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
  return l;
}

void Lookup::finish(Result<std::vector<SocketAddress>> r) {
  result_.emplace(std::move(r));
  done_.store(true, std::memory_order_release);
  if (ready_.valid()) {
    const uint64_t one = 1;
    (void)!::write(ready_.get(), &one, sizeof one);
  }
}

std::shared_ptr<Lookup> Lookup::start(const std::string& host, uint16_t port) {
  auto l = std::make_shared<Lookup>(Lookup::Key{});
  if (is_numeric(host)) {
    l->finish(getaddrinfo_(host, port, AI_NUMERICHOST));
    return l;
  }
  const std::string key = fmt::format("{}:{}", host, port);
  Running& run = running();
  std::lock_guard lock(run.mu);
  if (auto it = run.by_name.find(key); it != run.by_name.end()) return it->second;  // under way: shared
  l->ready_.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!l->ready_.valid()) {
    l->finish(sys_error(fmt::format("page server {}: eventfd", host), errno));
    return l;
  }
  try {
    std::thread([l, host, port, key, &run] {
      auto r = getaddrinfo_(host, port, 0);
      std::lock_guard lock(run.mu);  // finished and unlisted together: nobody joins a done one
      l->finish(std::move(r));
      auto it = run.by_name.find(key);
      if (it != run.by_name.end() && it->second == l) run.by_name.erase(it);  // (a forked child's table: not there)
    }).detach();  // a stopping process does not wait out a silent DNS server
  } catch (const std::system_error& e) {
    l->finish(Error(Errc::kAgain, fmt::format("page server {}: no thread to look its name up: {}", host, e.what())));
    return l;
  }
  run.by_name[key] = l;
  return l;
}

}  // namespace lazymem::net
