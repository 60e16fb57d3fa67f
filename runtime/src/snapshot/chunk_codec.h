// Chunk codec: zero detection, encoding (page frames with the snapshot's dictionary, or v1's
// one frame per chunk), and checksum-verified decoding of every codec.
//
// A kZstdPages chunk (format v2) stores a little-endian u32 table with the end offset of each
// page's frame (relative to the end of the table), then the frames: nothing for an all-zero
// page, the page itself when zstd does not save 1/16 of it, else one zstd frame (with the
// dictionary, and its own content checksum). So one page decodes and verifies alone.
//
// Thread-safety: an encoder or decoder belongs to one thread (it owns a zstd context).
// The decoder never allocates after construction (its CodecFault forms not even on failure):
// it is on the fault path, and in a SIGBUS handler.
#pragma once

#include <zstd.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "lazymem/result.h"
#include "lazymem/snapshot.h"
#include "snapshot/dictionary.h"

namespace lazymem::snapshot {

uint64_t chunk_checksum(std::span<const std::byte> bytes);
bool is_all_zero(std::span<const std::byte> bytes);

struct EncodedChunk {
  Codec codec = Codec::kZero;
  uint64_t checksum = 0;
  uint64_t stored_checksum = 0;       // kZstdPages only
  std::span<const std::byte> stored;  // what to store: points into the encoder's buffer or the input
};

// kZstdPages, after verify_stored(): the stored frame of page `index` (empty: a zero page;
// page_size bytes: the raw page; else a zstd frame).
std::span<const std::byte> page_frame(std::span<const std::byte> stored, uint32_t length, uint32_t page_size,
                                      uint32_t index);
// Whether a page frame is a zstd frame, which carries its own content checksum and so can be
// sent and verified alone (zero and raw page frames cannot: they are checked by the chunk's).
inline bool is_compressed_frame(std::span<const std::byte> frame, uint32_t page_size) {
  return !frame.empty() && frame.size() != page_size;
}

class ChunkEncoder {
 public:
  // `dict` may be null (pages are then compressed without one).
  ChunkEncoder(int level, uint32_t max_chunk, std::shared_ptr<const EncodeDictionary> dict = nullptr);
  ~ChunkEncoder();
  ChunkEncoder(const ChunkEncoder&) = delete;
  ChunkEncoder& operator=(const ChunkEncoder&) = delete;

  // Format v2: kZstdPages, one frame per page. Zero chunks store nothing; chunks that do not
  // shrink by 1/16 are stored raw.
  Result<EncodedChunk> encode_pages(std::span<const std::byte> in, uint32_t page_size);
  // Format v1: kZstd, one frame for the whole chunk (written only when asked for v1).
  Result<EncodedChunk> encode(std::span<const std::byte> in);

 private:
  ZSTD_CCtx* cctx_;      // whole chunks (v1)
  ZSTD_CCtx* page_ctx_;  // pages, with the dictionary and content checksums
  std::shared_ptr<const EncodeDictionary> dict_;
  std::vector<std::byte> out_;
};

// Why a chunk or page failed to decode or verify, without building a message: a format string
// (fmt, positional: {0} = a, {1} = b, {2} = detail) and its arguments, all static. What a
// SIGBUS handler can afford (net/page_fetcher.cc); error() makes the message.
struct CodecFault {
  const char* format = nullptr;  // null: no fault
  uint64_t a = 0, b = 0;
  const char* detail = "";
  Errc code = Errc::kCorrupt;

  explicit operator bool() const noexcept { return format != nullptr; }
  Error error() const;
};
// Selects the CodecFault form of a ChunkDecoder call: same checks, nothing allocated.
struct CodecFaultOnly {};
inline constexpr CodecFaultOnly kFaultOnly{};

// What decoding a chunk needs besides its bytes.
struct ChunkLayout {
  uint32_t page_size = 4096;
  const ZSTD_DDict* dict = nullptr;  // the snapshot's (kZstdPages), if it has one
};

class ChunkDecoder {
 public:
  ChunkDecoder();
  ~ChunkDecoder();
  ChunkDecoder(const ChunkDecoder&) = delete;
  ChunkDecoder& operator=(const ChunkDecoder&) = delete;

  static constexpr uint32_t kNoPage = ~uint32_t{0};

  // Decodes `stored` into exactly out.size() bytes and verifies the checksum. On any failure
  // (kCorrupt) the contents of `out` must not be used.
  Status decode(const ChunkInfo& info, std::span<const std::byte> stored, std::span<std::byte> out,
                const ChunkLayout& layout = {});

  // kZstdPages, one page at a time: verify_stored() checks the stored bytes (their checksum and
  // frame table) for a chunk of `length` bytes; then decode_page() decodes and verifies page
  // `index` into `out` (page_size bytes). A page is never decoded from unverified bytes.
  static Status verify_stored(const ChunkInfo& info, std::span<const std::byte> stored, uint32_t length,
                              uint32_t page_size);
  Status decode_page(std::span<const std::byte> stored, uint32_t length, uint32_t index, std::span<std::byte> out,
                     const ChunkLayout& layout);
  // One page from its zstd frame alone (a getPage reply): the frame must declare its content
  // size (out.size()) and carry a content checksum, which zstd verifies while decoding.
  Status decode_frame(std::span<const std::byte> frame, std::span<std::byte> out, const ChunkLayout& layout);
  // After decode_page(index) into its place in `out`: decodes every other page and verifies the
  // whole chunk's checksum, as decode() would.
  Status decode_rest(const ChunkInfo& info, std::span<const std::byte> stored, std::span<std::byte> out,
                     const ChunkLayout& layout, uint32_t index);

  // The same calls reporting a CodecFault (the Status forms above wrap these).
  CodecFault decode(const ChunkInfo& info, std::span<const std::byte> stored, std::span<std::byte> out,
                    const ChunkLayout& layout, CodecFaultOnly) noexcept;
  static CodecFault verify_stored(const ChunkInfo& info, std::span<const std::byte> stored, uint32_t length,
                                  uint32_t page_size, CodecFaultOnly) noexcept;
  CodecFault decode_page(std::span<const std::byte> stored, uint32_t length, uint32_t index, std::span<std::byte> out,
                         const ChunkLayout& layout, CodecFaultOnly) noexcept;
  CodecFault decode_frame(std::span<const std::byte> frame, std::span<std::byte> out, const ChunkLayout& layout,
                          CodecFaultOnly) noexcept;

 private:
  CodecFault decode_pages(const ChunkInfo& info, std::span<const std::byte> stored, std::span<std::byte> out,
                          const ChunkLayout& layout, uint32_t skip) noexcept;
  CodecFault verify_checksum(const ChunkInfo& info, std::span<const std::byte> out) const noexcept;

  ZSTD_DCtx* dctx_;
};

}  // namespace lazymem::snapshot
