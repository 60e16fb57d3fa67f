// The agent CLI's `snapshot`, `migrate` and `restore` commands: the work behind them (main.cc only parses
// options into these structs).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <string>
#include <vector>

#include "lazymem/result.h"
#include "lazymem/migrate.h"
#include "lazymem/snapshot.h"

namespace lazymem::agent {

// One range of another process's memory: START-END in hex, as in /proc/PID/maps.
struct ProcessRange {
  std::string name;
  uintptr_t start = 0;
  size_t length = 0;
};

// Parses "START-END[=NAME]" (hex, page-aligned).
Result<ProcessRange> parse_process_range(const std::string& text);

// What capture_process checks of `ranges` before it reads anything: at least one, names and
// overlaps as in any snapshot. The CLI checks its --region flags with it first (a usage error).
Status check_process_ranges(const std::vector<ProcessRange>& ranges);

// Captures ranges of process `pid` into `target`. The bytes are read with process_vm_readv into
// a mapping at the same addresses in this process (the snapshot records addresses; a restore
// maps them there), so a range this process already uses cannot be captured: a clear error.
// For a consistent image the process is paused while they are read — stopped (SIGSTOP), or with
// `freeze` its cgroup (v2, holding it alone) frozen — and goes on while they are compressed and
// stored (CaptureReport::paused_seconds). A process found stopped or frozen is left so.
// `resumed`, if given, is called once it goes on (or was never paused).
Result<CaptureReport> capture_process(pid_t pid, const std::vector<ProcessRange>& ranges, const std::string& target,
                                      const CaptureOptions& options, bool freeze,
                                      const std::function<void()>& resumed = nullptr);
// The same while the process runs (capture_regions_live with LiveCaptureOptions::pid): its
// writes are tracked, and it is paused only for the last round: stopped (SIGSTOP), or with
// `freeze`, its cgroup (v2, holding it alone) frozen. Its writes are tracked as `tracking` says.
// `interrupted` (an operator's Ctrl-C) stops it before the pause, with nothing stored.
Result<CaptureReport> capture_process_live(pid_t pid, const std::vector<ProcessRange>& ranges, const std::string& target,
                                           const CaptureOptions& options, bool freeze, DirtyMethod tracking,
                                           std::function<bool()> interrupted);

std::string format_capture_table(const CaptureReport& r);
std::string format_capture_json(const CaptureReport& r);

// A progress bar redrawn in place on stderr (for a terminal):
// [#####.....]  45.0%  1234/2742 chunks
void draw_progress(uint64_t done, uint64_t total, const char* unit);

struct MigrateConfig {
  pid_t pid = 0;
  std::vector<ProcessRange> ranges;
  std::string base;  // STORE/NAME or lazymem://HOST:PORT/NAME near the destination
  CaptureOptions capture;
  MigrationOptions migration;  // listen, advertise, pre-copy rounds (pid is set from `pid`)
  std::chrono::seconds postcopy_timeout{300};
  bool leave_stopped = false;  // after post-copy; else the process is killed (the destination runs it)
  bool freeze = false;         // paused by freezing its cgroup (v2, holding it alone), not SIGSTOP
  DirtyMethod tracking = DirtyMethod::kAuto;  // how its writes are tracked during the pre-copy
  bool json = false;
  // An operator's Ctrl-C, asked while the process runs (pre-copy: it is never paused) and while
  // post-copy is awaited (called off and resumed if no destination has read the manifest yet).
  std::function<bool()> interrupted;
};

// `lazymem-agent migrate --pid PID`: migrates the memory of a process that does not link
// liblazymem (pre-copy into `base`, SIGSTOP or the cgroup freezer, post-copy from the copy kept here), printing
// "source: lazymem://HOST:PORT/NAME" once the destination may restore from it. After the
// post-copy the process is killed (the destination runs it now) unless `leave_stopped`. If no
// destination comes in time, the migration is called off and the process continued.
Status migrate_process(const MigrateConfig& config);

struct FirecrackerRestoreConfig {
  std::string agent_socket;
  std::string handshake_socket;
  std::string snapshot;
  std::string token_file;
  bool prefetch = true;
  bool wait = true;       // until the VM's memory is complete (or failed)
  bool progress = false;  // a progress bar on stderr (a terminal)
};

// `lazymem-agent restore --firecracker-socket PATH --snapshot URI`: has the agent make the
// handshake socket, prints "listening on PATH" (start Firecracker then), and with `wait` follows
// the restore to its end.
Status restore_firecracker(const FirecrackerRestoreConfig& config);

}  // namespace lazymem::agent
