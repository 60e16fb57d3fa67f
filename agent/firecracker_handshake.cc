// Firecracker's UFFD handshake message, parsed and checked.
#include "firecracker_handshake.h"

#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include "range_table.h"

namespace lazymem::agent {
namespace {

// Firecracker writes these fields as unsigned integers. Anything else is refused, not converted:
// nlohmann converts a float by a cast that is undefined past 2^64, and a bool to 0 or 1.
Result<uint64_t> unsigned_field(const nlohmann::json& mapping, const char* name) {
  auto it = mapping.find(name);
  if (it == mapping.end()) return Error(Errc::kProtocol, fmt::format("GuestRegionUffdMapping without \"{}\"", name));
  if (!it->is_number_unsigned()) {
    return Error(Errc::kProtocol, fmt::format("GuestRegionUffdMapping \"{}\" is a {}, not an unsigned integer", name,
                                                  it->is_number() ? "signed or fractional number" : it->type_name()));
  }
  return it->get<uint64_t>();
}

// A region's page size: "page_size" in bytes, or "page_size_kib" (older Firecrackers), or
// both (they must agree); neither is 4 KiB. 4 KiB or a huge page size the engine installs.
Result<uint64_t> page_size_of(const nlohmann::json& r) {
  std::optional<uint64_t> bytes, kib;
  if (r.contains("page_size")) {
    LAZYMEM_ASSIGN_OR_RETURN(bytes, unsigned_field(r, "page_size"));
  }
  if (r.contains("page_size_kib")) {
    LAZYMEM_ASSIGN_OR_RETURN(kib, unsigned_field(r, "page_size_kib"));
    // Checked before multiplying: 2^54 + 4 KiB would be 4096 bytes once wrapped.
    if (*kib > fault::kMaxHugePage / 1024) {
      return Error(Errc::kUnsupported, fmt::format("page size {} KiB is not supported (4 KiB, or huge pages up to {} "
                                                   "MiB)", *kib, fault::kMaxHugePage >> 20));
    }
    if (bytes && *bytes != *kib * 1024) {
      return Error(Errc::kProtocol, fmt::format("\"page_size\" {} and \"page_size_kib\" {} disagree", *bytes, *kib));
    }
  }
  const uint64_t page = bytes ? *bytes : kib ? *kib * 1024 : 4096;
  if (page < 4096 || page > fault::kMaxHugePage || (page & (page - 1)) != 0) {
    return Error(Errc::kUnsupported, fmt::format("page size {} is not supported (4 KiB, or huge pages up to {} MiB)",
                                                 page, fault::kMaxHugePage >> 20));
  }
  return page;
}

}  // namespace

Result<std::optional<GuestMemory>> parse_guest_regions(const std::string& body) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(body);
  } catch (const nlohmann::json::parse_error& e) {
    if (e.byte >= body.size()) return std::optional<GuestMemory>();  // more to come
    return Error(Errc::kProtocol, std::string("bad JSON: ") + e.what());
  } catch (const nlohmann::json::exception& e) {
    // Not only parse_error: a number past what a double holds (1e400) is out_of_range, thrown
    // by the parser too. Uncaught, it ended the agent.
    return Error(Errc::kProtocol, std::string("bad JSON: ") + e.what());
  }
  if (!j.is_array() || j.empty()) return Error(Errc::kProtocol, "expected a non-empty JSON array of GuestRegionUffdMapping");
  if (j.size() > kMaxRanges) {
    return Error(Errc::kProtocol, fmt::format("{} guest regions; at most {} are served", j.size(), kMaxRanges));
  }
  GuestMemory guest;
  for (const auto& r : j) {
    if (!r.is_object()) return Error(Errc::kProtocol, fmt::format("a GuestRegionUffdMapping is a JSON {}, not an object", r.type_name()));
    LAZYMEM_ASSIGN_OR_RETURN(uint64_t page, page_size_of(r));
    if (guest.ranges.empty()) guest.page_size = page;
    if (page != guest.page_size) {
      return Error(Errc::kUnsupported, fmt::format("guest regions of {} KiB and of {} KiB pages: one page size is served "
                                                   "per VM", guest.page_size >> 10, page >> 10));
    }
    LAZYMEM_ASSIGN_OR_RETURN(uint64_t base, unsigned_field(r, "base_host_virt_addr"));
    LAZYMEM_ASSIGN_OR_RETURN(uint64_t size, unsigned_field(r, "size"));
    LAZYMEM_ASSIGN_OR_RETURN(uint64_t offset, unsigned_field(r, "offset"));
    if (page > 4096 && (base % page != 0 || size % page != 0 || offset % page != 0)) {  // 4 KiB: check_range_table
      return Error(Errc::kProtocol, fmt::format("guest region at {:#x} ({:#x} bytes, file offset {:#x}) is not on its {} "
                                                "KiB page boundaries", base, size, offset, page >> 10));
    }
    guest.ranges.push_back(fault::MappedRange{base, size, 0, offset});
  }
  if (Status st = check_range_table(guest.ranges); !st.ok()) return std::move(st).error().wrap("guest regions");
  return std::optional<GuestMemory>(std::move(guest));
}

}  // namespace lazymem::agent
