// Snapshots: what they hold (Manifest) and how to capture one.
//
// A snapshot is a manifest (regions, and per chunk its codec, place and checksum) plus a data
// file of stored chunks. It lives in a store directory as <store>/<name>/, or on a page server
// as lazymem://HOST:PORT/NAME. See docs/snapshot-format.md.
#pragma once

#include <sys/mman.h>
#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "lazymem/dirty.h"
#include "lazymem/kernel_features.h"
#include "lazymem/result.h"

namespace lazymem {

constexpr uint32_t kDefaultChunkSize = 64 * 1024;
constexpr uint32_t kMinChunkSize = 4096;
constexpr uint32_t kMaxChunkSize = 4 * 1024 * 1024;

// kZstd: one zstd frame per chunk (format v1). kZstdPages: one frame per page, with the
// snapshot's dictionary, so a fault decodes only its own page (format v2).
enum class Codec : uint8_t { kZero = 0, kRaw = 1, kZstd = 2, kZstdPages = 3 };
const char* codec_name(Codec c);

struct ChunkInfo {
  Codec codec = Codec::kZero;
  uint64_t offset = 0;       // in the data file
  uint32_t stored_length = 0;
  uint64_t checksum = 0;     // xxh3-64 of the uncompressed bytes
  uint64_t stored_checksum = 0;  // kZstdPages: xxh3-64 of the stored bytes (checked before any page is decoded)
};

enum class RegionKind : uint8_t { kProcess = 0, kRawFile = 1 };

struct RegionInfo {
  std::string name;
  uint64_t start_address = 0;  // where it was mapped (kProcess); 0 for kRawFile
  uint64_t length = 0;
  uint32_t page_size = 4096;  // the codec's page (format 2 page frames), not the memory's
  uint32_t protection = PROT_READ | PROT_WRITE;
  RegionKind kind = RegionKind::kProcess;
  std::vector<ChunkInfo> chunks;
  // Huge-page memory (hugetlbfs) when captured: its page size, which a restore maps it with;
  // 0: ordinary pages.
  uint64_t huge_page_size = 0;
};

struct Manifest {
  uint32_t chunk_size = kDefaultChunkSize;
  std::vector<RegionInfo> regions;
  std::vector<std::byte> app_state;
  std::vector<uint64_t> working_set;
  uint64_t created_unix_ns = 0;
  uint64_t data_length = 0;
  int32_t compression_level = 1;
  std::vector<std::byte> dictionary;  // zstd dictionary of the kZstdPages chunks (may be empty)
  uint32_t format_version = 2;        // as read; writers always write the current version's header
  // The manifest's own checksum (xxh3-64 of its body, from its header), as read: names this
  // version of the snapshot (a page server keeps serving it to restores that read it after the
  // store's copy is replaced). 0 for a manifest not read from bytes.
  uint64_t checksum = 0;

  // Bytes of chunk `chunk` of region `region` once decompressed (the last chunk may be short).
  uint32_t chunk_length(size_t region, size_t chunk) const;
  uint64_t total_bytes() const;   // sum of region lengths
  uint64_t stored_bytes() const;  // sum of stored chunk lengths
};

// Where a snapshot lives: a directory "<store>/<name>" or "lazymem://HOST:PORT/NAME", or on any of
// several page servers, "lazymem://HOST1:PORT1,HOST2:PORT2/NAME" (a store they share, or copies of
// it): a restore that loses its server goes on with the next (a restore's connections name the
// version they read, so another server serves it that version or refuses, never another's).
struct SnapshotLocation {
  struct Server {
    std::string host;
    uint16_t port = 0;
    std::string to_string() const;  // HOST:PORT ([HOST]:PORT for IPv6)
    // HOST:PORT or [V6]:PORT, PORT 1-65535; 0 too where `any_port` (a listener: the kernel picks).
    static Result<Server> parse(std::string_view hostport, bool any_port = false);
  };
  std::string store_dir;  // local store; empty for a remote one
  std::string host;       // page server (remote): the first one
  uint16_t port = 0;
  std::vector<Server> more_servers;  // the others, in order
  std::string name;

  // Every page server: host:port, then more_servers.
  std::vector<Server> servers() const;
  // The same snapshot on server `i` of servers() alone (modulo their number): names the server
  // that answered, in messages.
  SnapshotLocation at(size_t i) const;

  bool remote() const { return !host.empty(); }
  std::string to_string() const;
  static Result<SnapshotLocation> parse(const std::string& text);
  // Snapshot `name` of local store `store_dir`. The name is checked as given (1-200 characters,
  // no '/' or NUL, not starting with '.'): a name from the network or a --name flag never
  // leads out of the store ("../x", "a/../b").
  static Result<SnapshotLocation> in_store(const std::string& store_dir, const std::string& name);
};

struct CaptureOptions {
  uint32_t chunk_size = kDefaultChunkSize;
  int zstd_level = 1;
  // 2: pages compressed one by one with a dictionary trained on the snapshot (a fault decodes
  // one page). 1: one frame per chunk, for readers older than format v2.
  uint32_t format_version = 2;
  unsigned threads = 0;                  // compression threads; 0 = one per core
  std::vector<std::byte> app_state;      // opaque blob returned by restore
  bool replace = false;                  // replace an existing snapshot of the same name
  std::string token_file;                // page-server token, for lazymem:// targets
  // Called on the capturing thread as chunks are stored: bytes of all regions done so far, and
  // in all (a progress bar's input). Called once per 256 chunks.
  std::function<void(uint64_t done, uint64_t total)> progress;
};

// One range of the calling process's memory to capture.
struct CaptureRegion {
  std::string name;
  const void* address = nullptr;
  size_t length = 0;  // a multiple of the page size
  int protection = PROT_READ | PROT_WRITE;
  // The memory's huge page size (hugetlbfs), recorded so that a restore maps huge pages; 0:
  // looked up in this process's mappings (capture_regions; a live capture of another process
  // looks there), where the region must not mix page sizes.
  uint64_t huge_page_size = 0;
};

struct CaptureReport {
  std::string location;
  uint64_t total_bytes = 0;
  uint64_t stored_bytes = 0;
  uint64_t chunks = 0;
  uint64_t zero_chunks = 0;
  uint64_t raw_chunks = 0;
  uint64_t zstd_chunks = 0;
  double seconds = 0;
  // Live captures (capture_regions_live) only.
  uint64_t superseded_bytes = 0;  // older versions of chunks stored again, left unreferenced in the data file
  unsigned rounds = 0;            // passes over the memory: the first, the pre-copy rounds, the paused one
  double paused_seconds = 0;      // from pause() to resume()
  DirtyMethod tracking = DirtyMethod::kAuto;  // how writes were tracked (kAuto: they were not)
};

// What capture_regions and capture_raw_file check of `options` before any work (chunk size,
// format, zstd level). A program checks its flags with it first: then a wrong one is refused as
// such, and the capture's own kInvalidArgument errors (a syscall's EINVAL among them) stay failures.
Status check_capture_options(const CaptureOptions& options);

// Captures `regions` of this process (plus options.app_state) into a snapshot at `target`.
// The snapshot appears atomically: a failed or interrupted capture leaves nothing under its name.
Result<CaptureReport> capture_regions(const std::string& target, std::span<const CaptureRegion> regions,
                                      const CaptureOptions& options);

// A live capture's rounds and its pause (capture_regions_live).
struct LiveCaptureOptions {
  unsigned max_rounds = 10;              // pre-copy rounds after the first pass, at most
  // How its writes are tracked between rounds (lazymem/dirty.h): by the kernel's marks where it
  // has them, unless told otherwise.
  DirtyMethod tracking = DirtyMethod::kAuto;
  uint64_t converged_bytes = 8u << 20;   // pre-copying stops once a round finds this little written
  // Stop and restart the process's writers (its other threads): called once each, pause before
  // the last round, resume right after it (before the commit), also when the capture fails
  // after pause. Both are required: without a pause the snapshot could hold a torn state.
  // lazymem::PauseGate (lazymem/pause_gate.h) is one way to park them.
  std::function<void()> pause;
  std::function<void()> resume;
  // Optional, called during the pause: the application state blob stored with the snapshot
  // (instead of CaptureOptions::app_state), so that it describes the memory as it was then.
  std::function<std::vector<std::byte>()> app_state;
  // Whose regions: 0, this process's. Another process's, which need not link liblazymem (the
  // agent's `migrate --pid`): CaptureRegion::address is then an address in that process, whose
  // memory is read (process_vm_readv) into a copy at the same addresses in this one, which must
  // not use them itself; that copy holds what the process has written, until the capture ends.
  // Its dirty pages are tracked through a userfaultfd it is made to open (ptrace, x86_64: needs
  // ptrace rights over it). Without pause and resume, it is paused with SIGSTOP (every thread
  // waited for, at most stop_timeout) and resumed with SIGCONT.
  pid_t pid = 0;
  std::chrono::milliseconds stop_timeout{5000};
  // With pid: paused by freezing its cgroup (v2, cgroup.freeze) instead of SIGSTOP, and thawed
  // after. It is not told: its parent sees no stop (no SIGCHLD), a supervisor does not react. The
  // cgroup must hold it alone (checked before anything is done).
  bool freeze_cgroup = false;
  // Polled between passes and before the pause: true stops the capture there (kCancelled), the
  // workload never paused and nothing committed. For an operator's Ctrl-C.
  std::function<bool()> cancelled;
  // Optional, called after each pass over the memory, before the pause: its number (1: the
  // first, which stores everything) and the bytes it stored (later passes: those written
  // meanwhile). An operator's progress line; a pass that never ends shows as no next line.
  std::function<void(unsigned pass, uint64_t bytes)> on_pass;
};

// Captures `regions` of this process while it keeps running, as a pre-copy migration does: a
// first pass stores everything with dirty-page tracking armed (DirtyTracker: Linux 5.13, cheapest from 6.7), each
// round then stores again the chunks written meanwhile, until one finds at most
// `live.converged_bytes` or `live.max_rounds` have run; then pause(), the last chunks written,
// resume(), commit. The process stops for that last round only. The data file keeps the older
// versions of chunks stored again (CaptureReport::superseded_bytes); the manifest points at the
// last ones. Same target and options as capture_regions. Each chunk is copied before it is
// encoded, so what is stored is one moment's bytes. The regions must be private memory
// (DirtyTracker's limits apply) that no thread of the capture itself writes (not the malloc
// heap it allocates from): those writes would land after the pause's last look.
// Tracking splits the regions' transparent huge pages where they are written.
Result<CaptureReport> capture_regions_live(const std::string& target, std::span<const CaptureRegion> regions,
                                           const CaptureOptions& options, const LiveCaptureOptions& live,
                                           const KernelFeatures& features);

// Captures a raw memory file (e.g. a VM's guest memory image) as one kRawFile region.
Result<CaptureReport> capture_raw_file(const std::string& target, const std::string& file,
                                       const CaptureOptions& options);

// Reads and validates a snapshot's manifest (local or remote).
Result<Manifest> read_manifest(const std::string& location, const std::string& token_file = "");

struct VerifyReport {
  uint64_t chunks = 0;        // stored chunks read (zero chunks store nothing)
  uint64_t stored_bytes = 0;  // as stored (compressed)
  uint64_t bytes = 0;         // decoded
  std::vector<std::string> damaged;  // one line per chunk that failed: where, and why
  double seconds = 0;
};

// Reads every stored chunk of a snapshot (local, or through a page server: the whole path a
// restore would take) and checks that it decodes to its checksum. Damaged chunks are listed
// in the report; an error means the snapshot could not be read at all, or (kTimeout) its
// source stopped answering for `stalled_after`.
Result<VerifyReport> verify_snapshot(const std::string& location, const std::string& token_file = "",
                                     std::chrono::milliseconds stalled_after = std::chrono::seconds(30));

}  // namespace lazymem
