// PageServer: serves the snapshots of a local store to restoring hosts over TCP.
//
// One thread, one epoll loop, no thread per connection. Chunk data is read with O_DIRECT through
// io_uring into the extents of a cache (extent_cache.h) and sent from there, zero-copy where the
// kernel really does it (send_queue.h). Per connection: a bound on the bytes it holds (a slow
// reader gets backpressure: we stop reading its requests, we do not buffer without limit), and
// two lanes of chunk requests, demand before prefetch; demand replies overtake queued prefetch
// replies. A getPage request (one page, for a thread waiting on it) is a demand chunk request
// whose reply may be that page's frame alone, after the server has verified the stored chunk.
// getPage also comes by UDP on the same port, from clients given a session on their
// connection; such a job lives in its connection's demand lane and is answered by datagram.
//
// Off the loop, each on a thread of its own: an upload's commit, a removed snapshot's deletion, and
// the store's listing for `list` (store_listing.h); the loop is told by an eventfd when each is done.
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
  // A connection whose replies wait and which takes none of them for this long is closed: what
  // it holds (extents pinned for its replies, up to max_queued_bytes) goes back to the others.
  // A host that vanished without a reset, or a peer that asks and never reads.
  std::chrono::milliseconds send_stall_timeout{30000};
  // Chunk data kept in memory after it was read (extents of 64 KiB, least recently used go
  // first). A snapshot restored on many hosts is read from disk once.
  size_t cache_bytes = 256 << 20;
  bool zerocopy = true;  // MSG_ZEROCOPY for large sends, until the kernel says it copies anyway
  // Hold a 0 us CPU latency request (sys/cpu_latency.h) within 100 ms of the last request: a
  // demand request that finds the CPU in a deep idle state waits for it to wake up.
  bool cpu_latency_qos = true;
  // getPage by UDP on the same port (wire.capnp, DatagramSession): a faulting thread's page
  // without a stream to wait behind. A server that cannot bind the UDP port serves TCP only.
  bool datagrams = true;
  // After a getPage datagram the loop polls instead of sleeping for this long: a restoring
  // thread's next fault usually follows within a few microseconds of its page, and a server
  // CPU that went to sleep takes longer than that to wake (~3 us here, ~10+ without the CPU
  // latency request). Costs CPU only while faults come. 0: never poll.
  std::chrono::microseconds poll_after_page{100};
  // A version of a snapshot replaced or removed in the store stays readable for restores that
  // read it (they name it when they connect): while one of their connections lives, and this
  // long after it left the store and after the last of them closed (a restore reconnecting, or
  // one that read the manifest and has not connected yet). Its disk space is held meanwhile.
  std::chrono::seconds keep_replaced{60};
  // HOST:PORT (port 0: pick one, see metrics_port()): the stats below in Prometheus text format,
  // over HTTP, from the serving loop (a scrape costs it tens of microseconds). Empty: none.
  std::string metrics;
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
  uint64_t disk_read_bytes = 0;  // O_DIRECT reads into the cache
  uint64_t cache_hits = 0, cache_misses = 0;  // extents found / read
  uint64_t zerocopy_sends = 0, zerocopy_bytes = 0;
  uint64_t zerocopy_copied_sends = 0;  // the kernel copied after all (loopback)
  uint64_t zerocopy_fallbacks = 0;     // connections switched to plain sends because of that
  uint64_t plain_sends = 0, plain_bytes = 0;
  uint64_t pages = 0;           // getPage replies sent as one page frame (others count as chunks)
  uint64_t errors_corrupt = 0;  // stored chunks that failed their checksum here (getPage)
  uint64_t datagram_requests = 0;  // getPage datagrams from live sessions
  uint64_t datagrams_dropped = 0;  // malformed, no live session, or not from the session's peer
  uint64_t datagrams_unsent = 0;   // replies the UDP socket refused (the client asks again)
  uint64_t connections_stalled = 0;  // closed after send_stall_timeout without taking a reply
  uint64_t restores_completed = 0;   // restores that said they hold every page (Request.complete)
  uint64_t connections_refused = 0;  // over max_connections, or no descriptor left
  uint64_t datagrams_over_mtu = 0;   // page frames over the path MTU: sent on the connection, or told to ask there
  uint64_t datagrams_on_stream = 0;  // datagram requests answered on their session's connection
  uint64_t snapshots_retired = 0;    // versions replaced or removed in the store, still held for restores reading them
  uint64_t snapshots_retired_bytes = 0;  // their stored bytes (disk space not freed yet)
  // `list` is answered from listings of the store made on a thread of their own; requests that
  // come while one is under way share the next. A listing reads only new or changed manifests.
  uint64_t listings = 0;
  uint64_t listing_manifest_reads = 0;
};

class PageServer {
 public:
  static Result<std::unique_ptr<PageServer>> listen(const ServerOptions& options);
  ~PageServer();

  uint16_t port() const { return port_; }
  uint16_t metrics_port() const;  // 0 without ServerOptions::metrics
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
