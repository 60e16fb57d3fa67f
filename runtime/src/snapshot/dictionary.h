// A snapshot's zstd dictionary (format v2): trained at capture on a sample of the snapshot's own
// pages, so pages compressed one by one keep nearly the ratio of whole 64 KiB frames while a
// fault decodes only its own page (docs/snapshot-format.md, "Version 2").
//
// Thread-safety: both dictionary kinds are read-only once built and shared by every thread
// encoding or decoding the snapshot's chunks.
#pragma once

#include <zstd.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "lazymem/result.h"

namespace lazymem::snapshot {

// Dictionary size: the codec bench (bench/codec) measured 64 KiB clearly ahead of 16 KiB. Small
// snapshots get a smaller one (zstd wants ~100x the dictionary in samples).
constexpr size_t kDictionaryBytes = 64 * 1024;
// Pages sampled, evenly spread, at most. Measured on the benchmarks' heap-like data (256 MiB,
// fastCover k=1024 d=8): 1024 pages train in 0.05 s to a ratio of 5.06x; 4096 pages take 0.2 s
// for 5.07x; zstd's default trainer (parameter search) takes 0.19-0.68 s for 4.95-4.98x.
constexpr size_t kMaxSamplePages = 1024;
// zstd refuses to train on fewer samples than this; smaller snapshots go without a dictionary.
constexpr size_t kMinSamplePages = 16;

// Trains a dictionary on non-zero pages of `regions` (each a multiple of `page_size`).
// Returns an empty vector when there is too little to learn from: pages are then compressed
// without a dictionary, which is correct, only larger.
std::vector<std::byte> train_dictionary(std::span<const std::span<const std::byte>> regions, uint32_t page_size);

class EncodeDictionary {
 public:
  static Result<std::shared_ptr<const EncodeDictionary>> load(std::span<const std::byte> bytes, int level);
  ~EncodeDictionary();
  EncodeDictionary(const EncodeDictionary&) = delete;
  EncodeDictionary& operator=(const EncodeDictionary&) = delete;
  const ZSTD_CDict* get() const { return cdict_; }

 private:
  explicit EncodeDictionary(ZSTD_CDict* c) : cdict_(c) {}
  ZSTD_CDict* cdict_;
};

class DecodeDictionary {
 public:
  // An empty `bytes` (a snapshot without a dictionary) gives nullptr.
  static Result<std::shared_ptr<const DecodeDictionary>> load(std::span<const std::byte> bytes);
  ~DecodeDictionary();
  DecodeDictionary(const DecodeDictionary&) = delete;
  DecodeDictionary& operator=(const DecodeDictionary&) = delete;
  const ZSTD_DDict* get() const { return ddict_; }

 private:
  explicit DecodeDictionary(ZSTD_DDict* d) : ddict_(d) {}
  ZSTD_DDict* ddict_;
};

}  // namespace lazymem::snapshot
