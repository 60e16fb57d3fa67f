// MetricsEndpoint: Prometheus text over HTTP/1.0, non-blocking, from the owner's event loop.
#include "net/metrics_endpoint.h"

#include <fmt/format.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <vector>

#include "lazymem/snapshot.h"
#include "net/resolver.h"

namespace lazymem::net {
namespace {

constexpr size_t kMaxScrapes = 16;
constexpr size_t kMaxRequest = 16 << 10;  // a GET and its headers
constexpr auto kScrapeLimit = std::chrono::seconds(10);

}  // namespace

Result<std::unique_ptr<MetricsEndpoint>> MetricsEndpoint::listen(const std::string& hostport) {
  LAZYMEM_ASSIGN_OR_RETURN(Listener l, listen_tcp("--metrics", hostport, 16));
  std::unique_ptr<MetricsEndpoint> m(new MetricsEndpoint());
  m->listen_ = std::move(l.fd);
  m->port_ = l.port;
  m->epoll_.reset(::epoll_create1(EPOLL_CLOEXEC));
  if (!m->epoll_.valid()) return sys_error("epoll_create1", errno);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = m->listen_.get();
  if (::epoll_ctl(m->epoll_.get(), EPOLL_CTL_ADD, m->listen_.get(), &ev) != 0) return sys_error("epoll_ctl", errno);
  return m;
}

void MetricsEndpoint::serve(const std::function<std::string()>& text) {
  const auto now = std::chrono::steady_clock::now();
  std::vector<int> stale;
  for (const auto& [fd, s] : scrapes_) {
    if (now - s.opened > kScrapeLimit) stale.push_back(fd);
  }
  for (int fd : stale) drop(fd);
  epoll_event events[kMaxScrapes + 1];
  const int n = ::epoll_wait(epoll_.get(), events, static_cast<int>(std::size(events)), 0);
  for (int i = 0; i < n; ++i) {
    const int fd = events[i].data.fd;
    if (fd == listen_.get()) {
      accept_all();
      continue;
    }
    auto it = scrapes_.find(fd);
    if (it != scrapes_.end() && !step(it->second, text)) drop(fd);
  }
}

void MetricsEndpoint::accept_all() {
  const auto now = std::chrono::steady_clock::now();
  for (;;) {
    auto next = acceptor_.accept(listen_.get());
    if (next.shed) continue;
    if (!next.fd.valid()) return;
    sys::UniqueFd fd = std::move(next.fd);
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = fd.get();
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd.get(), &ev) != 0) continue;
    if (scrapes_.size() >= kMaxScrapes) {
      // Room is made: a peer that says nothing locks nobody out. The oldest that has not asked
      // goes first (one being answered is left to finish).
      auto victim = scrapes_.end();
      for (auto it = scrapes_.begin(); it != scrapes_.end(); ++it) {
        const bool better = victim == scrapes_.end() || (it->second.out.empty() && !victim->second.out.empty()) ||
                            (it->second.out.empty() == victim->second.out.empty() && it->second.opened < victim->second.opened);
        if (better) victim = it;
      }
      drop(victim->first);
    }
    const int key = fd.get();
    scrapes_[key] = Scrape{std::move(fd), {}, {}, 0, now};
  }
}

void MetricsEndpoint::drop(int fd) {
  ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, fd, nullptr);
  scrapes_.erase(fd);
}

bool MetricsEndpoint::step(Scrape& s, const std::function<std::string()>& text) {
  if (s.out.empty()) {
    // Any request gets the metrics (this port answers one thing), once it is read to its end:
    // closing with a request partly unread would reset the connection, and lose the reply.
    char buf[4096];
    const ssize_t n = ::recv(s.fd.get(), buf, sizeof buf, MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return true;
    if (n <= 0) return false;
    s.in.append(buf, static_cast<size_t>(n));
    if (s.in.size() > kMaxRequest) return false;
    if (s.in.find("\r\n\r\n") == std::string::npos) return true;
    const std::string body = text();
    s.out = fmt::format("HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n"
                        "Connection: close\r\n\r\n{}",
                        body.size(), body);
    epoll_event ev{};
    ev.events = EPOLLOUT;
    ev.data.fd = s.fd.get();
    ::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, s.fd.get(), &ev);
  }
  while (s.sent < s.out.size()) {
    const ssize_t n = ::send(s.fd.get(), s.out.data() + s.sent, s.out.size() - s.sent, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return true;  // EPOLLOUT brings us back
    if (n <= 0) return false;
    s.sent += static_cast<size_t>(n);
  }
  return false;
}

void MetricsText::family(std::string_view name, std::string_view type, std::string_view help) {
  out_ += fmt::format("# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
}

void MetricsText::sample(std::string_view name, std::string_view labels, double value) {
  if (labels.empty()) {
    out_ += fmt::format("{} {:.6f}\n", name, value);
  } else {
    out_ += fmt::format("{}{{{}}} {:.6f}\n", name, labels, value);
  }
}

void MetricsText::sample(std::string_view name, std::string_view labels, uint64_t value) {
  if (labels.empty()) {
    out_ += fmt::format("{} {}\n", name, value);
  } else {
    out_ += fmt::format("{}{{{}}} {}\n", name, labels, value);
  }
}

}  // namespace lazymem::net
