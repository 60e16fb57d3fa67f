// Chunk codec: zero detection, page-frame and whole-chunk encoding, checksum-verified decoding.
#define ZSTD_STATIC_LINKING_ONLY  // ZSTD_c_literalCompressionMode (libzstd 1.5 exports it)
#include <zstd.h>

#include "snapshot/chunk_codec.h"

#include <fmt/format.h>
#include <xxhash.h>

#include <cstring>
#include <new>

namespace lazymem::snapshot {
namespace {

constexpr size_t kEndBytes = sizeof(uint32_t);

uint32_t frame_end(std::span<const std::byte> stored, uint32_t i) {
  uint32_t v = 0;
  for (size_t b = 0; b < kEndBytes; ++b) v |= static_cast<uint32_t>(stored[i * kEndBytes + b]) << (8 * b);
  return v;
}

void put_frame_end(std::byte* p, uint32_t v) {
  for (size_t b = 0; b < kEndBytes; ++b) p[b] = std::byte((v >> (8 * b)) & 0xff);
}

// Compressing costs CPU on every fault: only worth it when it saves a sixteenth or more.
bool worth_compressing(size_t compressed, size_t plain) { return compressed < plain - plain / 16; }

}  // namespace

uint64_t chunk_checksum(std::span<const std::byte> bytes) { return XXH3_64bits(bytes.data(), bytes.size()); }

bool is_all_zero(std::span<const std::byte> bytes) {
  const std::byte* p = bytes.data();
  size_t n = bytes.size();
  // Word-at-a-time; chunks are page multiples so the tail loop rarely runs.
  size_t words = n / sizeof(uint64_t);
  for (size_t i = 0; i < words; i += 8) {
    uint64_t acc = 0;
    size_t end = i + 8 < words ? i + 8 : words;
    for (size_t j = i; j < end; ++j) {
      uint64_t w;
      std::memcpy(&w, p + j * sizeof w, sizeof w);
      acc |= w;
    }
    if (acc != 0) return false;
  }
  for (size_t i = words * sizeof(uint64_t); i < n; ++i) {
    if (p[i] != std::byte{0}) return false;
  }
  return true;
}

ChunkEncoder::ChunkEncoder(int level, uint32_t max_chunk, std::shared_ptr<const EncodeDictionary> dict)
    : cctx_(ZSTD_createCCtx()), page_ctx_(ZSTD_createCCtx()), dict_(std::move(dict)),
      out_(ZSTD_compressBound(max_chunk) + max_chunk / 4096 * kEndBytes) {
  if (cctx_ == nullptr || page_ctx_ == nullptr) {
    ZSTD_freeCCtx(cctx_);
    ZSTD_freeCCtx(page_ctx_);
    throw std::bad_alloc();
  }
  ZSTD_CCtx_setParameter(cctx_, ZSTD_c_compressionLevel, level);
  // The manifest keeps the checksum of the uncompressed chunk; zstd's own is redundant.
  ZSTD_CCtx_setParameter(cctx_, ZSTD_c_checksumFlag, 0);
  ZSTD_CCtx_setParameter(cctx_, ZSTD_c_contentSizeFlag, 1);
  ZSTD_CCtx_setParameter(page_ctx_, ZSTD_c_compressionLevel, level);
  // A page installed before the rest of its chunk is decoded is verified by its own frame's
  // checksum (4 bytes). The dictionary id is implied by the snapshot: 4 bytes saved per page.
  ZSTD_CCtx_setParameter(page_ctx_, ZSTD_c_checksumFlag, 1);
  ZSTD_CCtx_setParameter(page_ctx_, ZSTD_c_contentSizeFlag, 1);
  ZSTD_CCtx_setParameter(page_ctx_, ZSTD_c_dictIDFlag, 0);
  if (dict_) ZSTD_CCtx_refCDict(page_ctx_, dict_->get());
  // Literals stored as they are: within a page, with a dictionary, Huffman-coding them saves
  // under 1% (5.03x -> 4.99x on the bench data) but building a table per page costs decoding
  // ~12% (bench codec: bulk 0.91 -> 1.02 GB/s, fault 5.8 -> 4.9 us). Frames stay standard; a
  // libzstd without the parameter just keeps its default.
  ZSTD_CCtx_setParameter(page_ctx_, ZSTD_c_literalCompressionMode, ZSTD_ps_disable);
}

ChunkEncoder::~ChunkEncoder() {
  ZSTD_freeCCtx(cctx_);
  ZSTD_freeCCtx(page_ctx_);
}

Result<EncodedChunk> ChunkEncoder::encode(std::span<const std::byte> in) {
  if (is_all_zero(in)) return EncodedChunk{Codec::kZero, 0, 0, {}};
  uint64_t sum = chunk_checksum(in);
  if (out_.size() < ZSTD_compressBound(in.size())) out_.resize(ZSTD_compressBound(in.size()));
  size_t n = ZSTD_compress2(cctx_, out_.data(), out_.size(), in.data(), in.size());
  if (ZSTD_isError(n)) {
    return Error(Errc::kIo, fmt::format("zstd compression failed: {}", ZSTD_getErrorName(n)));
  }
  if (!worth_compressing(n, in.size())) return EncodedChunk{Codec::kRaw, sum, 0, in};
  return EncodedChunk{Codec::kZstd, sum, 0, std::span<const std::byte>(out_.data(), n)};
}

Result<EncodedChunk> ChunkEncoder::encode_pages(std::span<const std::byte> in, uint32_t page_size) {
  if (is_all_zero(in)) return EncodedChunk{Codec::kZero, 0, 0, {}};
  uint64_t sum = chunk_checksum(in);
  const uint32_t pages = static_cast<uint32_t>(in.size() / page_size);
  const size_t table = pages * kEndBytes;
  // Every page at worst raw, and zstd needs its bound as room to write into.
  size_t need = table + in.size() + ZSTD_compressBound(page_size);
  if (out_.size() < need) out_.resize(need);
  size_t end = 0;  // relative to the end of the table
  for (uint32_t i = 0; i < pages; ++i) {
    auto page = in.subspan(size_t{i} * page_size, page_size);
    std::byte* dst = out_.data() + table + end;
    if (!is_all_zero(page)) {
      size_t n = ZSTD_compress2(page_ctx_, dst, out_.size() - table - end, page.data(), page.size());
      if (ZSTD_isError(n)) return Error(Errc::kIo, fmt::format("zstd compression failed: {}", ZSTD_getErrorName(n)));
      if (!worth_compressing(n, page_size)) {
        std::memcpy(dst, page.data(), page_size);
        n = page_size;
      }
      end += n;
    }
    put_frame_end(out_.data() + i * kEndBytes, static_cast<uint32_t>(end));
  }
  size_t stored = table + end;
  if (!worth_compressing(stored, in.size())) return EncodedChunk{Codec::kRaw, sum, 0, in};
  std::span<const std::byte> bytes(out_.data(), stored);
  return EncodedChunk{Codec::kZstdPages, sum, chunk_checksum(bytes), bytes};
}

ChunkDecoder::ChunkDecoder() : dctx_(ZSTD_createDCtx()) {
  if (dctx_ == nullptr) throw std::bad_alloc();
}

ChunkDecoder::~ChunkDecoder() { ZSTD_freeDCtx(dctx_); }

Error CodecFault::error() const {
  return Error(code, fmt::format(fmt::runtime(format != nullptr ? format : "chunk does not decode"), a, b, detail));
}

namespace {
Status as_status(const CodecFault& f) { return f ? Status(f.error()) : ok_status(); }
CodecFault corrupt(const char* format, uint64_t a = 0, uint64_t b = 0, const char* detail = "") noexcept {
  return CodecFault{format, a, b, detail, Errc::kCorrupt};
}
}  // namespace

CodecFault ChunkDecoder::verify_stored(const ChunkInfo& info, std::span<const std::byte> stored, uint32_t length,
                                       uint32_t page_size, CodecFaultOnly) noexcept {
  const uint32_t pages = length / page_size;
  const size_t table = size_t{pages} * kEndBytes;
  if (stored.size() != info.stored_length || stored.size() < table) {
    return corrupt("page-frame chunk holds {0} bytes, expected {1}", stored.size(), info.stored_length);
  }
  uint64_t sum = chunk_checksum(stored);
  if (sum != info.stored_checksum) {
    return corrupt("stored chunk checksum mismatch (manifest {0:016x}, received {1:016x})", info.stored_checksum, sum);
  }
  // The bytes are the ones captured; the table is checked anyway, so a writer bug cannot make
  // a page decode from outside its chunk.
  uint32_t prev = 0;
  for (uint32_t i = 0; i < pages; ++i) {
    uint32_t end = frame_end(stored, i);
    if (end < prev || end - prev > page_size) return corrupt("page-frame chunk: page {0} has a bad frame end {1}", i, end);
    prev = end;
  }
  if (prev != stored.size() - table) {
    return corrupt("page-frame chunk: frames end at {0}, the chunk at {1}", prev, stored.size() - table);
  }
  return {};
}

CodecFault ChunkDecoder::decode_page(std::span<const std::byte> stored, uint32_t length, uint32_t index,
                                     std::span<std::byte> out, const ChunkLayout& layout, CodecFaultOnly) noexcept {
  auto frame = page_frame(stored, length, layout.page_size, index);
  if (frame.empty()) {
    std::memset(out.data(), 0, out.size());
  } else if (frame.size() == out.size()) {
    std::memcpy(out.data(), frame.data(), out.size());
  } else {
    size_t n = layout.dict ? ZSTD_decompress_usingDDict(dctx_, out.data(), out.size(), frame.data(), frame.size(), layout.dict)
                           : ZSTD_decompressDCtx(dctx_, out.data(), out.size(), frame.data(), frame.size());
    if (ZSTD_isError(n)) return corrupt("page {0} does not decode: {2}", index, 0, ZSTD_getErrorName(n));
    if (n != out.size()) return corrupt("page {0} decodes to {1} bytes, not a page", index, n);
  }
  return {};
}

std::span<const std::byte> page_frame(std::span<const std::byte> stored, uint32_t length, uint32_t page_size,
                                      uint32_t index) {
  const size_t table = size_t{length / page_size} * kEndBytes;
  uint32_t begin = index == 0 ? 0 : frame_end(stored, index - 1);
  return stored.subspan(table + begin, frame_end(stored, index) - begin);
}

CodecFault ChunkDecoder::decode_frame(std::span<const std::byte> frame, std::span<std::byte> out,
                                      const ChunkLayout& layout, CodecFaultOnly) noexcept {
  ZSTD_frameHeader h;
  size_t r = ZSTD_getFrameHeader(&h, frame.data(), frame.size());
  if (r != 0 || h.frameType != ZSTD_frame || h.frameContentSize != out.size() || !h.checksumFlag) {
    // A frame without a checksum would decode unverified: refused, whatever it holds.
    return corrupt("page frame: not a checksummed zstd frame of one page");
  }
  size_t n = layout.dict ? ZSTD_decompress_usingDDict(dctx_, out.data(), out.size(), frame.data(), frame.size(), layout.dict)
                         : ZSTD_decompressDCtx(dctx_, out.data(), out.size(), frame.data(), frame.size());
  if (ZSTD_isError(n) || n != out.size()) {
    return corrupt("page frame does not decode: {2}", 0, 0, ZSTD_isError(n) ? ZSTD_getErrorName(n) : "short");
  }
  return {};
}

CodecFault ChunkDecoder::decode(const ChunkInfo& info, std::span<const std::byte> stored, std::span<std::byte> out,
                                const ChunkLayout& layout, CodecFaultOnly) noexcept {
  switch (info.codec) {
    case Codec::kZero:
      std::memset(out.data(), 0, out.size());
      return {};
    case Codec::kRaw:
      if (stored.size() != out.size()) return corrupt("raw chunk holds {0} bytes, expected {1}", stored.size(), out.size());
      std::memcpy(out.data(), stored.data(), out.size());
      break;
    case Codec::kZstd: {
      size_t n = ZSTD_decompressDCtx(dctx_, out.data(), out.size(), stored.data(), stored.size());
      if (ZSTD_isError(n)) return corrupt("zstd chunk does not decode: {2}", 0, 0, ZSTD_getErrorName(n));
      if (n != out.size()) return corrupt("zstd chunk decodes to {0} bytes, expected {1}", n, out.size());
      break;
    }
    case Codec::kZstdPages:
      if (auto f = verify_stored(info, stored, static_cast<uint32_t>(out.size()), layout.page_size, kFaultOnly)) return f;
      return decode_pages(info, stored, out, layout, kNoPage);
    default:
      return CodecFault{"unknown chunk codec {0}", static_cast<uint64_t>(info.codec), 0, "", Errc::kUnsupported};
  }
  return verify_checksum(info, out);
}

CodecFault ChunkDecoder::decode_pages(const ChunkInfo& info, std::span<const std::byte> stored, std::span<std::byte> out,
                                      const ChunkLayout& layout, uint32_t skip) noexcept {
  const uint32_t length = static_cast<uint32_t>(out.size());
  for (uint32_t i = 0; i < length / layout.page_size; ++i) {
    if (i == skip) continue;
    auto page = out.subspan(size_t{i} * layout.page_size, layout.page_size);
    if (auto f = decode_page(stored, length, i, page, layout, kFaultOnly)) return f;
  }
  return verify_checksum(info, out);
}

CodecFault ChunkDecoder::verify_checksum(const ChunkInfo& info, std::span<const std::byte> out) const noexcept {
  uint64_t sum = chunk_checksum(out);
  if (sum != info.checksum) return corrupt("chunk checksum mismatch (stored {0:016x}, computed {1:016x})", info.checksum, sum);
  return {};
}

Status ChunkDecoder::decode(const ChunkInfo& info, std::span<const std::byte> stored, std::span<std::byte> out,
                            const ChunkLayout& layout) {
  return as_status(decode(info, stored, out, layout, kFaultOnly));
}

Status ChunkDecoder::verify_stored(const ChunkInfo& info, std::span<const std::byte> stored, uint32_t length,
                                   uint32_t page_size) {
  return as_status(verify_stored(info, stored, length, page_size, kFaultOnly));
}

Status ChunkDecoder::decode_page(std::span<const std::byte> stored, uint32_t length, uint32_t index,
                                 std::span<std::byte> out, const ChunkLayout& layout) {
  return as_status(decode_page(stored, length, index, out, layout, kFaultOnly));
}

Status ChunkDecoder::decode_frame(std::span<const std::byte> frame, std::span<std::byte> out, const ChunkLayout& layout) {
  return as_status(decode_frame(frame, out, layout, kFaultOnly));
}

Status ChunkDecoder::decode_rest(const ChunkInfo& info, std::span<const std::byte> stored, std::span<std::byte> out,
                                 const ChunkLayout& layout, uint32_t index) {
  return as_status(decode_pages(info, stored, out, layout, index));
}

}  // namespace lazymem::snapshot
