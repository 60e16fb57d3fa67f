// The checks a peer's range table (a Restore request's ranges, Firecracker's guest regions)
// passes before the agent registers anything by it: the engine's address map takes its ranges
// as sorted, non-overlapping page spans, and a range that wraps would have it index chunks far
// past a region's end.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "fault/address_map.h"
#include "lazymem/result.h"

namespace lazymem::agent {

// More than any real client sends (one range per snapshot region; a Restore frame's 64 KiB
// header holds fewer than 3000), and few enough that checking them against the peer's
// mappings never stalls the agent's loop.
constexpr size_t kMaxRanges = 4096;

// The agent serves 4 KiB pages; a larger system page is a multiple of it, so a client's own
// page-aligned ranges always pass.
constexpr uint64_t kRangePage = 4096;

// Each range non-empty, page-aligned (start, length and region offset), wrapping neither in the
// address space nor in its region; no two overlapping; at least one and at most kMaxRanges.
// Which region indexes exist, and how long each is, the snapshot's manifest says: the fault
// engine checks those when the session is added.
Status check_range_table(std::span<const fault::MappedRange> ranges);

}  // namespace lazymem::agent
