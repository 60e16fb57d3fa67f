// The agent CLI's `snapshot` and `restore` commands.
#include "commands.h"

#include <fmt/format.h>
#include <poll.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <vector>
#include <nlohmann/json.hpp>

#include "lazymem/agent_client.h"
#include "snapshot/manifest.h"
#include "sys/mapping.h"

namespace lazymem::agent {

Result<ProcessRange> parse_process_range(const std::string& text) {
  ProcessRange r;
  std::string span = text;
  if (size_t eq = text.find('='); eq != std::string::npos) {
    span = text.substr(0, eq);
    r.name = text.substr(eq + 1);
  }
  size_t dash = span.find('-');
  if (dash == std::string::npos) return Error(Errc::kInvalidArgument, "--region wants START-END[=NAME] in hex, got " + text);
  try {
    size_t used = 0;
    uint64_t a = std::stoull(span.substr(0, dash), &used, 16);
    if (used != dash) throw std::invalid_argument("start");
    std::string e = span.substr(dash + 1);
    uint64_t b = std::stoull(e, &used, 16);
    if (used != e.size()) throw std::invalid_argument("end");
    if (b <= a || a % 4096 != 0 || b % 4096 != 0) throw std::invalid_argument("range");
    r.start = a;
    r.length = b - a;
  } catch (const std::exception&) {
    return Error(Errc::kInvalidArgument, "--region " + text + ": want START-END in hex, page-aligned, START < END");
  }
  if (r.name.empty()) r.name = fmt::format("{:x}", r.start);
  return r;
}

Status check_process_ranges(const std::vector<ProcessRange>& ranges) {
  if (ranges.empty()) return Error(Errc::kInvalidArgument, "nothing to capture: give --region START-END at least once");
  std::vector<RegionInfo> layout(ranges.size());
  for (size_t i = 0; i < ranges.size(); ++i) {
    layout[i].name = ranges[i].name;
    layout[i].start_address = ranges[i].start;
    layout[i].length = ranges[i].length;
  }
  return snapshot::check_region_layout(layout, Errc::kInvalidArgument);
}

Result<CaptureReport> capture_process(pid_t pid, const std::vector<ProcessRange>& ranges, const std::string& target,
                                      const CaptureOptions& options) {
  LAZYMEM_TRY(check_capture_options(options));  // before copying anything
  LAZYMEM_TRY(check_process_ranges(ranges));
  std::vector<sys::Mapping> copies;
  std::vector<CaptureRegion> regions;
  for (const auto& r : ranges) {
    auto m = sys::Mapping::anonymous_at(r.start, r.length, PROT_READ | PROT_WRITE);
    if (!m.ok()) {
      return std::move(m).error().wrap(fmt::format("region {} ({:#x}-{:#x}) of pid {}: this process uses that range "
                                                   "itself; capture it from a process that does not (e.g. the "
                                                   "application, with capture_regions)",
                                                   r.name, r.start, r.start + r.length, pid));
    }
    // In pieces: a partial read says exactly where the other process's mapping ends. Through a
    // bounce buffer, and a page is copied only if it holds something: the copy is then no
    // larger than what the process has written (an untouched 4 GiB reservation reads as zeros
    // and costs nothing here, where copying it cost 4 GiB).
    constexpr size_t kPiece = 4 << 20, kPageSize = 4096;  // ranges are 4 KiB aligned (parse_process_range)
    std::vector<std::byte> bounce(std::min(kPiece, r.length));
    for (size_t off = 0; off < r.length; off += kPiece) {
      size_t n = std::min(kPiece, r.length - off);
      iovec local{bounce.data(), n};
      iovec remote{reinterpret_cast<void*>(r.start + off), n};
      ssize_t got = ::process_vm_readv(pid, &local, 1, &remote, 1, 0);
      if (got != static_cast<ssize_t>(n)) {
        int err = got < 0 ? errno : EFAULT;
        if (err == ESRCH) return Error(Errc::kNotFound, fmt::format("no process {}", pid), err);
        return sys_error(fmt::format("read {:#x}-{:#x} of pid {} (is that range mapped and readable there? "
                                     "see /proc/{}/maps)",
                                     r.start + off + (got > 0 ? static_cast<size_t>(got) : 0), r.start + off + n, pid, pid),
                         err);
      }
      for (size_t p = 0; p < n; p += kPageSize) {
        const std::byte* page = bounce.data() + p;
        if (page[0] == std::byte{0} && std::memcmp(page, page + 1, kPageSize - 1) == 0) continue;
        std::memcpy(static_cast<std::byte*>(m->data()) + off + p, page, kPageSize);
      }
    }
    regions.push_back(CaptureRegion{r.name, m->data(), r.length, PROT_READ | PROT_WRITE});
    copies.push_back(std::move(*m));
  }
  return capture_regions(target, regions, options);
}

std::string format_capture_table(const CaptureReport& r) {
  return fmt::format(
      "snapshot      {}\n"
      "bytes         {:.1f} MiB\n"
      "stored        {:.1f} MiB ({:.2f}x)\n"
      "chunks        {} ({} zero, {} raw, {} zstd)\n"
      "time          {:.2f} s ({:.0f} MiB/s)\n",
      r.location, double(r.total_bytes) / 1048576.0, double(r.stored_bytes) / 1048576.0,
      r.stored_bytes ? double(r.total_bytes) / double(r.stored_bytes) : 0.0, r.chunks, r.zero_chunks, r.raw_chunks,
      r.zstd_chunks, r.seconds, r.seconds > 0 ? double(r.total_bytes) / 1048576.0 / r.seconds : 0.0);
}

std::string format_capture_json(const CaptureReport& r) {
  nlohmann::json j{{"location", r.location},     {"total_bytes", r.total_bytes}, {"stored_bytes", r.stored_bytes},
                   {"chunks", r.chunks},         {"zero_chunks", r.zero_chunks}, {"raw_chunks", r.raw_chunks},
                   {"zstd_chunks", r.zstd_chunks}, {"seconds", r.seconds}};
  return j.dump();
}

void draw_progress(uint64_t done, uint64_t total, const char* unit) {
  constexpr int kWidth = 40;
  double f = total ? double(done) / double(total) : 0.0;
  int fill = static_cast<int>(f * kWidth);
  std::fprintf(stderr, "\r[%s%s] %5.1f%%  %lu/%lu %s", std::string(static_cast<size_t>(fill), '#').c_str(),
               std::string(static_cast<size_t>(kWidth - fill), '.').c_str(), f * 100.0, static_cast<unsigned long>(done),
               static_cast<unsigned long>(total), unit);
  std::fflush(stderr);
}

Status restore_firecracker(const FirecrackerRestoreConfig& c) {
  FirecrackerServeOptions o;
  o.socket_path = c.handshake_socket;
  o.snapshot = c.snapshot;
  o.token_file = c.token_file;
  o.prefetch = c.prefetch;
  o.cancel_on_close = c.wait;  // interrupted while it waits: nothing is left armed
  LAZYMEM_ASSIGN_OR_RETURN(auto serve, AgentFirecrackerServe::start(c.agent_socket, o));
  // One line once the socket accepts: scripts start Firecracker on it.
  std::printf("listening on %s\n", c.handshake_socket.c_str());
  std::fflush(stdout);
  if (!c.wait) return ok_status();
  // The agent reports the handshake and the end on our connection; the progress bar (a
  // terminal's display only) is redrawn from `status` between reports.
  const auto refresh = std::chrono::milliseconds(c.progress ? 250 : 24 * 3600 * 1000);
  while (!serve->complete() && !serve->exited()) {
    Status s = serve->wait_event(refresh);
    if (s.ok()) continue;
    if (s.error().code() != Errc::kTimeout) {
      if (c.progress) std::fprintf(stderr, "\n");
      return s;
    }
    if (serve->session() == 0) continue;  // Firecracker has not connected yet
    auto js = agent_query(c.agent_socket, false);
    if (!js.ok()) continue;
    auto j = nlohmann::json::parse(*js);  // (kept: the loop below refers into it)
    for (const auto& e : j["sessions"]) {
      if (e["id"].get<uint64_t>() == serve->session()) {
        draw_progress(e["chunks_present"].get<uint64_t>(), e["chunks_total"].get<uint64_t>(), "chunks");
      }
    }
  }
  if (c.progress) std::fprintf(stderr, "\n");
  // A VM that ends before every page was restored is not a failure: it needs no more pages.
  std::printf("%s: session %lu\n", serve->complete() ? "restore complete" : "VM exited before its restore completed",
              static_cast<unsigned long>(serve->session()));
  return ok_status();
}

}  // namespace lazymem::agent
