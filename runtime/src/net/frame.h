// Wire frames: u32 header length | u32 payload length | Cap'n Proto header | raw payload.
//
// FrameBuffer accumulates bytes from a socket and yields whole frames, refusing lengths over
// the limits before buffering them (a hostile peer cannot make us allocate much).
#pragma once

#include <capnp/message.h>
#include <capnp/serialize.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

#include "lazymem/result.h"

namespace lazymem::net {

constexpr size_t kFramePrefix = 8;
constexpr uint32_t kMaxHeader = 64 * 1024;
constexpr uint32_t kMaxPayload = 16 * 1024 * 1024;

// Prefix + header bytes of a frame whose payload (payload_len bytes) is sent after it.
std::vector<std::byte> encode_frame(capnp::MessageBuilder& header, uint32_t payload_len);

// A parsed header. The reader is valid as long as this object lives.
class Header {
 public:
  static Result<std::unique_ptr<Header>> parse(std::span<const std::byte> bytes);
  template <typename T>
  typename T::Reader root() {
    return reader_->getRoot<T>();
  }
  // Runs `fields` (which reads this message and returns a Result or a Status). Cap'n Proto's
  // getters throw on what parse() cannot see without reading every field (a pointer out of
  // bounds, a list where a struct belongs, text without its NUL): a malformed message from
  // `peer` becomes one protocol error here, never an exception through the caller's loop.
  template <typename F>
  auto read(std::string_view peer, F&& fields) -> decltype(fields()) {
    try {
      return fields();
    } catch (const kj::Exception& e) {
      return malformed(peer, e);
    }
  }
  static Error malformed(std::string_view peer, const kj::Exception& e);

 private:
  kj::Array<capnp::word> words_;
  std::unique_ptr<capnp::FlatArrayMessageReader> reader_;
};

// Whether `message` (a segment table and its segments, as a Header holds them) is one segment
// whose root struct, and every struct its pointers point to, lie inside it, each pointer being
// null or a struct pointer. Then reading the root's fields and its pointers' structs' fields
// cannot make Cap'n Proto throw (which allocates): what a SIGBUS handler checks before it reads
// a reply (net/page_fetcher.cc). Lists, text and deeper levels are not checked: not for them.
bool shallow_structs_in_bounds(std::span<const capnp::word> message) noexcept;

// The header of a request that came as one datagram (getPage by UDP): its frame must fill the
// datagram exactly, carry no payload, and have a header of whole 8-byte words within the limit.
Result<std::span<const std::byte>> request_datagram_header(std::span<const std::byte> datagram);

struct FrameView {
  std::span<const std::byte> header;
  std::span<const std::byte> payload;
};

class FrameBuffer {
 public:
  // `max_payload` (at most kMaxPayload): frames announcing a larger payload are refused before
  // anything is buffered for them. A server whose requests carry no payload passes a small one:
  // next() makes room for a whole frame as soon as its prefix is in, so a peer could otherwise
  // make each connection hold 16 MiB by sending 8 bytes.
  explicit FrameBuffer(uint32_t max_payload = kMaxPayload) : max_payload_(std::min(max_payload, kMaxPayload)) {}
  // Space to receive into (grows as needed, never beyond one maximal frame).
  std::span<std::byte> writable(size_t at_least = 64 * 1024);
  void commit(size_t n) { end_ += n; }
  // The next complete frame, if there is one; an error if the peer broke the framing.
  Result<std::optional<FrameView>> next();
  // Drops the frame last returned by next().
  void consume();
  size_t buffered() const { return end_ - start_; }
  // A new limit for the frames still to come (a server raises it once its peer authenticated).
  void set_max_payload(uint32_t max_payload) { max_payload_ = std::min(max_payload, kMaxPayload); }

 private:
  std::vector<std::byte> buf_;
  size_t start_ = 0, end_ = 0, pending_ = 0;
  uint32_t max_payload_ = kMaxPayload;
};

}  // namespace lazymem::net
