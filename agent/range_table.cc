// The checks a peer's range table passes before the agent registers anything by it.
#include "range_table.h"

#include <fmt/format.h>

#include <algorithm>
#include <vector>

namespace lazymem::agent {

Status check_range_table(std::span<const fault::MappedRange> ranges) {
  if (ranges.empty()) return Error(Errc::kInvalidArgument, "an empty region table");
  if (ranges.size() > kMaxRanges) {
    return Error(Errc::kInvalidArgument, fmt::format("{} ranges; at most {} are served per session", ranges.size(), kMaxRanges));
  }
  for (const auto& r : ranges) {
    if (r.length == 0) return Error(Errc::kInvalidArgument, fmt::format("range at {:#x} is empty", r.start));
    if (r.start % kRangePage != 0 || r.length % kRangePage != 0 || r.region_offset % kRangePage != 0) {
      return Error(Errc::kInvalidArgument,
                   fmt::format("range {:#x}+{:#x} (region {} offset {:#x}) is not page-aligned: start, length and "
                               "region offset must be multiples of {}",
                               r.start, r.length, r.region, r.region_offset, kRangePage));
    }
    if (r.start + r.length < r.start) {
      return Error(Errc::kInvalidArgument, fmt::format("range {:#x}+{:#x} wraps past the end of the address space", r.start, r.length));
    }
    if (r.region_offset + r.length < r.region_offset) {
      return Error(Errc::kInvalidArgument, fmt::format("range {:#x}+{:#x}: region {} offset {:#x} + length wraps", r.start,
                                                       r.length, r.region, r.region_offset));
    }
  }
  std::vector<fault::MappedRange> sorted(ranges.begin(), ranges.end());
  std::sort(sorted.begin(), sorted.end(), [](const auto& a, const auto& b) { return a.start < b.start; });
  for (size_t i = 1; i < sorted.size(); ++i) {
    if (sorted[i].start < sorted[i - 1].end()) {
      return Error(Errc::kInvalidArgument, fmt::format("ranges {:#x}+{:#x} and {:#x}+{:#x} overlap", sorted[i - 1].start,
                                                       sorted[i - 1].length, sorted[i].start, sorted[i].length));
    }
  }
  return ok_status();
}

}  // namespace lazymem::agent
