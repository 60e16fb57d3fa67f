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

}  // namespace

Result<std::optional<std::vector<fault::MappedRange>>> parse_guest_regions(const std::string& body) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(body);
  } catch (const nlohmann::json::parse_error& e) {
    if (e.byte >= body.size()) return std::optional<std::vector<fault::MappedRange>>();  // more to come
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
  std::vector<fault::MappedRange> ranges;
  for (const auto& r : j) {
    if (!r.is_object()) return Error(Errc::kProtocol, fmt::format("a GuestRegionUffdMapping is a JSON {}, not an object", r.type_name()));
    if (r.contains("page_size")) {
      LAZYMEM_ASSIGN_OR_RETURN(uint64_t page, unsigned_field(r, "page_size"));
      if (page != 4096) return Error(Errc::kUnsupported, fmt::format("page size {} is not supported (4 KiB only)", page));
    } else if (r.contains("page_size_kib")) {  // the field older Firecrackers send
      LAZYMEM_ASSIGN_OR_RETURN(uint64_t kib, unsigned_field(r, "page_size_kib"));
      if (kib != 4) return Error(Errc::kUnsupported, fmt::format("page size {} KiB is not supported (4 KiB only)", kib));
    }
    LAZYMEM_ASSIGN_OR_RETURN(uint64_t base, unsigned_field(r, "base_host_virt_addr"));
    LAZYMEM_ASSIGN_OR_RETURN(uint64_t size, unsigned_field(r, "size"));
    LAZYMEM_ASSIGN_OR_RETURN(uint64_t offset, unsigned_field(r, "offset"));
    ranges.push_back(fault::MappedRange{base, size, 0, offset});
  }
  if (Status st = check_range_table(ranges); !st.ok()) return std::move(st).error().wrap("guest regions");
  return std::optional<std::vector<fault::MappedRange>>(std::move(ranges));
}

}  // namespace lazymem::agent
