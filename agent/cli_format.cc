// Tables for the agent CLI (status, regions, stats) from the daemon's JSON reports.
#include "cli_format.h"

#include <fmt/format.h>

#include <nlohmann/json.hpp>

namespace lazymem::agent {
namespace {

std::string mib(uint64_t b) { return fmt::format("{:.1f} MiB", double(b) / 1048576.0); }

}  // namespace

std::string format_status(const std::string& json) {
  auto j = nlohmann::json::parse(json);
  std::string out = fmt::format("lazymem-agent pid {}: {} session(s)\n", j.value("pid", 0), j["sessions"].size());
  out += fmt::format("{:>6} {:>8} {:<28} {:>10} {:>10} {}\n", "id", "pid", "source", "present", "of", "state");
  for (const auto& s : j["sessions"]) {
    std::string state = s["failed"].get<bool>() ? "FAILED: " + s["failure"].get<std::string>()
                                                : s.value("state", std::string("restoring"));
    if (const uint64_t page = s.value("page_size", uint64_t{4096}); page != 4096) {
      state += fmt::format(" ({} KiB pages)", page >> 10);
    }
    out += fmt::format("{:>6} {:>8} {:<28} {:>10} {:>10} {}\n", s["id"].get<uint64_t>(), s["pid"].get<int>(),
                       s["source"].get<std::string>(), s["chunks_present"].get<uint64_t>(),
                       s["chunks_total"].get<uint64_t>(), state);
  }
  for (const auto& o : j.value("opening", nlohmann::json::array())) {
    out += fmt::format("pid {}: opening {}\n", o["pid"].get<int>(), o["snapshot"].get<std::string>());
  }
  for (const auto& h : j.value("handshakes", nlohmann::json::array())) {
    out += fmt::format("waiting for a Firecracker handshake on {} ({})\n", h["socket"].get<std::string>(),
                       h["snapshot"].get<std::string>());
  }
  return out;
}

std::string format_regions(const std::string& json) {
  auto j = nlohmann::json::parse(json);
  std::string out = fmt::format("{:>8} {:<16} {:>12} {:>10} {:>10} {:>10} {}\n", "pid", "region", "size", "fetched",
                                "zero", "resident%", "source");
  for (const auto& s : j["sessions"]) {
    for (const auto& r : s["stats"]["regions"]) {
      uint64_t len = r["length"].get<uint64_t>();
      uint64_t fetched = r["pages_fault"].get<uint64_t>() + r["pages_prefetch"].get<uint64_t>();
      uint64_t zero = r["pages_zero"].get<uint64_t>();
      double pct = len ? 100.0 * double((fetched + zero) * 4096) / double(len) : 0.0;
      out += fmt::format("{:>8} {:<16} {:>12} {:>10} {:>10} {:>9.1f}% {}\n", s["pid"].get<int>(),
                         r["name"].get<std::string>(), mib(len), fetched, zero, pct, s["source"].get<std::string>());
    }
  }
  return out;
}

std::string format_stats(const std::string& json) {
  auto j = nlohmann::json::parse(json);
  std::string out = fmt::format("{:>8} {:<14} {:>8} {:>9} {:>9} {:>8} {:>11} {:>11} {:>6} {:>7} {:>7} {:>8} {:>10}\n", "pid",
                                "region", "faults", "pg:fault", "pg:prefch", "pg:zero", "wire", "decompr", "ratio",
                                "p50us", "p99us", "maxus", "blocked ms");
  nlohmann::json total = nlohmann::json::object();
  for (const auto& s : j["sessions"]) {
    auto rows = s["stats"]["regions"];
    rows.push_back(s["stats"]["total"]);
    for (const auto& r : rows) {
      uint64_t wire = r["bytes_fetched"].get<uint64_t>(), dec = r["bytes_decompressed"].get<uint64_t>();
      out += fmt::format("{:>8} {:<14} {:>8} {:>9} {:>9} {:>8} {:>11} {:>11} {:>6} {:>7} {:>7} {:>8} {:>10.1f}\n",
                         s["pid"].get<int>(), r["name"].get<std::string>(), r["faults"].get<uint64_t>(),
                         r["pages_fault"].get<uint64_t>(), r["pages_prefetch"].get<uint64_t>(),
                         r["pages_zero"].get<uint64_t>(), mib(wire), mib(dec),
                         wire ? fmt::format("{:.2f}x", double(dec) / double(wire)) : "-",
                         r["latency_us"]["p50"].get<uint64_t>(), r["latency_us"]["p99"].get<uint64_t>(),
                         r["latency_us"]["max"].get<uint64_t>(), double(r["blocked_us"].get<uint64_t>()) / 1000.0);
    }
  }
  return out;
}

}  // namespace lazymem::agent
