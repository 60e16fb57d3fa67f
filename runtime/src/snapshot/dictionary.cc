// Snapshot dictionaries: training on sampled pages, and the zstd objects built from one.
#include "snapshot/dictionary.h"

#include <fmt/format.h>
#define ZDICT_STATIC_LINKING_ONLY  // fastCover with fixed parameters (exported by libzstd 1.5)
#include <zdict.h>

#include <algorithm>

#include "snapshot/chunk_codec.h"
#include "snapshot/running_memory.h"

namespace lazymem::snapshot {

std::vector<std::byte> train_dictionary(std::span<const std::span<const std::byte>> regions, uint32_t page_size) {
  uint64_t pages = 0;
  for (auto r : regions) pages += r.size() / page_size;
  uint64_t stride = std::max<uint64_t>(1, (pages + kMaxSamplePages - 1) / kMaxSamplePages);
  std::vector<std::byte> samples;
  std::vector<size_t> sizes;
  // One stride across all regions, so every region is sampled in proportion to its size.
  uint64_t before = 0;  // pages in the regions before this one
  std::vector<std::byte> page(page_size);
  for (auto r : regions) {
    uint64_t n = r.size() / page_size;
    for (uint64_t p = (stride - before % stride) % stride; p < n; p += stride) {
      // Copied first: a live capture's process may be writing the page (a torn sample costs a
      // little ratio, nothing else).
      copy_running_memory(page.data(), r.data() + p * page_size, page_size);
      if (is_all_zero(page)) continue;  // zero pages are not compressed at all
      samples.insert(samples.end(), page.begin(), page.end());
      sizes.push_back(page_size);
    }
    before += n;
  }
  if (sizes.size() < kMinSamplePages) return {};
  std::vector<std::byte> dict(std::clamp<size_t>(samples.size() / 64, 1024, kDictionaryBytes));
  ZDICT_fastCover_params_t params{};
  params.k = 1024;  // segment size: longer than a record, so whole records are kept
  params.d = 8;
  params.f = 20;
  params.accel = 1;
  params.splitPoint = 1.0;  // no parameter search: one pass over the samples
  params.zParams.compressionLevel = 1;
  size_t got = ZDICT_trainFromBuffer_fastCover(dict.data(), dict.size(), samples.data(), sizes.data(),
                                               static_cast<unsigned>(sizes.size()), params);
  // Training fails on samples with nothing in common (random data): no dictionary then.
  if (ZDICT_isError(got)) return {};
  dict.resize(got);
  return dict;
}

Result<std::shared_ptr<const EncodeDictionary>> EncodeDictionary::load(std::span<const std::byte> bytes, int level) {
  if (bytes.empty()) return std::shared_ptr<const EncodeDictionary>();
  ZSTD_CDict* c = ZSTD_createCDict(bytes.data(), bytes.size(), level);
  if (c == nullptr) return Error(Errc::kCorrupt, "the snapshot's zstd dictionary cannot be loaded for compression");
  return std::shared_ptr<const EncodeDictionary>(new EncodeDictionary(c));
}

EncodeDictionary::~EncodeDictionary() { ZSTD_freeCDict(cdict_); }

Result<std::shared_ptr<const DecodeDictionary>> DecodeDictionary::load(std::span<const std::byte> bytes) {
  if (bytes.empty()) return std::shared_ptr<const DecodeDictionary>();
  ZSTD_DDict* d = ZSTD_createDDict(bytes.data(), bytes.size());
  if (d == nullptr) return Error(Errc::kCorrupt, "the snapshot's zstd dictionary does not load; the manifest is damaged");
  return std::shared_ptr<const DecodeDictionary>(new DecodeDictionary(d));
}

DecodeDictionary::~DecodeDictionary() { ZSTD_freeDDict(ddict_); }

}  // namespace lazymem::snapshot
