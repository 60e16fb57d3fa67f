// Wire frames: u32 header length | u32 payload length | Cap'n Proto header | raw payload.
#include "net/frame.h"

#include <fmt/format.h>

#include <cstring>

namespace lazymem::net {
namespace {

void put_le32(std::byte* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = std::byte((v >> (8 * i)) & 0xff);
}
uint32_t get_le32(const std::byte* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(p[i]) << (8 * i);
  return v;
}

}  // namespace

std::vector<std::byte> encode_frame(capnp::MessageBuilder& header, uint32_t payload_len) {
  kj::Array<capnp::word> words = capnp::messageToFlatArray(header);
  auto bytes = words.asBytes();
  std::vector<std::byte> out(kFramePrefix + bytes.size());
  put_le32(out.data(), static_cast<uint32_t>(bytes.size()));
  put_le32(out.data() + 4, payload_len);
  std::memcpy(out.data() + kFramePrefix, bytes.begin(), bytes.size());
  return out;
}

Result<std::unique_ptr<Header>> Header::parse(std::span<const std::byte> bytes) {
  if (bytes.empty() || bytes.size() % sizeof(capnp::word) != 0 || bytes.size() > kMaxHeader) {
    return Error(Errc::kProtocol, fmt::format("frame header of {} bytes (a whole number of 8-byte words, at most {})",
                                              bytes.size(), kMaxHeader));
  }
  auto h = std::make_unique<Header>();
  h->words_ = kj::heapArray<capnp::word>(bytes.size() / sizeof(capnp::word));
  std::memcpy(h->words_.begin(), bytes.data(), bytes.size());
  capnp::ReaderOptions opts;
  opts.traversalLimitInWords = h->words_.size() * 4 + 64;
  opts.nestingLimit = 8;
  try {
    h->reader_ = std::make_unique<capnp::FlatArrayMessageReader>(h->words_.asPtr(), opts);
    // Touch the root so a malformed segment table fails here, not in the caller.
    (void)h->reader_->getRoot<capnp::AnyPointer>();
  } catch (const kj::Exception& e) {
    return Error(Errc::kProtocol, fmt::format("malformed frame header: {}", e.getDescription().cStr()));
  }
  return h;
}

Error Header::malformed(std::string_view peer, const kj::Exception& e) {
  return Error(Errc::kProtocol, fmt::format("malformed message from {}: {}", peer, e.getDescription().cStr()));
}

Result<std::span<const std::byte>> request_datagram_header(std::span<const std::byte> datagram) {
  if (datagram.size() < kFramePrefix) return Error(Errc::kProtocol, "datagram shorter than a frame prefix");
  const uint32_t header_len = get_le32(datagram.data()), payload_len = get_le32(datagram.data() + 4);
  if (payload_len != 0 || size_t{header_len} + kFramePrefix != datagram.size() || header_len == 0 ||
      header_len % sizeof(capnp::word) != 0 || header_len > kMaxHeader) {
    return Error(Errc::kProtocol, "its frame lengths do not match the datagram");
  }
  return datagram.subspan(kFramePrefix);
}

std::span<std::byte> FrameBuffer::writable(size_t at_least) {
  if (start_ == end_) start_ = end_ = 0;
  if (buf_.size() - end_ < at_least) {
    if (start_ > 0) {  // compact before growing
      std::memmove(buf_.data(), buf_.data() + start_, end_ - start_);
      end_ -= start_;
      start_ = 0;
    }
    if (buf_.size() - end_ < at_least) buf_.resize(end_ + at_least);
  }
  return {buf_.data() + end_, buf_.size() - end_};
}

Result<std::optional<FrameView>> FrameBuffer::next() {
  size_t have = end_ - start_;
  if (have < kFramePrefix) return std::optional<FrameView>();
  const std::byte* p = buf_.data() + start_;
  uint32_t hlen = get_le32(p);
  uint32_t plen = get_le32(p + 4);
  if (hlen == 0 || hlen > kMaxHeader || hlen % sizeof(capnp::word) != 0) {
    return Error(Errc::kProtocol, fmt::format("bad frame: header length {} (limit {}, multiple of 8)", hlen, kMaxHeader));
  }
  if (plen > max_payload_) return Error(Errc::kProtocol, fmt::format("bad frame: payload length {} over {}", plen, max_payload_));
  size_t total = kFramePrefix + hlen + plen;
  // Room for the rest of the frame is made as its bytes come (writable()), not here: 8 bytes
  // announcing 16 MiB would otherwise make the connection hold them before the peer sent any.
  if (have < total) return std::optional<FrameView>();
  pending_ = total;
  p = buf_.data() + start_;
  return std::optional<FrameView>(FrameView{{p + kFramePrefix, hlen}, {p + kFramePrefix + hlen, plen}});
}

void FrameBuffer::consume() {
  start_ += pending_;
  pending_ = 0;
}

namespace {

uint64_t word_at(std::span<const capnp::word> m, size_t i) noexcept {
  uint64_t v;
  std::memcpy(&v, m.data() + i, sizeof v);
  return v;  // little-endian hosts only, as the rest of the wire code
}

// The struct a pointer at word `at` of `seg` points to: false unless it is null or a struct
// pointer whose target lies inside the segment. On success, `data`/`ptrs` locate the target.
bool struct_in_bounds(std::span<const capnp::word> seg, size_t at, size_t& data, size_t& data_words,
                      size_t& ptr_words) noexcept {
  const uint64_t p = word_at(seg, at);
  data = data_words = ptr_words = 0;
  if (p == 0) return true;           // null: the reader gives the default
  if ((p & 3) != 0) return false;    // a list, far or capability pointer
  const int64_t offset = static_cast<int32_t>(static_cast<uint32_t>(p)) >> 2;  // signed, words
  data_words = (p >> 32) & 0xffff;
  ptr_words = p >> 48;
  const int64_t start = static_cast<int64_t>(at) + 1 + offset;
  if (start < 0 || static_cast<uint64_t>(start) + data_words + ptr_words > seg.size()) return false;
  data = static_cast<size_t>(start);
  return true;
}

}  // namespace

bool shallow_structs_in_bounds(std::span<const capnp::word> message) noexcept {
  if (message.size() < 2) return false;
  const uint64_t table = word_at(message, 0);
  const uint32_t segments_minus_one = static_cast<uint32_t>(table), seg_words = static_cast<uint32_t>(table >> 32);
  if (segments_minus_one != 0 || seg_words < 1 || seg_words > message.size() - 1) return false;
  auto seg = message.subspan(1, seg_words);
  size_t root = 0, root_data = 0, root_ptrs = 0;
  if (!struct_in_bounds(seg, 0, root, root_data, root_ptrs)) return false;
  for (size_t i = 0; i < root_ptrs; ++i) {
    size_t d, dw, pw;
    if (!struct_in_bounds(seg, root + root_data + i, d, dw, pw)) return false;
  }
  return true;
}

}  // namespace lazymem::net
