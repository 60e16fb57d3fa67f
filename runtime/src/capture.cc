// Capturing memory (this process's regions, or a raw memory file) into a snapshot.
#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>

#include "lazymem/dirty.h"
#include "lazymem/snapshot.h"
#include "precopy.h"
#include "sys/process_maps.h"
#include "net/remote.h"
#include "snapshot/manifest.h"
#include "snapshot/snapshot_writer.h"
#include "snapshot/store.h"
#include "sys/mapping.h"
#include "sys/cgroup_freeze.h"
#include "sys/process_stop.h"
#include "sys/unique_fd.h"

namespace lazymem {
namespace {

Result<std::unique_ptr<snapshot::SnapshotSink>> open_sink(const std::string& target, const CaptureOptions& options) {
  LAZYMEM_ASSIGN_OR_RETURN(SnapshotLocation loc, SnapshotLocation::parse(target));
  if (loc.remote()) return net::open_remote_sink(loc, options);
  return snapshot::open_local_sink(loc, options.replace);
}

}  // namespace

Status check_capture_options(const CaptureOptions& o) {
  if (o.chunk_size < kMinChunkSize || o.chunk_size > kMaxChunkSize || (o.chunk_size & (o.chunk_size - 1)) != 0) {
    return Error(Errc::kInvalidArgument, fmt::format("chunk size {} must be a power of two from {} to {}", o.chunk_size,
                                                     kMinChunkSize, kMaxChunkSize));
  }
  if (o.format_version < 1 || o.format_version > 2) {
    return Error(Errc::kInvalidArgument, fmt::format("snapshot format {} does not exist (1 or 2)", o.format_version));
  }
  if (o.zstd_level < -7 || o.zstd_level > 22) {
    return Error(Errc::kInvalidArgument, fmt::format("zstd level {} is outside -7..22", o.zstd_level));
  }
  return ok_status();
}

namespace {

// Everything capture_regions checks before any work: options, and regions page-aligned,
// non-empty and not overlapping.
Status check_capture_regions(std::span<const CaptureRegion> regions, const CaptureOptions& options, uint32_t page) {
  LAZYMEM_TRY(check_capture_options(options));
  std::vector<RegionInfo> layout;
  for (const auto& r : regions) {
    if (r.address == nullptr || r.length == 0 || r.length % page != 0 || reinterpret_cast<uintptr_t>(r.address) % page != 0) {
      return Error(Errc::kInvalidArgument, fmt::format("region '{}': address and length must be page aligned and non-empty",
                                                       snapshot::escape_name(r.name)));
    }
    RegionInfo info;
    info.name = r.name;
    info.start_address = reinterpret_cast<uintptr_t>(r.address);
    info.length = r.length;
    layout.push_back(std::move(info));
  }
  return snapshot::check_region_layout(layout, Errc::kInvalidArgument);
}

// The first pass of every capture of this process's regions: dictionary, then every chunk.
Status store_regions(snapshot::SnapshotWriter& writer, std::span<const CaptureRegion> regions,
                     const CaptureOptions& options, uint32_t page) {
  std::vector<std::span<const std::byte>> spans;
  for (const auto& r : regions) spans.emplace_back(static_cast<const std::byte*>(r.address), r.length);
  LAZYMEM_TRY(writer.train(spans, page));
  uint64_t total = 0, before = 0;
  for (const auto& r : regions) total += r.length;
  snapshot::SnapshotWriter::Progress progress;
  if (options.progress) progress = [&](uint64_t done, uint64_t) { options.progress(before + done, total); };
  for (const auto& r : regions) {
    RegionInfo meta;
    meta.name = r.name;
    meta.start_address = reinterpret_cast<uintptr_t>(r.address);
    meta.length = r.length;
    meta.page_size = page;
    meta.protection = static_cast<uint32_t>(r.protection);
    meta.kind = RegionKind::kProcess;
    meta.huge_page_size = r.huge_page_size;
    LAZYMEM_TRY(writer.add_region(std::move(meta), {static_cast<const std::byte*>(r.address), r.length}, progress));
    before += r.length;
  }
  return ok_status();
}

// The chunks that `dirty` (sorted page ranges) touches, per region (sorted, once each).
std::vector<std::vector<size_t>> chunks_touched(std::span<const CaptureRegion> regions,
                                                const std::vector<AddressRange>& dirty, uint32_t chunk_size) {
  std::vector<std::vector<size_t>> out(regions.size());
  for (size_t i = 0; i < regions.size(); ++i) {
    const uintptr_t start = reinterpret_cast<uintptr_t>(regions[i].address), end = start + regions[i].length;
    for (const AddressRange& d : dirty) {
      if (d.end() <= start || d.start >= end) continue;
      const size_t first = (std::max(d.start, start) - start) / chunk_size;
      const size_t last = (std::min(d.end(), end) - 1 - start) / chunk_size;
      for (size_t c = first; c <= last; ++c) {
        if (out[i].empty() || out[i].back() < c) out[i].push_back(c);
      }
    }
  }
  return out;
}

}  // namespace

Result<std::vector<CaptureRegion>> with_huge_page_sizes(std::span<const CaptureRegion> regions, pid_t pid) {
  std::vector<CaptureRegion> out(regions.begin(), regions.end());
  std::vector<std::pair<uintptr_t, uintptr_t>> unknown;
  for (const CaptureRegion& r : out) {
    if (r.huge_page_size == 0) {
      const auto start = reinterpret_cast<uintptr_t>(r.address);
      unknown.emplace_back(start, start + r.length);
    }
  }
  if (!unknown.empty()) {
    auto sizes = sys::huge_page_sizes(pid, unknown);
    if (!sizes.ok()) return std::move(sizes).error().wrap("capture");
    size_t k = 0;
    for (CaptureRegion& r : out)
      if (r.huge_page_size == 0) r.huge_page_size = (*sizes)[k++];
  }
  for (const CaptureRegion& r : out) {
    if (r.huge_page_size != 0 &&
        (reinterpret_cast<uintptr_t>(r.address) % r.huge_page_size != 0 || r.length % r.huge_page_size != 0)) {
      return Error(Errc::kInvalidArgument,
                   fmt::format("region '{}' lies in huge-page memory ({} KiB pages) but does not begin and end on its "
                               "pages' boundaries: give it whole huge pages",
                               snapshot::escape_name(r.name), r.huge_page_size >> 10));
    }
  }
  return out;
}

Result<CaptureReport> capture_regions(const std::string& target, std::span<const CaptureRegion> regions_in,
                                      const CaptureOptions& options) {
  const uint32_t page = static_cast<uint32_t>(::sysconf(_SC_PAGESIZE));
  LAZYMEM_TRY(check_capture_regions(regions_in, options, page));  // before any work
  LAZYMEM_ASSIGN_OR_RETURN(std::vector<CaptureRegion> regions, with_huge_page_sizes(regions_in, 0));
  LAZYMEM_ASSIGN_OR_RETURN(auto sink, open_sink(target, options));
  snapshot::SnapshotWriter writer(std::move(sink), options);
  LAZYMEM_TRY(store_regions(writer, regions, options, page));
  return writer.finish();
}

Status check_pausable(const LiveCaptureOptions& live) {
  if (!live.freeze_cgroup) return ok_status();
  if (live.pause || live.pid == 0) {
    return Error(Errc::kInvalidArgument, "freeze_cgroup pauses another process (LiveCaptureOptions::pid), and replaces "
                                         "pause and resume");
  }
  LAZYMEM_ASSIGN_OR_RETURN(std::string cgroup, sys::cgroup_of(live.pid));
  return sys::check_freezable_alone(cgroup, live.pid);
}

Status check_cancelled(const LiveCaptureOptions& live) {
  if (live.cancelled && live.cancelled()) {
    return Error(Errc::kCancelled, "cancelled before the pause: the workload was not paused, nothing was committed");
  }
  return ok_status();
}

Result<Precopy> precopy(const std::string& target, std::span<const CaptureRegion> regions_in, const CaptureOptions& options,
                        const LiveCaptureOptions& live, const KernelFeatures& features) {
  const uint32_t page = static_cast<uint32_t>(::sysconf(_SC_PAGESIZE));
  LAZYMEM_TRY(check_capture_regions(regions_in, options, page));
  LAZYMEM_ASSIGN_OR_RETURN(std::vector<CaptureRegion> regions, with_huge_page_sizes(regions_in, live.pid));
  if (static_cast<bool>(live.pause) != static_cast<bool>(live.resume) || (!live.pause && live.pid == 0)) {
    return Error(Errc::kInvalidArgument, "a live capture needs pause and resume (LiveCaptureOptions; for another "
                                         "process, both or neither: SIGSTOP and SIGCONT): without them the last round "
                                         "could store a torn state");
  }
  LAZYMEM_TRY(check_pausable(live));
  std::vector<AddressRange> ranges;
  for (const auto& r : regions) ranges.push_back({reinterpret_cast<uintptr_t>(r.address), r.length});
  Precopy p;
  // The target first: a name taken or a server refusing is found before the process is touched.
  LAZYMEM_ASSIGN_OR_RETURN(auto sink, open_sink(target, options));
  if (live.pid != 0) {
    LAZYMEM_ASSIGN_OR_RETURN(ProcessMirror mirror, ProcessMirror::create(live.pid, ranges));
    p.mirror = std::make_unique<ProcessMirror>(std::move(mirror));
  }
  // Armed before the first pass reads anything: a page written while it is being stored is
  // reported, and stored again.
  LAZYMEM_ASSIGN_OR_RETURN(p.tracker, DirtyTracker::start(std::move(ranges), features,
                                                          {.pid = live.pid, .method = live.tracking, .uffd = -1}));
  if (p.mirror) LAZYMEM_TRY(p.mirror->fill());
  p.writer = std::make_unique<snapshot::SnapshotWriter>(std::move(sink), options);
  p.writer->stage_input();
  LAZYMEM_TRY(store_regions(*p.writer, regions, options, page));
  if (live.on_pass) {
    uint64_t all = 0;
    for (const CaptureRegion& r : regions) all += r.length;
    live.on_pass(1, all);
  }
  for (unsigned r = 0; r < live.max_rounds; ++r) {
    LAZYMEM_TRY(check_cancelled(live));
    ++p.rounds;
    LAZYMEM_ASSIGN_OR_RETURN(uint64_t written, store_written(p, regions, options.chunk_size));
    if (live.on_pass) live.on_pass(p.rounds, written);
    if (written <= live.converged_bytes) break;
  }
  LAZYMEM_TRY(check_cancelled(live));
  return p;
}

Result<WorkloadPause> pause_workload(const LiveCaptureOptions& live) {
  if (live.pause) {
    live.pause();
    return WorkloadPause{live.resume, nullptr};
  }
  if (live.freeze_cgroup) {
    LAZYMEM_ASSIGN_OR_RETURN(std::string cgroup, sys::cgroup_of(live.pid));
    LAZYMEM_ASSIGN_OR_RETURN(bool frozen_here, sys::freeze_cgroup(cgroup, live.pid, live.stop_timeout));
    return WorkloadPause{frozen_here ? std::function<void()>([cgroup] { sys::thaw_cgroup(cgroup); }) : nullptr,
                         [cgroup] { return sys::check_frozen(cgroup); }};
  }
  LAZYMEM_ASSIGN_OR_RETURN(bool stopped_here, sys::stop_process(live.pid, live.stop_timeout));
  return WorkloadPause{stopped_here ? std::function<void()>([pid = live.pid] { sys::continue_process(pid); }) : nullptr,
                       [pid = live.pid] { return sys::check_stopped(pid); }};
}

Result<DirtyChunks> collect_dirty_chunks(Precopy& p, std::span<const CaptureRegion> regions, uint32_t chunk_size) {
  LAZYMEM_ASSIGN_OR_RETURN(std::vector<AddressRange> dirty, p.tracker->collect());
  if (p.mirror) LAZYMEM_TRY(p.mirror->refresh(dirty));
  DirtyChunks out;
  for (const AddressRange& d : dirty) out.bytes += d.length;
  out.chunks = chunks_touched(regions, dirty, chunk_size);
  return out;
}

Result<uint64_t> store_written(Precopy& p, std::span<const CaptureRegion> regions, uint32_t chunk_size) {
  LAZYMEM_ASSIGN_OR_RETURN(DirtyChunks dirty, collect_dirty_chunks(p, regions, chunk_size));
  for (size_t i = 0; i < regions.size(); ++i) {
    if (dirty.chunks[i].empty()) continue;
    LAZYMEM_TRY(p.writer->recapture(i, dirty.chunks[i], {static_cast<const std::byte*>(regions[i].address), regions[i].length}));
  }
  return dirty.bytes;
}

Result<CaptureReport> capture_regions_live(const std::string& target, std::span<const CaptureRegion> regions,
                                           const CaptureOptions& options, const LiveCaptureOptions& live,
                                           const KernelFeatures& features) {
  LAZYMEM_ASSIGN_OR_RETURN(Precopy p, precopy(target, regions, options, live, features));
  const auto paused_at = std::chrono::steady_clock::now();
  LAZYMEM_ASSIGN_OR_RETURN(WorkloadPause pause, pause_workload(live));
  Result<uint64_t> last = Error(Errc::kCancelled, "not run");
  {
    // resume() however the last round ends, an exception (bad_alloc, the app_state callback's)
    // included: the caller's writers must not stay parked.
    ResumeOnExit resume{pause.resume};
    last = store_written(p, regions, options.chunk_size);
    if (last.ok() && live.app_state) p.writer->set_app_state(live.app_state());
    if (last.ok() && pause.still_paused) {
      if (Status still = pause.still_paused(); !still.ok()) last = std::move(still).error();
    }
  }
  const double paused = std::chrono::duration<double>(std::chrono::steady_clock::now() - paused_at).count();
  if (!last.ok()) return std::move(last).error().wrap("live capture, last round (paused)");
  LAZYMEM_ASSIGN_OR_RETURN(CaptureReport report, p.writer->finish());
  report.rounds = p.rounds + 1;
  report.paused_seconds = paused;
  report.tracking = p.tracker->method();
  return report;
}

Result<CaptureReport> capture_raw_file(const std::string& target, const std::string& file, const CaptureOptions& options) {
  LAZYMEM_TRY(check_capture_options(options));
  sys::UniqueFd fd(::open(file.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return sys_error("open memory file " + file, errno);
  struct stat st{};
  if (::fstat(fd.get(), &st) != 0) return sys_error("stat " + file, errno);
  if (!S_ISREG(st.st_mode)) return Error(Errc::kInvalidArgument, fmt::format("memory file {} is not a regular file", file));
  const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  if (st.st_size <= 0 || static_cast<uint64_t>(st.st_size) % page != 0) {
    return Error(Errc::kInvalidArgument,
                 fmt::format("memory file {} is {} bytes, not a positive multiple of the {}-byte page", file, st.st_size, page));
  }
  LAZYMEM_ASSIGN_OR_RETURN(sys::Mapping view, sys::Mapping::file_readonly(fd.get(), static_cast<size_t>(st.st_size)));
  ::madvise(view.data(), view.size(), MADV_SEQUENTIAL);
  LAZYMEM_ASSIGN_OR_RETURN(auto sink, open_sink(target, options));
  snapshot::SnapshotWriter writer(std::move(sink), options);
  RegionInfo meta;
  std::string base = file.substr(file.find_last_of('/') == std::string::npos ? 0 : file.find_last_of('/') + 1);
  meta.name = base.empty() ? "memory" : base;
  meta.start_address = 0;
  meta.length = static_cast<uint64_t>(st.st_size);
  meta.page_size = static_cast<uint32_t>(page);
  meta.kind = RegionKind::kRawFile;
  std::span<const std::byte> whole = view.bytes();
  LAZYMEM_TRY(writer.train(std::span(&whole, 1), meta.page_size));
  LAZYMEM_TRY(writer.add_region(std::move(meta), whole, options.progress));
  return writer.finish();
}

}  // namespace lazymem
