// DirtyTracker: UFFD_FEATURE_WP_ASYNC marks, PAGEMAP_SCAN reads and re-arms them; or, before
// 6.7, write-protect faults (dirty_write_faults.cc).
#include "lazymem/dirty.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <sstream>

#include "dirty_impl.h"
#include "dirty_write_faults.h"
#include "sys/pagemap_scan.h"
#include "sys/process_maps.h"
#include "sys/uapi_compat.h"
#include "sys/uffd.h"

namespace lazymem {
namespace {

constexpr uint64_t kTrackingFeatures = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
// Features whose events the process waits on until someone reads them: nobody reads a tracking
// uffd, so madvise, munmap, mremap or fork of tracked memory would block for good.
constexpr uint64_t kEventFeatures = UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_REMOVE |
                                    UFFD_FEATURE_EVENT_UNMAP;
const uintptr_t kPage = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));

Status check_ranges(std::vector<AddressRange>& ranges) {
  if (ranges.empty()) return Error(Errc::kInvalidArgument, "dirty tracking: no ranges given");
  std::sort(ranges.begin(), ranges.end(), [](const auto& a, const auto& b) { return a.start < b.start; });
  for (size_t i = 0; i < ranges.size(); ++i) {
    const AddressRange& r = ranges[i];
    if (r.length == 0 || r.start % kPage != 0 || r.length % kPage != 0 || r.end() < r.start) {
      return Error(Errc::kInvalidArgument,
                   fmt::format("dirty tracking: range {:#x}+{:#x} is empty, not page-aligned or wraps", r.start, r.length));
    }
    if (i > 0 && ranges[i - 1].end() > r.start) {
      return Error(Errc::kInvalidArgument, fmt::format("dirty tracking: ranges {:#x}+{:#x} and {:#x}+{:#x} overlap",
                                                       ranges[i - 1].start, ranges[i - 1].length, r.start, r.length));
    }
  }
  return ok_status();
}

// The features a uffd's API handshake asked for, from this process's /proc/self/fdinfo (the
// kernel prints "API:\t<api>:<features>:<ioctls>"): a handed-over fd carries no other record.
Result<uint64_t> handshake_features(int fd) {
  std::ifstream in(fmt::format("/proc/self/fdinfo/{}", fd));
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("API:", 0) != 0) continue;
    std::istringstream fields(line.substr(4));
    std::string api, features;
    if (std::getline(fields, api, ':') && std::getline(fields, features, ':')) {
      try {
        return std::stoull(features, nullptr, 16);
      } catch (const std::exception&) {
      }
    }
  }
  return Error(Errc::kInvalidArgument, fmt::format("dirty tracking: fd {} is not a userfaultfd (or its API handshake "
                                                   "was never done)",
                                                   fd));
}

Result<sys::Uffd> tracking_uffd(const DirtyTrackerOptions& o) {
  if (o.uffd < 0) {
    // A uffd acts on the memory of the process that opened it: another process is made to open one.
    if (o.pid != 0 && o.pid != ::getpid()) {
      auto uffd = sys::Uffd::open_in(o.pid, kTrackingFeatures);
      if (!uffd.ok()) return std::move(uffd).error().wrap(fmt::format("dirty tracking of process {}", o.pid));
      return uffd;
    }
    return sys::Uffd::open(kTrackingFeatures, kTrackingFeatures);
  }
  LAZYMEM_ASSIGN_OR_RETURN(uint64_t features, handshake_features(o.uffd));
  if ((features & kTrackingFeatures) != kTrackingFeatures) {
    return Error(Errc::kInvalidArgument,
                 fmt::format("dirty tracking: the userfaultfd given was opened without {}: its process must ask for "
                             "UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED in its UFFDIO_API handshake",
                             (features & UFFD_FEATURE_WP_ASYNC) ? "UFFD_FEATURE_WP_UNPOPULATED" : "UFFD_FEATURE_WP_ASYNC"));
  }
  if ((features & kEventFeatures) != 0) {
    return Error(Errc::kInvalidArgument,
                 "dirty tracking: the userfaultfd given also asks for UFFD_FEATURE_EVENT_* (fork, remap, remove, "
                 "unmap): nobody reads a tracking uffd's events, so madvise, munmap, mremap or fork of the tracked "
                 "memory would block; hand over a uffd opened with UFFD_FEATURE_WP_ASYNC | WP_UNPOPULATED only");
  }
  sys::UniqueFd dup(::fcntl(o.uffd, F_DUPFD_CLOEXEC, 0));
  if (!dup.valid()) return sys_error("dirty tracking: duplicating the userfaultfd", errno);
  return sys::Uffd::adopt(std::move(dup), features);
}

// Every range must lie in private mappings of process `pid` (0: this one). A shared mapping's
// pages change through its other mappings, the file (memfd: pwrite) or devices without this
// mapping's write-protect seeing it; a range not mapped in that process would scan as clean
// forever (a uffd of another process, or the wrong pid). Huge-page memory (hugetlbfs) is
// registered and protected by whole pages only, and write-fault tracking lifts one 4 KiB page
// at a write: refused there, with what to do, rather than a bare EINVAL from the kernel.
Status check_ranges_mapped_private(pid_t pid, const std::vector<AddressRange>& ranges, DirtyMethod method) {
  sys::Ranges bounds;
  for (const AddressRange& r : ranges) bounds.emplace_back(r.start, r.end());
  LAZYMEM_ASSIGN_OR_RETURN(std::vector<sys::Vma> vmas, sys::read_vmas_sized(pid, bounds));
  const std::string who = pid == 0 ? std::string("this process") : fmt::format("process {}", pid);
  for (const AddressRange& r : ranges) {
    const sys::Coverage c = sys::coverage(vmas, r.start, r.end());
    if (c.shared != nullptr) {
      return Error(Errc::kUnsupported,
                   fmt::format("dirty tracking: {:#x}-{:#x} is a shared mapping: its pages also change through its "
                               "other mappings or its file, which write-protect here does not see; only private "
                               "memory can be tracked",
                               c.shared->start, c.shared->end));
    }
    if (c.covered_to < r.end()) {
      return Error(Errc::kInvalidArgument,
                   fmt::format("dirty tracking: {:#x}-{:#x} is not mapped in {}", c.covered_to, r.end(), who));
    }
    if (c.page_size == kPage) continue;
    for (const sys::Vma& v : sys::overlapping(vmas, r.start, r.end())) {
      if (v.page_size <= kPage) continue;
      const uint64_t kib = v.page_size >> 10;
      if (method == DirtyMethod::kWriteFaults) {
        return Error(Errc::kUnsupported,
                     fmt::format("dirty tracking: {:#x}-{:#x} is huge-page memory ({} KiB pages), which write-fault "
                                 "tracking does not take; track it with the kernel's marks (Linux 6.7; "
                                 "--tracking kernel-marks), which report a written huge page whole",
                                 v.start, v.end, kib));
      }
      if (std::max<uintptr_t>(r.start, v.start) % v.page_size != 0 || std::min<uintptr_t>(r.end(), v.end) % v.page_size != 0) {
        return Error(Errc::kInvalidArgument,
                     fmt::format("dirty tracking: {:#x}-{:#x} cuts through huge pages ({} KiB) of {} at {:#x}-{:#x}: "
                                 "give ranges on {} KiB boundaries there",
                                 r.start, r.end(), kib, who, v.start, v.end, kib));
      }
    }
  }
  return ok_status();
}

// The kernel's marks: WP_ASYNC drops a page's mark at its first write, PAGEMAP_SCAN reports and
// re-arms.
class KernelMarks final : public DirtyTracker::Impl {
 public:
  KernelMarks(std::vector<AddressRange> ranges, sys::Uffd uffd, sys::PagemapScan scan)
      : Impl(std::move(ranges), DirtyMethod::kKernelMarks), uffd_(std::move(uffd)), scan_(std::move(scan)) {}

  ~KernelMarks() override {
    // Unregistering drops the write-protect marks, so the process's writes stop paying for them.
    // It fails only when the process (its mm) is gone, and then there is nothing to drop.
    for (const AddressRange& r : ranges) (void)uffd_.unregister(r.start, r.length);
  }

  Result<std::vector<AddressRange>> collect() override {
    std::vector<AddressRange> out;
    for (const AddressRange& r : ranges) {
      spans_.clear();
      // Written: present or swapped pages whose write-protect mark the kernel dropped at a write.
      LAZYMEM_TRY(scan_.take(r.start, r.end(), PAGE_IS_WRITTEN, 0, spans_));
      // Dropped: no page and no mark (MADV_DONTNEED on anonymous memory drops the mark with the
      // page). Marked again here so that each such page is reported once. Kernels that count these
      // as written have reported them above and marked them: then this finds none.
      const size_t written = spans_.size();
      LAZYMEM_TRY(scan_.take(r.start, r.end(), PAGE_IS_PRESENT | PAGE_IS_SWAPPED, PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                             spans_));
      if (written != 0 && written != spans_.size()) {
        std::inplace_merge(spans_.begin(), spans_.begin() + static_cast<ptrdiff_t>(written), spans_.end(),
                           [](const auto& a, const auto& b) { return a.start < b.start; });
      }
      for (const sys::PageSpan& s : spans_) {
        if (!out.empty() && out.back().end() >= s.start) {
          out.back().length = std::max(out.back().end(), s.end) - out.back().start;
        } else {
          out.push_back({s.start, s.end - s.start});
        }
      }
    }
    return out;
  }

 private:
  sys::Uffd uffd_;
  sys::PagemapScan scan_;
  std::vector<sys::PageSpan> spans_;  // reused by collect()
};

Result<std::unique_ptr<DirtyTracker::Impl>> start_kernel_marks(std::vector<AddressRange> ranges,
                                                               const DirtyTrackerOptions& options) {
  LAZYMEM_ASSIGN_OR_RETURN(sys::Uffd uffd, tracking_uffd(options));
  LAZYMEM_ASSIGN_OR_RETURN(sys::PagemapScan scan, sys::PagemapScan::open(options.pid));
  for (size_t i = 0; i < ranges.size(); ++i) {
    Status s = uffd.register_write_protected(ranges[i].start, ranges[i].length);
    if (!s.ok()) {
      // Only what this call registered: range i is not ours (EBUSY: another uffd's, a lazy
      // restore's say, whose registration an unregister here must not touch).
      for (size_t j = 0; j < i; ++j) (void)uffd.unregister(ranges[j].start, ranges[j].length);
      if (s.error().sys_errno() == EBUSY) {
        return Error(Errc::kExists, fmt::format("dirty tracking: {:#x}-{:#x} is registered with another userfaultfd "
                                                "(a lazy restore still serving it? finish() it first)",
                                                ranges[i].start, ranges[i].end()));
      }
      return std::move(s).error().wrap("dirty tracking");
    }
  }
  return std::unique_ptr<DirtyTracker::Impl>(new KernelMarks(std::move(ranges), std::move(uffd), std::move(scan)));
}

// Which method `options` and the kernel make, or why none.
Result<DirtyMethod> choose_method(const KernelFeatures& features, const DirtyTrackerOptions& options) {
  if (!features.uffd_usable) return Error(Errc::kUnsupported, "dirty tracking: " + features.uffd_error);
  const bool marks = features.has_dirty_marks(), faults = features.has_write_protect_faults();
  auto no_marks = [&] {
    std::string missing;
    if (!features.has_uffd_feature(UFFD_FEATURE_WP_ASYNC)) missing += "UFFD_FEATURE_WP_ASYNC, ";
    if (!features.has_uffd_feature(UFFD_FEATURE_WP_UNPOPULATED)) missing += "UFFD_FEATURE_WP_UNPOPULATED, ";
    if (!features.pagemap_scan) missing += "the PAGEMAP_SCAN ioctl on /proc/PID/pagemap, ";
    missing.resize(missing.size() - 2);
    return missing;
  };
  switch (options.method) {
    case DirtyMethod::kKernelMarks:
      if (!marks) return Error(Errc::kUnsupported, fmt::format("dirty tracking by kernel marks needs Linux 6.7; this kernel lacks {}", no_marks()));
      return DirtyMethod::kKernelMarks;
    case DirtyMethod::kWriteFaults:
      if (options.uffd >= 0) {
        return Error(Errc::kInvalidArgument, "dirty tracking by write faults opens its own userfaultfd (its thread reads "
                                             "the events): give no uffd, or ask for the kernel-marks method");
      }
      if (!faults) {
        return Error(Errc::kUnsupported, "dirty tracking by write faults needs Linux 5.13 (userfaultfd write-protect "
                                         "faults, its UNMAP and REMAP events, and the marks in /proc/PID/pagemap); "
                                         "this kernel lacks them");
      }
      return DirtyMethod::kWriteFaults;
    case DirtyMethod::kAuto:
      if (marks || options.uffd >= 0) return choose_method(features, {options.pid, DirtyMethod::kKernelMarks, options.uffd});
      if (faults) return DirtyMethod::kWriteFaults;
      return Error(Errc::kUnsupported, fmt::format("dirty tracking needs Linux 5.13 (write-protect faults), and 6.7 to "
                                                   "cost the writer least; this kernel lacks {}, and write-protect faults",
                                                   no_marks()));
  }
  return Error(Errc::kInvalidArgument, "dirty tracking: unknown method");
}

}  // namespace

DirtyTracker::DirtyTracker(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
DirtyTracker::~DirtyTracker() = default;

Result<std::unique_ptr<DirtyTracker>> DirtyTracker::start(std::vector<AddressRange> ranges,
                                                          const KernelFeatures& features,
                                                          const DirtyTrackerOptions& options) {
  LAZYMEM_ASSIGN_OR_RETURN(DirtyMethod method, choose_method(features, options));
  LAZYMEM_TRY(check_ranges(ranges));
  // Before a uffd is opened: in another process, that means stopping one of its threads.
  if (options.pid != 0 && options.pid != ::getpid()) {
    auto alive = sys::check_process(options.pid);
    if (!alive.ok()) return std::move(alive).error().wrap("dirty tracking");
  }
  LAZYMEM_TRY(check_ranges_mapped_private(options.pid, ranges, method));
  LAZYMEM_ASSIGN_OR_RETURN(std::unique_ptr<Impl> impl, method == DirtyMethod::kKernelMarks
                                                           ? start_kernel_marks(std::move(ranges), options)
                                                           : start_write_fault_tracking(std::move(ranges), options.pid));
  return std::unique_ptr<DirtyTracker>(new DirtyTracker(std::move(impl)));
}

Result<std::vector<AddressRange>> DirtyTracker::collect() { return impl_->collect(); }

const std::vector<AddressRange>& DirtyTracker::ranges() const { return impl_->ranges; }
DirtyMethod DirtyTracker::method() const { return impl_->method; }

const char* dirty_method_name(DirtyMethod method) {
  switch (method) {
    case DirtyMethod::kAuto: return "auto";
    case DirtyMethod::kKernelMarks: return "kernel-marks";
    case DirtyMethod::kWriteFaults: return "write-faults";
  }
  return "?";
}

std::optional<DirtyMethod> parse_dirty_method(std::string_view name) {
  for (DirtyMethod m : {DirtyMethod::kAuto, DirtyMethod::kKernelMarks, DirtyMethod::kWriteFaults}) {
    if (name == dirty_method_name(m)) return m;
  }
  return std::nullopt;
}

}  // namespace lazymem
