// Chunk codec: zero detection, zstd or raw encoding, and checksum-verified decoding.
//
// Thread-safety: an encoder or decoder belongs to one thread (it owns a zstd context).
// The decoder never allocates after construction: it is on the fault path.
#pragma once

#include <zstd.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "lazymem/result.h"
#include "lazymem/snapshot.h"

namespace lazymem::snapshot {

uint64_t chunk_checksum(std::span<const std::byte> bytes);
bool is_all_zero(std::span<const std::byte> bytes);

struct EncodedChunk {
  Codec codec = Codec::kZero;
  uint64_t checksum = 0;
  std::span<const std::byte> stored;  // what to store: points into the encoder's buffer or the input
};

class ChunkEncoder {
 public:
  ChunkEncoder(int level, uint32_t max_chunk);
  ~ChunkEncoder();
  ChunkEncoder(const ChunkEncoder&) = delete;
  ChunkEncoder& operator=(const ChunkEncoder&) = delete;

  // Zero chunks store nothing; chunks zstd cannot shrink by 1/16 are stored raw.
  Result<EncodedChunk> encode(std::span<const std::byte> in);

 private:
  ZSTD_CCtx* cctx_;
  int level_;
  std::vector<std::byte> out_;
};

class ChunkDecoder {
 public:
  ChunkDecoder();
  ~ChunkDecoder();
  ChunkDecoder(const ChunkDecoder&) = delete;
  ChunkDecoder& operator=(const ChunkDecoder&) = delete;

  // Decodes `stored` into exactly out.size() bytes and verifies the checksum. On any failure
  // (kCorrupt) the contents of `out` must not be used.
  Status decode(const ChunkInfo& info, std::span<const std::byte> stored, std::span<std::byte> out);

 private:
  ZSTD_DCtx* dctx_;
};

}  // namespace lazymem::snapshot
