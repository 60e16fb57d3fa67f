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

// Parses the handshake body received so far. nullopt while the message is incomplete (it may
// arrive in pieces when larger than a socket read); the guest regions as ranges of region 0 (the
// memory file) once it is whole; an error saying what is wrong with it otherwise.
Result<std::optional<std::vector<fault::MappedRange>>> parse_guest_regions(const std::string& body);

}  // namespace lazymem::agent
