// AddressMap: which snapshot bytes live at which addresses of one address space. Follows the
// process's munmap/mremap/madvise so a chunk is installed only where its region still is.
//
// Thread-safety: owned by the fault engine thread.
#pragma once

#include <cstdint>
#include <vector>

namespace lazymem::fault {

// The largest page a session installs whole (SessionSpec::page_size): each one gathered in memory
// of the engine's before it is installed, and each fault on one waits for all of it.
constexpr uint64_t kMaxHugePage = uint64_t{32} << 20;

struct MappedRange {
  uint64_t start = 0;          // address in the served process
  uint64_t length = 0;
  uint32_t region = 0;         // snapshot region index
  uint64_t region_offset = 0;  // offset in that region of `start`
  uint64_t end() const { return start + length; }
};

// Follows a session's address map from outside the engine thread (fault/thread_faults.h). The
// engine calls begin_update() before it reads the userfaultfd's events and end_update() with the
// ranges as they are once it has applied them, so a thread resolving its own fault never
// installs a page by a map the process has already changed.
class MapFollower {
 public:
  virtual ~MapFollower() = default;
  virtual void begin_update() = 0;
  virtual void end_update(const std::vector<MappedRange>& ranges) = 0;
};

class AddressMap {
 public:
  AddressMap() = default;
  explicit AddressMap(std::vector<MappedRange> ranges);

  // The range holding `addr`, or nullptr.
  const MappedRange* find(uint64_t addr) const;

  // The end of the last range that ends at or before `addr` (0: none), and the start of the
  // first range that starts after it (UINT64_MAX: none).
  uint64_t end_before(uint64_t addr) const;
  uint64_t start_after(uint64_t addr) const;

  // Calls fn(address, region_offset, length) for every mapped piece of [offset, offset+len) of
  // `region`.
  template <typename Fn>
  void for_each_span(uint32_t region, uint64_t offset, uint64_t len, Fn&& fn) const {
    for (const MappedRange& r : ranges_) {
      if (r.region != region) continue;
      uint64_t lo = std::max(offset, r.region_offset);
      uint64_t hi = std::min(offset + len, r.region_offset + r.length);
      if (lo < hi) fn(r.start + (lo - r.region_offset), lo, hi - lo);
    }
  }

  // The process unmapped (or dropped) [start, start+len): forget it.
  void remove(uint64_t start, uint64_t len);
  // The process moved [from, from+len) to `to` (mremap).
  void move(uint64_t from, uint64_t to, uint64_t len);

  const std::vector<MappedRange>& ranges() const { return ranges_; }
  bool empty() const { return ranges_.empty(); }

 private:
  void sort();
  std::vector<MappedRange> ranges_;  // sorted by start, non-overlapping
};

}  // namespace lazymem::fault
