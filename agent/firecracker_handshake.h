// Firecracker's UFFD handshake message: a JSON array of GuestRegionUffdMapping, sent with the
// VM's uffd. A VM's peer is not trusted: every field is type-checked, and the ranges pass the
// agent's range-table checks, before anything is done with them.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <vector>

#include "fault/address_map.h"
#include "lazymem/result.h"

namespace lazymem::agent {

constexpr size_t kMaxHandshake = 1 << 20;  // Firecracker's region JSON, at most

// A VM's guest memory: its regions as ranges of region 0 (the memory file), and the page size
// they are mapped with (4 KiB, or a huge page size: hugetlbfs-backed guest memory).
struct GuestMemory {
  std::vector<fault::MappedRange> ranges;
  uint64_t page_size = 4096;
};

// Parses the handshake body received so far. nullopt while the message is incomplete (it may
// arrive in pieces when larger than a socket read); the guest memory once it is whole; an error
// saying what is wrong with it otherwise.
Result<std::optional<GuestMemory>> parse_guest_regions(const std::string& body);

}  // namespace lazymem::agent
