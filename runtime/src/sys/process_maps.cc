#include "sys/process_maps.h"

#include <fcntl.h>
#include <unistd.h>
#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <string_view>

#include "sys/unique_fd.h"

namespace lazymem::sys {

Status check_process(pid_t pid) {
  const std::string path = fmt::format("/proc/{}/status", pid);
  std::ifstream in(path);
  if (!in) return Error(Errc::kNotFound, fmt::format("no process {}", pid));
  long tgid = -1;
  char state = '?';
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("Tgid:", 0) == 0) tgid = std::atol(line.c_str() + 5);
    if (line.rfind("State:", 0) == 0 && line.size() > 7) state = line[line.find_first_not_of(" \t", 6)];
  }
  if (tgid < 0) return Error(Errc::kNotFound, fmt::format("no process {}", pid));
  if (tgid != pid) {
    return Error(Errc::kInvalidArgument, fmt::format("{} is a thread of process {}: give the process's id, {}", pid, tgid, tgid));
  }
  if (state == 'Z' || state == 'X') {
    return Error(Errc::kNotFound, fmt::format("the main thread of process {} has exited (its other threads may run on, "
                                              "but its memory can no longer be read through /proc/{})",
                                              pid, pid));
  }
  return ok_status();
}

Result<std::vector<Vma>> read_vmas(pid_t pid, bool page_sizes) {
  const char* file = page_sizes ? "smaps" : "maps";
  const std::string path = pid == 0 ? fmt::format("/proc/self/{}", file) : fmt::format("/proc/{}/{}", pid, file);
  if (UniqueFd probe(::open(path.c_str(), O_RDONLY | O_CLOEXEC)); !probe.valid()) {
    if (errno == ENOENT || errno == ESRCH) return Error(Errc::kNotFound, fmt::format("no process {}", pid), errno);
    return sys_error(fmt::format("reading {} (root, or the process's owner, may)", path), errno);
  }
  std::ifstream in(path);
  if (!in) return Error(Errc::kNotFound, fmt::format("cannot read {}", path));
  std::vector<Vma> vmas;
  constexpr std::string_view kPageSize = "KernelPageSize:";
  for (std::string line; std::getline(in, line);) {
    unsigned long a = 0, b = 0;
    char perms[8] = {};
    int path = 0;  // where the path begins, if any
    // smaps' other lines ("Size:", "AnonHugePages:") never read as "hex-hex".
    if (std::sscanf(line.c_str(), "%lx-%lx %7s %*s %*s %*s %n", &a, &b, perms, &path) >= 2) {
      // Anonymous memory without a name ("[heap]", "[stack]" and the like are such too) has
      // 4 KiB pages: MAP_HUGETLB memory is named "/anon_hugepage". Others are said by smaps.
      const bool anonymous = path > 0 && (static_cast<size_t>(path) >= line.size() || line[static_cast<size_t>(path)] == '[');
      vmas.push_back({a, b, perms[3] == 's', !page_sizes && anonymous ? uint64_t{4096} : 0});
    } else if (!vmas.empty() && line.starts_with(kPageSize)) {
      vmas.back().page_size = std::strtoull(line.c_str() + kPageSize.size(), nullptr, 10) * 1024;  // "4 kB"
    }
  }
  return vmas;
}

Result<std::vector<Vma>> read_vmas_sized(pid_t pid, const Ranges& ranges) {
  LAZYMEM_ASSIGN_OR_RETURN(std::vector<Vma> vmas, read_vmas(pid));
  for (const auto& [start, end] : ranges) {
    if (coverage(vmas, start, end).page_size == 0) return read_vmas(pid, true);
  }
  return vmas;
}

namespace {

// The first mapping ending past `start`.
std::vector<Vma>::const_iterator first_past(const std::vector<Vma>& vmas, uintptr_t start) {
  return std::upper_bound(vmas.begin(), vmas.end(), start, [](uintptr_t a, const Vma& m) { return a < m.end; });
}

}  // namespace

std::span<const Vma> overlapping(const std::vector<Vma>& vmas, uintptr_t start, uintptr_t end) {
  auto first = first_past(vmas, start), last = first;
  while (last != vmas.end() && last->start < end) ++last;
  return {first, last};
}

Coverage coverage(const std::vector<Vma>& vmas, uintptr_t start, uintptr_t end) {
  Coverage c{start, nullptr};
  // The first mapping ending past `start`, and on while the next adjoins.
  auto v = first_past(vmas, start);
  for (bool first = true; v != vmas.end() && v->start <= c.covered_to && c.covered_to < end; ++v, first = false) {
    if (v->shared && c.shared == nullptr) c.shared = &*v;
    c.page_size = first || c.page_size == v->page_size ? v->page_size : 0;
    c.covered_to = v->end;
  }
  c.covered_to = std::min(c.covered_to, end);
  return c;
}

Result<std::vector<uint64_t>> huge_page_sizes(pid_t pid, const Ranges& ranges) {
  LAZYMEM_ASSIGN_OR_RETURN(std::vector<Vma> vmas, read_vmas_sized(pid, ranges));
  const uint64_t small = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  const std::string who = pid == 0 ? std::string("this process") : fmt::format("process {}", pid);
  std::vector<uint64_t> out;
  for (const auto& [start, end] : ranges) {
    const Coverage c = coverage(vmas, start, end);
    if (c.page_size == small) {
      out.push_back(0);
      continue;
    }
    if (c.covered_to < end) {
      return Error(Errc::kInvalidArgument, fmt::format("{:#x}-{:#x} is not mapped in {}", c.covered_to, end, who));
    }
    if (c.page_size == 0) {  // differing: fine only if none of them is huge
      for (const Vma& v : overlapping(vmas, start, end)) {
        if (v.page_size > small) {
          return Error(Errc::kInvalidArgument,
                       fmt::format("{:#x}-{:#x} of {} mixes huge pages ({} KiB, at {:#x}-{:#x}) with other memory: "
                                   "give the huge-page memory a region of its own",
                                   start, end, who, v.page_size >> 10, v.start, v.end));
        }
      }
    }
    out.push_back(c.page_size);  // huge, or 0: differing, none of them huge
  }
  return out;
}

}  // namespace lazymem::sys
