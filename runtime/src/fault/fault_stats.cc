// Fault statistics: histogram maths and live counters.
#include "fault/fault_stats.h"

#include <algorithm>
#include <bit>

namespace lazymem {

size_t LatencyHistogram::bucket_of(uint64_t us) {
  if (us == 0) return 0;
  size_t b = static_cast<size_t>(std::bit_width(us));  // us in [2^(b-1), 2^b)
  return std::min(b, kBuckets - 1);
}

uint64_t LatencyHistogram::percentile_us(double p) const {
  if (count == 0) return 0;
  uint64_t rank = static_cast<uint64_t>(p / 100.0 * static_cast<double>(count) + 0.5);
  rank = std::clamp<uint64_t>(rank, 1, count);
  uint64_t seen = 0;
  for (size_t i = 0; i < kBuckets; ++i) {
    seen += buckets[i];
    if (seen >= rank) {
      uint64_t upper = i == 0 ? 1 : (uint64_t{1} << i);
      return std::min(upper, max_us);
    }
  }
  return max_us;
}

void LatencyHistogram::merge(const LatencyHistogram& o) {
  for (size_t i = 0; i < kBuckets; ++i) buckets[i] += o.buckets[i];
  count += o.count;
  sum_us += o.sum_us;
  max_us = std::max(max_us, o.max_us);
}

void RegionStats::merge(const RegionStats& o) {
  length += o.length;
  faults += o.faults;
  pages_fault += o.pages_fault;
  pages_prefetch += o.pages_prefetch;
  pages_zero += o.pages_zero;
  bytes_fetched += o.bytes_fetched;
  bytes_decompressed += o.bytes_decompressed;
  errors += o.errors;
  blocked_us += o.blocked_us;
  pages_by_datagram += o.pages_by_datagram;
  datagrams_lost += o.datagrams_lost;
  datagram_pages_on_connection += o.datagram_pages_on_connection;
  latency.merge(o.latency);
}

RegionStats RestoreStats::total() const {
  RegionStats t;
  t.name = "total";
  for (const auto& r : regions) t.merge(r);
  return t;
}

namespace fault {

void LiveRegionStats::add_latency_us(uint64_t us) {
  bump(buckets_[LatencyHistogram::bucket_of(us)]);
  bump(lat_count_);
  bump(lat_sum_, us);
  uint64_t max = lat_max_.load(std::memory_order_relaxed);
  while (us > max && !lat_max_.compare_exchange_weak(max, us, std::memory_order_relaxed)) {
  }
}

RegionStats LiveRegionStats::read() const {
  RegionStats s;
  s.name = name_;
  s.length = length_;
  s.faults = faults_.load(std::memory_order_relaxed);
  s.pages_fault = pages_fault_.load(std::memory_order_relaxed);
  s.pages_prefetch = pages_prefetch_.load(std::memory_order_relaxed);
  s.pages_zero = pages_zero_.load(std::memory_order_relaxed);
  s.bytes_fetched = bytes_fetched_.load(std::memory_order_relaxed);
  s.bytes_decompressed = bytes_decompressed_.load(std::memory_order_relaxed);
  s.errors = errors_.load(std::memory_order_relaxed);
  s.pages_by_datagram = by_datagram_.load(std::memory_order_relaxed);
  s.datagrams_lost = datagrams_lost_.load(std::memory_order_relaxed);
  s.datagram_pages_on_connection = datagram_on_connection_.load(std::memory_order_relaxed);
  s.latency.count = lat_count_.load(std::memory_order_relaxed);
  s.latency.sum_us = lat_sum_.load(std::memory_order_relaxed);
  s.latency.max_us = lat_max_.load(std::memory_order_relaxed);
  s.blocked_us = s.latency.sum_us;
  for (size_t i = 0; i < LatencyHistogram::kBuckets; ++i) s.latency.buckets[i] = buckets_[i].load(std::memory_order_relaxed);
  return s;
}

}  // namespace fault
}  // namespace lazymem
