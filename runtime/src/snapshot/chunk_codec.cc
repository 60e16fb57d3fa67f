// Chunk codec: zero detection, zstd or raw encoding, and checksum-verified decoding.
#include "snapshot/chunk_codec.h"

#include <fmt/format.h>
#include <xxhash.h>

#include <cstring>
#include <new>

namespace lazymem::snapshot {

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

ChunkEncoder::ChunkEncoder(int level, uint32_t max_chunk)
    : cctx_(ZSTD_createCCtx()), level_(level), out_(ZSTD_compressBound(max_chunk)) {
  if (cctx_ == nullptr) throw std::bad_alloc();
  ZSTD_CCtx_setParameter(cctx_, ZSTD_c_compressionLevel, level_);
  // The manifest keeps the checksum of the uncompressed bytes; zstd's own is redundant.
  ZSTD_CCtx_setParameter(cctx_, ZSTD_c_checksumFlag, 0);
  ZSTD_CCtx_setParameter(cctx_, ZSTD_c_contentSizeFlag, 1);
}

ChunkEncoder::~ChunkEncoder() { ZSTD_freeCCtx(cctx_); }

Result<EncodedChunk> ChunkEncoder::encode(std::span<const std::byte> in) {
  if (is_all_zero(in)) return EncodedChunk{Codec::kZero, 0, {}};
  uint64_t sum = chunk_checksum(in);
  if (out_.size() < ZSTD_compressBound(in.size())) out_.resize(ZSTD_compressBound(in.size()));
  size_t n = ZSTD_compress2(cctx_, out_.data(), out_.size(), in.data(), in.size());
  if (ZSTD_isError(n)) {
    return Error(Errc::kIo, fmt::format("zstd compression failed: {}", ZSTD_getErrorName(n)));
  }
  // Decompressing costs CPU on every fault: only worth it when it saves a sixteenth or more.
  if (n >= in.size() - in.size() / 16) return EncodedChunk{Codec::kRaw, sum, in};
  return EncodedChunk{Codec::kZstd, sum, std::span<const std::byte>(out_.data(), n)};
}

ChunkDecoder::ChunkDecoder() : dctx_(ZSTD_createDCtx()) {
  if (dctx_ == nullptr) throw std::bad_alloc();
}

ChunkDecoder::~ChunkDecoder() { ZSTD_freeDCtx(dctx_); }

Status ChunkDecoder::decode(const ChunkInfo& info, std::span<const std::byte> stored, std::span<std::byte> out) {
  switch (info.codec) {
    case Codec::kZero:
      std::memset(out.data(), 0, out.size());
      return ok_status();
    case Codec::kRaw:
      if (stored.size() != out.size()) {
        return Error(Errc::kCorrupt, fmt::format("raw chunk holds {} bytes, expected {}", stored.size(), out.size()));
      }
      std::memcpy(out.data(), stored.data(), out.size());
      break;
    case Codec::kZstd: {
      size_t n = ZSTD_decompressDCtx(dctx_, out.data(), out.size(), stored.data(), stored.size());
      if (ZSTD_isError(n)) {
        return Error(Errc::kCorrupt, fmt::format("zstd chunk does not decode: {}", ZSTD_getErrorName(n)));
      }
      if (n != out.size()) {
        return Error(Errc::kCorrupt, fmt::format("zstd chunk decodes to {} bytes, expected {}", n, out.size()));
      }
      break;
    }
    default:
      return Error(Errc::kUnsupported, fmt::format("unknown chunk codec {}", static_cast<int>(info.codec)));
  }
  uint64_t sum = chunk_checksum(out);
  if (sum != info.checksum) {
    return Error(Errc::kCorrupt,
                 fmt::format("chunk checksum mismatch (stored {:016x}, computed {:016x})", info.checksum, sum));
  }
  return ok_status();
}

}  // namespace lazymem::snapshot
