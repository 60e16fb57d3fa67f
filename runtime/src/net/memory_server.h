// MemoryServer: the source end of a post-copy migration. Serves one snapshot whose chunk bytes
// are this process's own memory, paused, over the page-server wire protocol (proto/wire.capnp),
// so that the destination restores from it as from a page server:
// LazyRestore::start("lazymem://HOST:PORT/NAME").
//
// One thread, one epoll loop, read-only. A chunk reply is its header and a span of the memory,
// given to sendmsg() together: chunk bytes are never copied, so the memory must stay mapped and
// unchanged while the server runs (the workload's threads parked). Per connection, a bounded
// queue of replies (a peer that does not read gets its requests no longer read, it is not
// buffered for), demand replies ahead of queued prefetch ones. Hostile peers (bad frames, no
// handshake in time, requests out of turn) are closed; the others are served on.
//
// Not here: uploads and removal (refused: the source holds one snapshot), getPage by datagram
// (openDatagrams is refused; page fetchers then ask on their connection), zero-copy sends.
//
// Thread-safety: start(), port(), stats() and wait_drained() from any thread; the destructor
// once, while no other thread is inside wait_drained().
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "lazymem/result.h"
#include "net/resolver.h"

namespace lazymem::net {

struct MemoryServerOptions {
  std::string listen = "0.0.0.0:0";
  // A listener bound already (listen_tcp): taken instead of binding `listen` (a migration binds
  // before it pauses the workload, so that a taken port is found before, not during, the pause).
  std::shared_ptr<Listener> listener;  // HOST:PORT, or [V6]:PORT (port 0: the kernel picks; see port())
  std::string token;                 // shared token (net/auth.h); empty: no authentication asked
  // A connection that has not finished its handshake (hello, and authenticate when a token is
  // set) this long after it was accepted is closed: a peer that says nothing holds no slot.
  std::chrono::milliseconds handshake_timeout{10000};
  size_t max_connections = 64;  // more are closed as they come (counted: connections_refused)
  // wait_drained(): how long no connection must have been open after the last one closed (a
  // restore that lost its connection reconnects and may ask again).
  std::chrono::milliseconds linger{1000};
};

// The stored bytes of chunk `chunk` of region `region`, exactly as the manifest's entry for it
// says (codec raw: the chunk's bytes, chunk_length() of them; other codecs: stored_length bytes
// of that encoding). They must stay mapped and unchanged while the server runs. An empty span:
// that chunk is not served here (requests for it are answered outOfRange, naming it). Called
// by start(), on its caller's thread, once for each chunk of a codec other than zero; never after.
using ChunkBytes = std::function<std::span<const std::byte>(uint32_t region, uint32_t chunk)>;

class MemoryServer {
 public:
  // `manifest_file`: a whole manifest file (header and body, as snapshot/manifest.h encodes it
  // and decode_manifest() reads it), served under `name` (what the destination's URI names).
  // Fails, with nothing started, if the manifest does not decode, a chunk's bytes are not as
  // long as its entry says, or the address cannot be listened on. Starts the serving thread.
  static Result<std::unique_ptr<MemoryServer>> start(std::string name, std::vector<std::byte> manifest_file,
                                                     ChunkBytes chunk_bytes, MemoryServerOptions options);
  // Stops the thread and closes every connection (a restore still reading fails over or fails).
  ~MemoryServer();
  MemoryServer(const MemoryServer&) = delete;
  MemoryServer& operator=(const MemoryServer&) = delete;

  uint16_t port() const;

  struct Stats {
    uint64_t connections = 0;           // accepted
    uint64_t open_connections = 0;
    uint64_t connections_refused = 0;   // over max_connections, or out of descriptors
    uint64_t handshake_timeouts = 0;
    uint64_t requests = 0;              // request frames
    uint64_t chunks_sent = 0;           // chunk and page replies sent whole (each chunk as often as asked)
    uint64_t bytes_sent = 0;            // their chunk bytes
    uint64_t pages_sent = 0;            // of those, replies to getPage (a faulting thread's page)
    uint64_t chunks_to_serve = 0;       // chunks of a codec other than zero whose bytes were given
    uint64_t distinct_chunks_sent = 0;  // of those, how many were sent at least once
    uint64_t errors_protocol = 0;       // malformed frames or requests, requests out of turn
    uint64_t errors_auth = 0;           // wrong token, or requests before authenticating
    uint64_t errors_not_found = 0;      // another snapshot, or another version of this one
    uint64_t errors_range = 0;          // chunks or pages outside the snapshot or not served here
    uint64_t restores_completed = 0;    // destinations that said they hold every page (then drained)
  };
  Stats stats() const;

  // Returns once a peer has read the manifest and then either said it holds every page it needs
  // (a restore whose every page is present says so as it closes: Request.complete), or every
  // chunk this server serves (Stats::chunks_to_serve) has been sent at least once and no
  // connection has been open for `linger` (a destination that hung up without saying so: from
  // before `complete`, or its process gone). Else kTimeout when `timeout` passes, saying how many
  // chunks were never sent and how many connections are open; or the error that stopped the
  // serving thread. `stop`, if given, is asked every 50 ms at most: true ends the wait
  // (kCancelled).
  Status wait_drained(std::chrono::milliseconds timeout, const std::function<bool()>& stop = nullptr);

  // The manifest is refused (notFound) from now on, unless a peer has read it already. True if
  // none had: then no destination can be running what this serves. Thread-safe.
  bool withdraw();

  struct Impl;

 private:
  explicit MemoryServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  std::thread thread_;
};

}  // namespace lazymem::net
