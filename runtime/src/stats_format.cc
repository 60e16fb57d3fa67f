// Stats as a readable table and as JSON (CLI output, demo, benchmarks).
#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include "lazymem/stats.h"

namespace lazymem {
namespace {

std::string human_bytes(uint64_t b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(b);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  return u == 0 ? fmt::format("{} B", b) : fmt::format("{:.1f} {}", v, units[u]);
}

std::string row(const RegionStats& r) {
  double ratio = r.bytes_fetched ? double(r.bytes_decompressed) / double(r.bytes_fetched) : 0.0;
  return fmt::format("{:<16} {:>10} {:>9} {:>10} {:>10} {:>9} {:>11} {:>11} {:>6} {:>8} {:>8} {:>8} {:>9.1f}\n",
                     r.name.size() > 16 ? r.name.substr(0, 15) + "~" : r.name, human_bytes(r.length), r.faults,
                     r.pages_fault, r.pages_prefetch, r.pages_zero, human_bytes(r.bytes_fetched),
                     human_bytes(r.bytes_decompressed), ratio > 0 ? fmt::format("{:.2f}x", ratio) : "-",
                     r.latency.percentile_us(50), r.latency.percentile_us(99), r.latency.max_us,
                     double(r.blocked_us) / 1000.0);
}

nlohmann::json region_json(const RegionStats& r) {
  nlohmann::json buckets = nlohmann::json::array();
  for (uint64_t b : r.latency.buckets) buckets.push_back(b);
  return {{"name", r.name},
          {"length", r.length},
          {"faults", r.faults},
          {"pages_fault", r.pages_fault},
          {"pages_prefetch", r.pages_prefetch},
          {"pages_zero", r.pages_zero},
          {"bytes_fetched", r.bytes_fetched},
          {"bytes_decompressed", r.bytes_decompressed},
          {"errors", r.errors},
          {"blocked_us", r.blocked_us},
          {"pages_by_datagram", r.pages_by_datagram},
          {"datagrams_lost", r.datagrams_lost},
          {"datagram_pages_on_connection", r.datagram_pages_on_connection},
          {"latency_us", {{"count", r.latency.count},
                          {"p50", r.latency.percentile_us(50)},
                          {"p99", r.latency.percentile_us(99)},
                          {"max", r.latency.max_us},
                          {"sum", r.latency.sum_us},
                          {"buckets_pow2", buckets}}}};
}

}  // namespace

std::string format_stats_table(const RestoreStats& stats) {
  std::string out = fmt::format("{:<16} {:>10} {:>9} {:>10} {:>10} {:>9} {:>11} {:>11} {:>6} {:>8} {:>8} {:>8} {:>9}\n",
                                "region", "size", "faults", "pg:fault", "pg:prefch", "pg:zero", "fetched",
                                "decompr", "ratio", "p50 us", "p99 us", "max us", "blocked ms");
  for (const auto& r : stats.regions) out += row(r);
  if (stats.regions.size() > 1) out += row(stats.total());
  return out;
}

std::string format_stats_json(const RestoreStats& stats) {
  nlohmann::json j;
  j["source"] = stats.source;
  j["complete"] = stats.complete;
  j["failed"] = stats.failed;
  j["regions"] = nlohmann::json::array();
  for (const auto& r : stats.regions) j["regions"].push_back(region_json(r));
  j["total"] = region_json(stats.total());
  return j.dump();
}

}  // namespace lazymem
