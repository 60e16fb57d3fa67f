#include "sys/pagemap_scan.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/ioctl.h>

#include "sys/syscall_result.h"

namespace lazymem::sys {
namespace {

// Runs per ioctl, at most half the kernel's own buffer (PAGEMAP_WALK_SIZE >> PAGE_SHIFT: 512
// on x86-64), so that one call never fills it: this loop goes on from walk_end instead. When a
// call asks for more and the kernel goes on by itself past a full buffer, writes racing with the
// walk are lost on 6.18 (WritesRacingWithCollectAreNeverLost fails nearly every run with 1024 or
// 4096 here, never in 40 runs with 16, 512 or 513). Cost: one more ioctl per 256 runs.
constexpr size_t kRunsPerCall = 256;

}  // namespace

PagemapScan::PagemapScan(UniqueFd fd) : fd_(std::move(fd)), vec_(kRunsPerCall) {}

Result<PagemapScan> PagemapScan::open(pid_t pid) {
  const std::string path = pid == 0 ? "/proc/self/pagemap" : fmt::format("/proc/{}/pagemap", pid);
  SysResult r = call([&] { return ::open(path.c_str(), O_RDONLY | O_CLOEXEC); });
  if (!r.ok()) return r.error("open " + path);
  PagemapScan scan(UniqueFd(static_cast<int>(r.value)));
  scan.pid_ = pid;
  return scan;
}

Status PagemapScan::take(uintptr_t start, uintptr_t end, uint64_t mask, uint64_t inverted,
                         std::vector<PageSpan>& out) {
  for (uintptr_t at = start; at < end;) {
    pm_scan_arg arg{};
    arg.size = sizeof arg;
    arg.flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC;
    arg.start = at;
    arg.end = end;
    arg.vec = reinterpret_cast<uintptr_t>(vec_.data());
    arg.vec_len = vec_.size();
    arg.category_mask = mask;
    arg.category_inverted = inverted;
    arg.return_mask = mask;
    SysResult r = call([&] { return ::ioctl(fd_.get(), PAGEMAP_SCAN, &arg); });
    if (!r.ok()) {
      if (r.err == EPERM) {
        return Error(Errc::kInvalidArgument,
                     fmt::format("pages in {:#x}-{:#x} are no longer tracked: that memory was unmapped and mapped "
                                 "again (mmap MAP_FIXED, mremap) since tracking began",
                                 at, end));
      }
      if (r.err == ESRCH) return Error(Errc::kNotFound, fmt::format("process {} has exited", pid_));
      return r.error(fmt::format("PAGEMAP_SCAN {:#x}-{:#x}", at, end));
    }
    for (long i = 0; i < r.value; ++i) {
      const page_region& run = vec_[static_cast<size_t>(i)];
      if (!out.empty() && out.back().end == run.start) {
        out.back().end = run.end;
      } else {
        out.push_back({run.start, run.end});
      }
    }
    if (arg.walk_end <= at) {  // the kernel always advances; were it not to, say so, never spin
      return Error(Errc::kIo, fmt::format("PAGEMAP_SCAN {:#x}-{:#x} made no progress", at, end));
    }
    at = arg.walk_end;
  }
  return ok_status();
}

bool pagemap_scan_supported() {
  UniqueFd fd(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return false;
  pm_scan_arg arg{};
  arg.size = sizeof arg;  // an empty range: nothing walked, 0 runs
  return ::ioctl(fd.get(), PAGEMAP_SCAN, &arg) == 0;
}

}  // namespace lazymem::sys
