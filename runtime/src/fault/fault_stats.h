// Live fault counters: written by the engine thread (and by faulting threads that resolve their
// own faults), read (as RegionStats copies) by any thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>

#include "lazymem/stats.h"

namespace lazymem::fault {

class LiveRegionStats {
 public:
  LiveRegionStats(std::string name, uint64_t length) : name_(std::move(name)), length_(length) {}

  // Any thread (relaxed atomic adds; readers tolerate a torn snapshot across counters).
  void add_fault() { bump(faults_); }
  void add_installed(uint64_t pages, bool by_fault) { bump(by_fault ? pages_fault_ : pages_prefetch_, pages); }
  void add_zero(uint64_t pages) { bump(pages_zero_, pages); }
  void add_fetched(uint64_t stored, uint64_t decompressed) {
    bump(bytes_fetched_, stored);
    bump(bytes_decompressed_, decompressed);
  }
  void add_error() { bump(errors_); }
  void add_datagrams(bool answered, bool lost, bool on_connection) {
    if (answered) bump(by_datagram_);
    if (lost) bump(datagrams_lost_);
    if (on_connection) bump(datagram_on_connection_);
  }
  void add_latency_us(uint64_t us);

  RegionStats read() const;

 private:
  static void bump(std::atomic<uint64_t>& c, uint64_t n = 1) {
    c.fetch_add(n, std::memory_order_relaxed);
  }
  std::string name_;
  uint64_t length_;
  std::atomic<uint64_t> faults_{0}, pages_fault_{0}, pages_prefetch_{0}, pages_zero_{0};
  std::atomic<uint64_t> bytes_fetched_{0}, bytes_decompressed_{0}, errors_{0};
  std::atomic<uint64_t> by_datagram_{0}, datagrams_lost_{0}, datagram_on_connection_{0};
  std::atomic<uint64_t> lat_count_{0}, lat_sum_{0}, lat_max_{0};
  std::array<std::atomic<uint64_t>, LatencyHistogram::kBuckets> buckets_{};
};

}  // namespace lazymem::fault
