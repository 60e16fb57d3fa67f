// AddressMap: which snapshot bytes live at which addresses of one address space.
#include "fault/address_map.h"

#include <algorithm>

namespace lazymem::fault {

AddressMap::AddressMap(std::vector<MappedRange> ranges) : ranges_(std::move(ranges)) { sort(); }

void AddressMap::sort() {
  std::sort(ranges_.begin(), ranges_.end(), [](const auto& a, const auto& b) { return a.start < b.start; });
}

const MappedRange* AddressMap::find(uint64_t addr) const {
  auto it = std::upper_bound(ranges_.begin(), ranges_.end(), addr,
                             [](uint64_t a, const MappedRange& r) { return a < r.start; });
  if (it == ranges_.begin()) return nullptr;
  --it;
  return addr < it->end() ? &*it : nullptr;
}

uint64_t AddressMap::end_before(uint64_t addr) const {
  uint64_t end = 0;
  for (const MappedRange& r : ranges_) {
    if (r.end() > addr) break;  // sorted and non-overlapping: ends are in order too
    end = r.end();
  }
  return end;
}

uint64_t AddressMap::start_after(uint64_t addr) const {
  auto it = std::upper_bound(ranges_.begin(), ranges_.end(), addr,
                             [](uint64_t a, const MappedRange& r) { return a < r.start; });
  return it == ranges_.end() ? UINT64_MAX : it->start;
}

void AddressMap::remove(uint64_t start, uint64_t len) {
  uint64_t end = start + len;
  std::vector<MappedRange> out;
  out.reserve(ranges_.size() + 1);
  for (const MappedRange& r : ranges_) {
    if (r.end() <= start || r.start >= end) {
      out.push_back(r);
      continue;
    }
    if (r.start < start) out.push_back(MappedRange{r.start, start - r.start, r.region, r.region_offset});
    if (r.end() > end) out.push_back(MappedRange{end, r.end() - end, r.region, r.region_offset + (end - r.start)});
  }
  ranges_ = std::move(out);
}

void AddressMap::move(uint64_t from, uint64_t to, uint64_t len) {
  uint64_t end = from + len;
  std::vector<MappedRange> moved;
  for (const MappedRange& r : ranges_) {
    uint64_t lo = std::max(r.start, from);
    uint64_t hi = std::min(r.end(), end);
    if (lo < hi) moved.push_back(MappedRange{to + (lo - from), hi - lo, r.region, r.region_offset + (lo - r.start)});
  }
  remove(from, len);
  remove(to, len);  // mremap to a fixed address replaces whatever was there
  ranges_.insert(ranges_.end(), moved.begin(), moved.end());
  sort();
}

}  // namespace lazymem::fault
