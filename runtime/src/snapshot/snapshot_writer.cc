// SnapshotWriter: chunks, zero detection, parallel zstd, checksums, atomic commit.
#include "snapshot/snapshot_writer.h"

#include <fmt/format.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <thread>

#include "snapshot/manifest.h"
#include "snapshot/running_memory.h"

namespace lazymem::snapshot {
namespace {

// Chunks encoded per round: large enough that starting threads is noise, small enough that the
// staging buffers stay in the tens of MiB.
constexpr size_t kChunksPerRound = 256;

}  // namespace

SnapshotWriter::SnapshotWriter(std::unique_ptr<SnapshotSink> sink, const CaptureOptions& options)
    : sink_(std::move(sink)), options_(options), started_(std::chrono::steady_clock::now()) {
  threads_ = options.threads != 0 ? options.threads : std::max(1u, std::thread::hardware_concurrency());
  slots_.resize(kChunksPerRound);
  manifest_.format_version = options.format_version;
  manifest_.chunk_size = options.chunk_size;
  manifest_.app_state = options.app_state;
  manifest_.compression_level = options.zstd_level;
  report_.location = sink_->describe();
}

Status SnapshotWriter::train(std::span<const std::span<const std::byte>> regions, uint32_t page_size) {
  if (options_.format_version < 2 || !encoders_.empty()) return ok_status();
  manifest_.dictionary = train_dictionary(regions, page_size);
  LAZYMEM_ASSIGN_OR_RETURN(dict_, EncodeDictionary::load(manifest_.dictionary, options_.zstd_level));
  return ok_status();
}

Status SnapshotWriter::add_region(RegionInfo meta, std::span<const std::byte> bytes, const Progress& progress) {
  const uint32_t cs = options_.chunk_size;
  if (bytes.size() != meta.length || meta.length == 0 || meta.length % meta.page_size != 0) {
    return Error(Errc::kInvalidArgument, fmt::format("region '{}': length {} is not a positive multiple of the page size {}",
                                                     meta.name, meta.length, meta.page_size));
  }
  if (cs % meta.page_size != 0) {
    return Error(Errc::kInvalidArgument, fmt::format("region '{}': chunk size {} is not a multiple of its page size {}",
                                                     meta.name, cs, meta.page_size));
  }
  if (encoders_.empty()) {
    for (unsigned i = 0; i < threads_; ++i) encoders_.push_back(std::make_unique<ChunkEncoder>(options_.zstd_level, cs, dict_));
  }
  const size_t nchunks = (meta.length + cs - 1) / cs;
  meta.chunks.assign(nchunks, ChunkInfo{});
  std::vector<size_t> all(nchunks);
  for (size_t c = 0; c < nchunks; ++c) all[c] = c;
  LAZYMEM_TRY(store_chunks(meta, bytes, all, progress));
  report_.total_bytes += meta.length;
  manifest_.regions.push_back(std::move(meta));
  return ok_status();
}

Status SnapshotWriter::recapture(size_t region, std::span<const size_t> chunks, std::span<const std::byte> bytes) {
  if (region >= manifest_.regions.size() || bytes.size() != manifest_.regions[region].length) {
    return Error(Errc::kInvalidArgument, fmt::format("recapture: no region {} of {} bytes", region, bytes.size()));
  }
  RegionInfo& meta = manifest_.regions[region];
  for (size_t c : chunks) {
    if (c >= meta.chunks.size()) return Error(Errc::kInvalidArgument, fmt::format("recapture: region '{}' has no chunk {}", meta.name, c));
  }
  return store_chunks(meta, bytes, chunks, {});
}

Status SnapshotWriter::store_chunks(RegionInfo& meta, std::span<const std::byte> bytes, std::span<const size_t> which,
                                    const Progress& progress) {
  const uint32_t cs = options_.chunk_size;
  const bool pages = options_.format_version >= 2;
  for (size_t base = 0; base < which.size(); base += kChunksPerRound) {
    const size_t n = std::min(kChunksPerRound, which.size() - base);
    std::atomic<size_t> next{0};
    auto work = [&](unsigned t) {
      ChunkEncoder& enc = *encoders_[t];
      for (size_t i = next++; i < n; i = next++) {
        const uint64_t start = static_cast<uint64_t>(which[base + i]) * cs;
        auto in = bytes.subspan(start, std::min<uint64_t>(cs, meta.length - start));
        Slot& slot = slots_[i];
        if (stage_input_) {
          slot.input.resize(in.size());
          copy_running_memory(slot.input.data(), in.data(), in.size());
          in = slot.input;
        }
        auto enc_r = pages ? enc.encode_pages(in, meta.page_size) : enc.encode(in);
        if (!enc_r.ok()) {
          slot.status = enc_r.error();
          continue;
        }
        slot.status = ok_status();
        slot.info = ChunkInfo{enc_r->codec, 0, static_cast<uint32_t>(enc_r->stored.size()), enc_r->checksum,
                              enc_r->stored_checksum};
        if (enc_r->codec == Codec::kZstd || enc_r->codec == Codec::kZstdPages) {
          // The encoder reuses its buffer for the next chunk: keep a copy.
          slot.buf.assign(enc_r->stored.begin(), enc_r->stored.end());
          slot.stored = slot.buf;
        } else {
          slot.stored = enc_r->stored;  // raw: the region (or its staged copy) itself; zero: empty
        }
      }
    };
    std::vector<std::thread> helpers;
    for (unsigned t = 1; t < threads_; ++t) helpers.emplace_back(work, t);
    work(0);
    for (auto& h : helpers) h.join();
    for (size_t i = 0; i < n; ++i) {
      Slot& slot = slots_[i];
      if (!slot.status.ok()) return slot.status.error().wrap(fmt::format("region '{}' chunk {}", meta.name, which[base + i]));
      ChunkInfo info = slot.info;
      if (info.codec != Codec::kZero) {
        info.offset = offset_;
        LAZYMEM_TRY(sink_->append(slot.stored));
        offset_ += info.stored_length;
      }
      meta.chunks[which[base + i]] = info;
    }
    if (progress) progress(std::min<uint64_t>(meta.length, (base + n) * uint64_t{cs}), meta.length);
  }
  return ok_status();
}

Result<CaptureReport> SnapshotWriter::finish() {
  // Counted from the manifest, not as chunks were stored: a live capture stores some twice.
  for (const RegionInfo& r : manifest_.regions) {
    for (const ChunkInfo& c : r.chunks) {
      ++report_.chunks;
      report_.stored_bytes += c.stored_length;
      switch (c.codec) {
        case Codec::kZero: ++report_.zero_chunks; break;
        case Codec::kRaw: ++report_.raw_chunks; break;
        case Codec::kZstd:
        case Codec::kZstdPages: ++report_.zstd_chunks; break;
      }
    }
  }
  report_.superseded_bytes = offset_ - report_.stored_bytes;
  manifest_.data_length = offset_;
  manifest_.created_unix_ns = static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch()).count());
  LAZYMEM_TRY(validate_manifest(manifest_));
  auto bytes = encode_manifest(manifest_);
  LAZYMEM_TRY(sink_->commit(bytes));
  report_.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
  return report_;
}

}  // namespace lazymem::snapshot
