// RemotePageFetcher: one authenticated page-server connection used by a faulting thread to get
// the page it faults on (getPage), from inside its SIGBUS handler.
//
// Built for that context: the request message is laid out once and only its numbers change,
// the reply lands in a fixed buffer, and the decoder (zstd context, dictionary) is made when
// the fetcher is opened. One request is in flight at a time; on the connection, a reply to an
// earlier request of this connection (a datagram's, answered there after the fetcher gave up
// waiting: below) is skipped, and one that is malformed or answers something else breaks the
// connection (the next reopen() starts clean) rather than being guessed at.
//
// Where the server offers datagrams (wire.capnp, DatagramSession) the request goes by UDP first:
// no stream to wait behind and, here, ~4 us less per round trip than TCP. A reply that does not
// come within a few round trips of the connection's (2 to 20 ms) is asked for again on the
// connection, where replies are reliable; a datagram that does not answer the request just
// sent (late, or forged: ids start at random) is skipped. Three losses in a row and the
// fetcher uses the connection alone for a second, then two, four... up to a minute. What no
// datagram can carry (a frame over the path MTU, a zero or raw page's whole chunk, a chunk the
// server is still reading) the server sends on the connection, announced by an onStream
// datagram (replyOnStream): the fetcher then reads its connection, with nothing to ask.
#pragma once

#include <capnp/message.h>

#include <array>
#include <memory>
#include <string>
#include <vector>

#include "lazymem/snapshot.h"
#include "snapshot/chunk_codec.h"
#include "snapshot/chunk_source.h"
#include "sys/unique_fd.h"

namespace lazymem::net {

class RemotePageFetcher final : public snapshot::PageFetcher {
 public:
  // `manifest` and `dict` must outlive the fetcher (the source owns them).
  static Result<std::unique_ptr<RemotePageFetcher>> open(const SnapshotLocation& loc, std::string token,
                                                         const Manifest& manifest,
                                                         std::shared_ptr<const snapshot::DecodeDictionary> dict,
                                                         std::chrono::milliseconds timeout);

  Outcome fetch(snapshot::ChunkRef ref, uint32_t page, std::span<std::byte> out, int64_t deadline_ns) noexcept override;
  size_t received() const noexcept override { return received_; }
  Datagrams datagrams() const noexcept override { return datagrams_; }
  const char* failure() const noexcept override { return failure_; }
  size_t servers() const noexcept override { return 1 + loc_.more_servers.size(); }
  size_t server() const noexcept override { return server_; }
  Status reopen(std::chrono::milliseconds timeout) override;

 private:
  RemotePageFetcher(const SnapshotLocation& loc, std::string token, const Manifest& manifest,
                    std::shared_ptr<const snapshot::DecodeDictionary> dict);
  Outcome broken(const char* why) noexcept;
  Outcome bad(const char* why) noexcept;
  Outcome refused(const char* why) noexcept;
  bool send_request(int64_t deadline_ns) noexcept;
  // Receives one whole frame (and nothing of the next) into in_; returns its header and payload
  // lengths.
  bool receive(uint32_t& header_len, uint32_t& payload_len, int64_t deadline_ns) noexcept;
  // Whether a reply starts on the connection by until_ns (spinning first, as receive() does).
  bool reply_starts(int64_t until_ns) noexcept;
  // Reads exactly n bytes of the connection: non-blocking until spin_until, then blocking.
  bool read_exactly(std::byte* to, size_t n, int64_t spin_until, int64_t deadline_ns) noexcept;
  Outcome use_reply(snapshot::ChunkRef ref, uint32_t page, std::span<std::byte> out, uint32_t header_len,
                    uint32_t payload_len) noexcept;
  enum class ByDatagram {
    kDone,    // answered: `done` says how it went
    kAsk,     // to be asked on the connection (no reply in time, or the server says useStream)
    kComing,  // the server sends the reply on the connection (onStream)
  };
  ByDatagram fetch_by_datagram(snapshot::ChunkRef ref, uint32_t page, std::span<std::byte> out, int64_t deadline_ns,
                               Outcome& done) noexcept;
  // Asks the fresh connection for a datagram session; without one (an older server, or one
  // without datagrams) the fetcher uses the connection alone.
  Status open_datagrams(std::chrono::steady_clock::time_point deadline);

  SnapshotLocation loc_;
  std::string token_;
  const Manifest& manifest_;
  std::shared_ptr<const snapshot::DecodeDictionary> dict_;
  sys::UniqueFd fd_;
  uint64_t next_id_ = 1;  // from a random start (open()): a forged datagram reply must guess it
  uint64_t connection_first_id_ = 0;  // the first getPage id on this connection
  const char* failure_ = "";
  size_t received_ = 0;
  Datagrams datagrams_;  // the last fetch's

  // The request, built once: fetch() sets its numbers in place and sends the segment as is.
  std::array<capnp::word, 64> request_words_{};
  std::unique_ptr<capnp::MallocMessageBuilder> request_;
  std::array<std::byte, 16> request_prefix_{};  // frame prefix + the one-segment table
  kj::byte* session_ = nullptr;                 // the request's session bytes, set per connection

  sys::UniqueFd udp_;                // connected to the server's UDP port; invalid: no datagrams
  uint32_t datagram_max_payload_ = 0;
  int64_t datagram_wait_ns_ = 0;     // how long a datagram reply is waited for
  int64_t datagrams_off_until_ns_ = 0;
  int64_t datagrams_off_ns_ = 0;     // the next pause after losses in a row (doubles, up to a minute)
  unsigned lost_in_row_ = 0;
  size_t server_ = 0;      // the server the connection reached (its index in loc_.servers())
  size_t next_first_ = 0;  // where the next (re)open starts: after the server last reached

  kj::Array<capnp::word> in_;  // a whole reply frame, word-aligned (kj::Array: clang rejects std::vector<word>)
  std::vector<std::byte> chunk_;                // a whole chunk decoded (v1 replies)
  snapshot::ChunkDecoder decoder_;
};

}  // namespace lazymem::net
