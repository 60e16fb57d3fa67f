// MetricsEndpoint: Prometheus text exposition over HTTP on a TCP port, served from the event
// loop of the daemon that owns it (lazymem-agent, lazymem-pageserver): it keeps an epoll set of
// its own, so the loop watches one descriptor, fd(), and calls serve() when it is readable.
// Any request gets the metrics (the port serves nothing else). Scrapers are few: at most 16 at
// once (a new one closes the oldest), and one not done within 10 s is dropped, so peers that
// connect and say nothing cannot lock scrapers out.
//
// MetricsText builds the exposition: one family at a time, its samples after it.
//
// Thread-safety: one thread (the loop's).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>

#include "lazymem/result.h"
#include "sys/acceptor.h"
#include "sys/unique_fd.h"

namespace lazymem::net {

class MetricsEndpoint {
 public:
  // `hostport`: "HOST:PORT" ("[v6]:PORT"; port 0 picks one, see port()).
  static Result<std::unique_ptr<MetricsEndpoint>> listen(const std::string& hostport);

  int fd() const { return epoll_.get(); }
  uint16_t port() const { return port_; }
  // Accepts scrapers, reads their requests and sends replies as far as the sockets allow
  // without blocking; `text` makes the exposition, once per scrape.
  void serve(const std::function<std::string()>& text);

 private:
  struct Scrape {
    sys::UniqueFd fd;
    std::string in;   // the request so far
    std::string out;  // the whole reply, once the request came
    size_t sent = 0;
    std::chrono::steady_clock::time_point opened;
  };
  MetricsEndpoint() = default;
  void accept_all();
  void drop(int fd);
  // False when the scrape is over (answered, or the peer went away).
  bool step(Scrape& s, const std::function<std::string()>& text);

  sys::UniqueFd listen_, epoll_;
  sys::Acceptor acceptor_;
  uint16_t port_ = 0;
  std::map<int, Scrape> scrapes_;
};

class MetricsText {
 public:
  // "# HELP" and "# TYPE" of a family (type: counter, gauge, summary).
  void family(std::string_view name, std::string_view type, std::string_view help);
  // One sample: `labels` without braces ("a=\"x\",b=\"y\""; empty: none).
  void sample(std::string_view name, std::string_view labels, double value);
  void sample(std::string_view name, std::string_view labels, uint64_t value);
  std::string take() { return std::move(out_); }

 private:
  std::string out_;
};

}  // namespace lazymem::net
