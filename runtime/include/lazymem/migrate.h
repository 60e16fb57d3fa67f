// Live migration of this process's regions to another host: pre-copy, then post-copy.
//
// Source host, in the running workload:
//   lazymem::MigrationOptions m;
//   m.precopy.pause = [&] { gate.pause(); };      // park the writers (lazymem/pause_gate.h)
//   m.precopy.resume = [&] { gate.resume(); };    // only if the migration fails before the switch
//   m.precopy.app_state = [&] { return state(); };
//   m.listen = "0.0.0.0:0"; m.advertise = "src.example";
//   auto src = lazymem::MigrationSource::start("lazymem://dst.example:7070/app", regions, {}, m, features);
//   tell_destination((*src)->location());        // the workload is paused here from now on
//   (*src)->wait_postcopy(std::chrono::minutes(5));   // then exit: the destination runs it
//
// Destination host, in a new process of the same program:
//   lazymem::RestoreOptions o; o.base = "lazymem://dst.example:7070/app";
//   auto r = lazymem::LazyRestore::start(location_from_source, o);
//
// Pre-copy: a live capture's rounds (DirtyTracker: Linux 5.13, cheapest from 6.7) store everything into `base`, a
// store or page server near the destination, while the workload runs, and commit it there.
// Switch-over: pause(); the chunks written since the last round are not stored: only their
// checksums are taken, with the application state, into the manifest the source serves; the pause
// costs that and no copying, however much was written. Post-copy: the destination restores
// lazily from the source (RestoreOptions::base: the unchanged chunks come from the base), and
// the chunks left at the source are served from its paused memory, on demand and by prefetch.
//
// The workload is the destination's once start() returns: the source must not resume it (two
// copies would run) and must stay up until wait_postcopy() returns, or the destination loses the
// pages left here (its faulting accesses fail with SIGBUS after RestoreOptions::fault_deadline).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>

#include "lazymem/kernel_features.h"
#include "lazymem/result.h"
#include "lazymem/snapshot.h"

namespace lazymem {

struct MigrationOptions {
  // Pre-copy rounds, and pause/app_state for the switch-over. resume() is called only when the
  // migration fails after pause() (the workload goes on here).
  LiveCaptureOptions precopy;
  // Where the destination fetches the chunks left here: HOST:PORT to listen on (port 0: any),
  // bound before anything else. Anything but loopback needs a token (CaptureOptions::token_file):
  // the paused memory is not served to whoever reaches the port.
  std::string listen = "0.0.0.0:0";
  // The host name or address the destination dials; empty: listen's host (which must then not be
  // a wildcard address).
  std::string advertise;
  // A peer that has not authenticated by then is dropped.
  std::chrono::milliseconds handshake_timeout{10000};
  // A destination that hung up without saying it holds every page (one from before that was
  // said, a connection lost) may come back: post-copy ends only after no connection was open
  // for this long. One that says so ends it at once.
  std::chrono::milliseconds linger{1000};
};

struct MigrationReport {
  CaptureReport precopy;             // the base: first pass and rounds (rounds, stored bytes, time)
  double precopy_seconds = 0;        // start() to the pause
  double switch_seconds = 0;         // pause() to serving: what the source adds to the downtime
  uint64_t written_bytes = 0;        // pages written since the last round (found in the pause)
  uint64_t postcopy_chunks = 0;      // chunks left here, served from memory
  uint64_t postcopy_bytes = 0;       // their bytes
  uint64_t postcopy_zero_chunks = 0; // chunks written since the last round that are now all zero: not served
  bool paused_here = false;          // false: the process was found stopped (or frozen) and is left so
  // wait_postcopy():
  uint64_t served_chunks = 0;        // chunk replies sent (a chunk asked again counts again)
  uint64_t served_bytes = 0;
  double postcopy_seconds = 0;       // serving started to the destination holding every chunk
  bool destination_said_complete = false;  // it said so (else: hung up, and the linger passed)
};

class MigrationSource {
 public:
  // Pre-copy into `base` (a store "<dir>/<name>" or "lazymem://HOST:PORT/NAME", as capture_regions
  // takes, with `options`: its token_file is also what the destination must prove), switch-over,
  // then serves post-copy on a thread of its own. The snapshot is served under the base's name.
  static Result<std::unique_ptr<MigrationSource>> start(const std::string& base, std::span<const CaptureRegion> regions,
                                                        const CaptureOptions& options, const MigrationOptions& migration,
                                                        const KernelFeatures& features);
  ~MigrationSource();  // stops serving

  // lazymem://HOST:PORT/NAME: what the destination restores from, with RestoreOptions::base.
  const std::string& location() const;
  // Returns once the destination has read the manifest, every chunk left here has been sent at
  // least once, and no connection has been open for a second: the destination has hung up, which
  // its restore does once complete (prefetch, the default, or wait_complete() fetches what was
  // not touched). Else kTimeout, saying what is missing. `stop`, if given, is asked every 50 ms
  // at most: true ends the wait (kCancelled; an operator's Ctrl-C), which may be called again.
  Result<MigrationReport> wait_postcopy(std::chrono::milliseconds timeout, const std::function<bool()>& stop = nullptr);
  const MigrationReport& report() const;
  // Calls the migration off, if it can be: when no destination has read the source's manifest
  // yet (none can be running the workload), it is refused to any that comes, serving stops, and
  // resume() gives the workload back to this process. Else kExists: a destination may be running
  // it, and resuming it here would run two copies. Once only.
  Status abort();

  struct Impl;

 private:
  explicit MigrationSource(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace lazymem
