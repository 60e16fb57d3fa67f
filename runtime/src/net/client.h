// Page-server client: connection set-up (hello + challenge-response), blocking calls for the
// control messages, and a non-blocking ChunkReader for the fault engine.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "lazymem/result.h"
#include "lazymem/snapshot.h"
#include "net/frame.h"
#include "net/remote.h"
#include "snapshot/chunk_source.h"
#include "snapshot/store.h"
#include "sys/unique_fd.h"
#include "wire.capnp.h"

namespace lazymem::net {

using Deadline = std::chrono::steady_clock::time_point;

// Connects to HOST:PORT (TCP_NODELAY) within the deadline.
Result<sys::UniqueFd> dial(const std::string& host, uint16_t port, Deadline deadline);

// Sends one frame (header + payload) completely, waiting for the socket as needed.
Status send_frame(int fd, capnp::MessageBuilder& header, std::span<const std::byte> payload, Deadline deadline);

// A received frame that owns its bytes.
struct OwnedFrame {
  std::unique_ptr<Header> header;
  std::vector<std::byte> payload;
};
Result<OwnedFrame> recv_frame(int fd, FrameBuffer& buf, Deadline deadline);

// Dials and authenticates: a connection ready for requests. `reads`, `first_server`: see
// Dialer::start. `connected` (if given) is set to the index in loc.servers() of the server it
// reached.
Result<sys::UniqueFd> open_connection(const SnapshotLocation& loc, const std::string& token, Deadline deadline,
                                      uint64_t reads = 0, size_t first_server = 0, size_t* connected = nullptr);

// "page server <location>": who a malformed reply came from (Header::read).
std::string peer(const SnapshotLocation& loc);
// Turns an error reply into an Error naming the server.
Error reply_error(const SnapshotLocation& loc, proto::wire::ErrorReply::Reader e);

// Whether a refusal is this server's alone, so that another of a location's servers may serve
// the request: it does not hold the version (reached after a reconnect, it never opened it), its
// disk fails or holds its copy damaged, it is busy. Such a request is passed over to the next server.
inline bool another_server_may_serve(proto::wire::ErrorCode code) {
  return code == proto::wire::ErrorCode::NOT_FOUND || code == proto::wire::ErrorCode::IO_ERROR ||
         code == proto::wire::ErrorCode::CORRUPT || code == proto::wire::ErrorCode::BUSY;
}

// The snapshots a page server holds.
Result<std::vector<snapshot::SnapshotSummary>> list_remote(const SnapshotLocation& server, const std::string& token,
                                                           Deadline deadline);

// Removes snapshot `loc` (its name) from the page server's store. Restores still reading it
// go on with it (the server keeps the version they read until they are done).
Status remove_remote(const SnapshotLocation& loc, const std::string& token, Deadline deadline);
// Counters of a running server.
Result<std::string> server_stats_json(const SnapshotLocation& server, const std::string& token, Deadline deadline);

// Uploads a snapshot: the server stores it atomically, so an interrupted upload leaves nothing.
Result<std::unique_ptr<snapshot::SnapshotSink>> open_upload(const SnapshotLocation& loc, const std::string& token,
                                                            bool replace, std::chrono::milliseconds timeout);

class RemoteSource final : public snapshot::ChunkSource {
 public:
  static Result<std::unique_ptr<RemoteSource>> open(const SnapshotLocation& loc, const RemoteOptions& options);
  const Manifest& manifest() const override { return manifest_; }
  Result<std::unique_ptr<snapshot::ChunkReader>> open_reader() override;
  std::string describe() const override { return loc_.to_string(); }
  Result<std::unique_ptr<snapshot::PageFetcher>> open_page_fetcher() override;

 private:
  SnapshotLocation loc_;
  RemoteOptions options_;
  std::string token_;
  Manifest manifest_;
};

}  // namespace lazymem::net
