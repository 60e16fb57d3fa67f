// Fault statistics: per region and in total. Plain values (a copy taken at one moment).
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace lazymem {

// Power-of-two microsecond buckets: bucket 0 counts latencies < 1 µs, bucket i (i >= 1) counts
// [2^(i-1), 2^i) µs; the last bucket takes everything longer.
struct LatencyHistogram {
  static constexpr size_t kBuckets = 32;
  std::array<uint64_t, kBuckets> buckets{};
  uint64_t count = 0;
  uint64_t sum_us = 0;
  uint64_t max_us = 0;

  static size_t bucket_of(uint64_t us);
  // Upper bound (µs) of the bucket holding the p-th percentile, p in [0, 100]; capped at max_us.
  uint64_t percentile_us(double p) const;
  void merge(const LatencyHistogram& other);
};

struct RegionStats {
  std::string name;
  uint64_t length = 0;
  uint64_t faults = 0;             // fault messages read from the userfaultfd
  uint64_t pages_fault = 0;        // pages installed to resolve a fault
  uint64_t pages_prefetch = 0;     // pages installed ahead of any fault
  uint64_t pages_zero = 0;         // pages installed as zero pages (nothing fetched)
  uint64_t bytes_fetched = 0;      // stored (compressed) bytes read from the source
  uint64_t bytes_decompressed = 0; // bytes after decoding
  uint64_t errors = 0;             // chunks that could not be had (poisoned / process failed)
  uint64_t blocked_us = 0;         // sum over faults of the time the faulting thread waited
  // Faults on the faulting thread (fault_on_thread) with a page server that takes datagrams:
  uint64_t pages_by_datagram = 0;  // pages that came in a datagram
  uint64_t datagrams_lost = 0;     // requests unanswered in time, asked again on the connection
  uint64_t datagram_pages_on_connection = 0;  // asked by datagram, sent on the connection (too big)
  LatencyHistogram latency;        // from the fault being read to the page being installed

  uint64_t pages_present() const { return pages_fault + pages_prefetch + pages_zero; }
  void merge(const RegionStats& other);
};

struct RestoreStats {
  std::string source;
  std::vector<RegionStats> regions;
  bool complete = false;  // every chunk is present
  bool failed = false;    // some chunk could not be had
  RegionStats total() const;
};

}  // namespace lazymem

namespace lazymem {

// A readable table: one row per region and a total row (faults, pages by fault / prefetch /
// zero, bytes fetched and decompressed, compression ratio, latency p50/p99/max, blocked time).
std::string format_stats_table(const RestoreStats& stats);
// The same figures as one JSON object (histogram buckets included).
std::string format_stats_json(const RestoreStats& stats);

}  // namespace lazymem
