// PageServer: serves the snapshots of a local store to restoring hosts over TCP.
//
// One thread, one epoll loop, no thread per connection. Per connection: a bounded output queue
// (a slow reader gets backpressure: we stop reading its requests, we do not buffer without
// limit), and two lanes of pending chunk reads, demand before prefetch.
//
// Thread-safety: run() on one thread; stop() and stats() from any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "lazymem/result.h"
#include "sys/unique_fd.h"

namespace lazymem::pageserver {

struct ServerOptions {
  std::string store_dir;
  std::string host = "127.0.0.1";
  uint16_t port = 0;                       // 0: pick one (see port())
  std::string token;                       // empty: no authentication
  // Per connection, before backpressure. Small on purpose: a demand reply queues behind at most
  // this much prefetch data (512 KiB is ~0.2 ms on loopback) and it still covers the window.
  size_t max_queued_bytes = 512 << 10;
  size_t max_connections = 1024;
  std::chrono::milliseconds handshake_timeout{10000};  // a client that says nothing is closed
};

struct ServerStats {
  uint64_t connections = 0;
  uint64_t open_connections = 0;
  uint64_t requests = 0;
  uint64_t chunks = 0;
  uint64_t bytes = 0;
  uint64_t errors_protocol = 0;
  uint64_t errors_auth = 0;
  uint64_t errors_not_found = 0;
  uint64_t errors_range = 0;
  uint64_t errors_io = 0;
  uint64_t handshake_timeouts = 0;
  uint64_t uploads = 0;
};

class PageServer {
 public:
  static Result<std::unique_ptr<PageServer>> listen(const ServerOptions& options);
  ~PageServer();

  uint16_t port() const { return port_; }
  // Serves until stop().
  Status run();
  void stop();
  ServerStats stats() const;

  struct Impl;

 private:
  PageServer() = default;
  std::unique_ptr<Impl> impl_;
  uint16_t port_ = 0;
};

}  // namespace lazymem::pageserver
