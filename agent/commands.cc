// The agent CLI's `snapshot` and `restore` commands.
#include "commands.h"

#include <fmt/format.h>
#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <vector>
#include <nlohmann/json.hpp>

#include "lazymem/agent_client.h"
#include "lazymem/kernel_features.h"
#include "snapshot/manifest.h"
#include "precopy.h"
#include "process_mirror.h"
#include "sys/cgroup_freeze.h"
#include "sys/process_maps.h"
#include "sys/unique_fd.h"

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

namespace {

// The ranges as regions at their addresses in the other process (LiveCaptureOptions::pid).
std::vector<CaptureRegion> regions_of(const std::vector<ProcessRange>& ranges) {
  std::vector<CaptureRegion> regions;
  for (const auto& r : ranges) {
    regions.push_back(CaptureRegion{r.name, reinterpret_cast<const void*>(r.start), r.length, PROT_READ | PROT_WRITE});
  }
  return regions;
}

}  // namespace

Result<CaptureReport> capture_process(pid_t pid, const std::vector<ProcessRange>& ranges_in, const std::string& target,
                                      const CaptureOptions& options, bool freeze,
                                      const std::function<void()>& resumed) {
  // Once, as soon as the process goes on, however this ends.
  struct Resumed {
    const std::function<void()>& call;
    bool called = false;
    void operator()() {
      if (!called && call) call();
      called = true;
    }
    ~Resumed() { (*this)(); }
  } resumed_once{resumed};
  LAZYMEM_TRY(check_capture_options(options));  // before copying anything
  LAZYMEM_TRY(check_process_ranges(ranges_in));
  std::vector<AddressRange> ranges;
  for (const auto& r : ranges_in) ranges.push_back({r.start, r.length});
  // Everything that can be refused is, before the process is paused. Its huge-page memory is
  // recorded as such (the copy here is on ordinary pages).
  LAZYMEM_ASSIGN_OR_RETURN(std::vector<CaptureRegion> regions, with_huge_page_sizes(regions_of(ranges_in), pid));
  LiveCaptureOptions how;
  how.pid = pid;
  how.freeze_cgroup = freeze;
  LAZYMEM_TRY(check_pausable(how));
  // Copied first into a mirror at the same addresses (the snapshot records them), holding only
  // the pages the process has written, while it is paused: then it goes on while the copy is
  // compressed and stored. A process found paused is left so.
  auto mirror = ProcessMirror::create(pid, ranges);
  if (!mirror.ok()) {
    if (mirror.error().code() != Errc::kExists) return std::move(mirror).error();
    return std::move(mirror).error().wrap("capture it from a process that does not (e.g. the application, with "
                                          "capture_regions)");
  }
  const auto paused_at = std::chrono::steady_clock::now();
  LAZYMEM_ASSIGN_OR_RETURN(WorkloadPause pause, pause_workload(how));
  {
    ResumeOnExit resume{pause.resume};
    LAZYMEM_TRY(mirror->fill());
    if (pause.still_paused) LAZYMEM_TRY(pause.still_paused());
  }
  const double paused = std::chrono::duration<double>(std::chrono::steady_clock::now() - paused_at).count();
  resumed_once();
  LAZYMEM_ASSIGN_OR_RETURN(CaptureReport report, capture_regions(target, regions, options));
  report.paused_seconds = paused;
  return report;
}

// The operator's progress line of a migration's pass over the memory (stderr, where the
// migration reports too; `snapshot --live` draws its bar there on a terminal instead).
static void print_pass(unsigned pass, uint64_t bytes) {
  std::fprintf(stderr, "pre-copy pass %u: %.1f MiB %s\n", pass, double(bytes) / 1048576.0,
               pass == 1 ? "stored" : "written meanwhile, stored again");
}

Result<CaptureReport> capture_process_live(pid_t pid, const std::vector<ProcessRange>& ranges, const std::string& target,
                                           const CaptureOptions& options, bool freeze, DirtyMethod tracking,
                                           std::function<bool()> interrupted) {
  LAZYMEM_TRY(check_capture_options(options));
  LAZYMEM_TRY(check_process_ranges(ranges));
  LiveCaptureOptions live;
  live.pid = pid;
  live.freeze_cgroup = freeze;
  live.tracking = tracking;
  live.cancelled = std::move(interrupted);
  auto r = capture_regions_live(target, regions_of(ranges), options, live, probe_kernel());
  if (!r.ok()) return std::move(r).error().wrap(fmt::format("live capture of process {}", pid));
  return r;
}

Status migrate_process(const MigrateConfig& c) {
  LAZYMEM_TRY(check_capture_options(c.capture));
  LAZYMEM_TRY(check_process_ranges(c.ranges));
  const std::vector<CaptureRegion> regions = regions_of(c.ranges);
  LAZYMEM_TRY(sys::check_process(c.pid));
  // Held from the start: the process killed at the end is this one, not one that took its pid.
  sys::UniqueFd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, c.pid, 0)));
  if (!pidfd.valid()) return sys_error(fmt::format("process {}", c.pid), errno);
  MigrationOptions mo = c.migration;
  mo.precopy.pid = c.pid;
  mo.precopy.freeze_cgroup = c.freeze;
  mo.precopy.tracking = c.tracking;
  mo.precopy.cancelled = c.interrupted;
  mo.precopy.on_pass = print_pass;
  // Thawed after the kill, if this froze it, so that the cgroup is left as found.
  std::string cgroup;
  if (c.freeze) {
    LAZYMEM_ASSIGN_OR_RETURN(cgroup, sys::cgroup_of(c.pid));  // checked by the pre-copy, before it starts
  }
  const char* paused = c.freeze ? "frozen" : "stopped";
  const std::string resume_it =
      c.freeze ? fmt::format("thaw it: echo 0 > {}/cgroup.freeze", cgroup) : std::string("continue it: SIGCONT");
  const auto started = std::chrono::steady_clock::now();
  auto src = MigrationSource::start(c.base, regions, c.capture, mo, probe_kernel());
  if (!src.ok()) return std::move(src).error().wrap(fmt::format("migrating process {}", c.pid));
  const MigrationReport& r = (*src)->report();
  // The line a script waits for: the destination may restore from there now.
  std::printf("source: %s\n", (*src)->location().c_str());
  std::fflush(stdout);
  std::fprintf(stderr,
               "pre-copy: %.1f MiB stored in %u passes (writes tracked by %s), %.0f ms; process %d %s %.2f ms before "
               "serving; %llu chunks (%.1f MiB) written since are served from here\n",
               double(r.precopy.stored_bytes) / 1048576.0, r.precopy.rounds, dirty_method_name(r.precopy.tracking),
               r.precopy_seconds * 1e3, c.pid, paused,
               r.switch_seconds * 1e3, static_cast<unsigned long long>(r.postcopy_chunks),
               double(r.postcopy_bytes) / 1048576.0);
  // Interrupted during the switch-over: called off before the wait, if no destination came yet.
  const auto wait_until = std::chrono::steady_clock::now() + c.postcopy_timeout;
  Result<MigrationReport> done = Error(Errc::kCancelled, "interrupted");
  if (!(c.interrupted && c.interrupted())) done = (*src)->wait_postcopy(c.postcopy_timeout, c.interrupted);
  if (!done.ok()) {
    const bool interrupted = done.error().code() == Errc::kCancelled;
    Error why = interrupted ? Error(Errc::kCancelled, "interrupted") : done.error();
    if ((*src)->abort().ok()) {
      return why.wrap(fmt::format("migration called off, process {} {} here", c.pid,
                                  (*src)->report().paused_here ? (c.freeze ? "thawed" : "continued") : paused));
    }
    if (interrupted) {
      // A destination restores from here: leaving now would fail it (its pages not yet sent are
      // here only). Served to the end; a second Ctrl-C ends the agent at once.
      std::fprintf(stderr, "a destination is restoring process %d from here: stopping now would fail it; serving it "
                   "to the end (Ctrl-C again to stop at once)\n", c.pid);
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(wait_until - std::chrono::steady_clock::now());
      done = (*src)->wait_postcopy(std::max(left, std::chrono::milliseconds(1)));
      if (!done.ok()) why = done.error();
    }
    if (!done.ok()) {
      return why.wrap(fmt::format("process {} is left {}: a destination has read its manifest and may be running it; "
                                  "kill it (or {}) once you know which copy should run",
                                  c.pid, paused, resume_it));
    }
  }
  if (!c.leave_stopped) {
    // The destination runs it now. The cgroup is thawed only once the kill is pending (a thawed
    // process then never runs again), and only if this migration froze it.
    if (::syscall(SYS_pidfd_send_signal, pidfd.get(), SIGKILL, nullptr, 0) != 0 && errno != ESRCH) {
      return sys_error(fmt::format("the destination holds everything, but killing process {} failed; it is left {}: "
                                   "kill it",
                                   c.pid, paused),
                       errno);
    }
    if (c.freeze && done->paused_here) sys::thaw_cgroup(cgroup);
  }
  const char* outcome = !c.leave_stopped ? "killed" : c.freeze ? "frozen" : "stopped";
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  if (c.json) {
    nlohmann::json j{{"source", (*src)->location()},
                     {"precopy_stored_bytes", done->precopy.stored_bytes},
                     {"precopy_rounds", done->precopy.rounds},
                     {"tracking", dirty_method_name(done->precopy.tracking)},
                     {"precopy_seconds", done->precopy_seconds},
                     {"switch_seconds", done->switch_seconds},
                     {"written_bytes", done->written_bytes},
                     {"postcopy_chunks", done->postcopy_chunks},
                     {"postcopy_bytes", done->postcopy_bytes},
                     {"served_chunks", done->served_chunks},
                     {"served_bytes", done->served_bytes},
                     {"postcopy_seconds", done->postcopy_seconds},
                     {"destination_said_complete", done->destination_said_complete},
                     {"seconds", total},
                     {"process", outcome}};
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("post-copy: %llu chunk replies (%.1f MiB) served in %.0f ms (%s); migration took %.0f ms in all; process "
                "%d %s\n",
                static_cast<unsigned long long>(done->served_chunks), double(done->served_bytes) / 1048576.0,
                done->postcopy_seconds * 1e3,
                done->destination_said_complete ? "the destination said it holds every page"
                                                : "the destination hung up, and did not come back",
                total * 1e3, c.pid, c.leave_stopped ? fmt::format("left {}", outcome).c_str() : outcome);
  }
  return ok_status();
}

std::string format_capture_table(const CaptureReport& r) {
  std::string live;
  if (r.rounds > 0) {
    live = fmt::format("live          {} passes, writes tracked by {}; paused {:.2f} ms, for the last\n", r.rounds,
                       dirty_method_name(r.tracking), r.paused_seconds * 1e3);
  } else if (r.paused_seconds > 0) {
    live = fmt::format("paused        {:.2f} ms, while its memory was copied\n", r.paused_seconds * 1e3);
  }
  return fmt::format(
      "snapshot      {}\n"
      "bytes         {:.1f} MiB\n"
      "stored        {:.1f} MiB ({:.2f}x)\n"
      "chunks        {} ({} zero, {} raw, {} zstd)\n"
      "time          {:.2f} s ({:.0f} MiB/s)\n",
      r.location, double(r.total_bytes) / 1048576.0, double(r.stored_bytes) / 1048576.0,
      r.stored_bytes ? double(r.total_bytes) / double(r.stored_bytes) : 0.0, r.chunks, r.zero_chunks, r.raw_chunks,
      r.zstd_chunks, r.seconds, r.seconds > 0 ? double(r.total_bytes) / 1048576.0 / r.seconds : 0.0) +
         live;
}

std::string format_capture_json(const CaptureReport& r) {
  nlohmann::json j{{"location", r.location},     {"total_bytes", r.total_bytes}, {"stored_bytes", r.stored_bytes},
                   {"chunks", r.chunks},         {"zero_chunks", r.zero_chunks}, {"raw_chunks", r.raw_chunks},
                   {"zstd_chunks", r.zstd_chunks}, {"seconds", r.seconds}};
  if (r.rounds > 0) {
    j["rounds"] = r.rounds;
    j["tracking"] = dirty_method_name(r.tracking);
    j["superseded_bytes"] = r.superseded_bytes;
    j["paused_seconds"] = r.paused_seconds;
  }
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
