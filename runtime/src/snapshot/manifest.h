// Manifest file: a fixed header (magic, format version, body length and checksum) followed by a
// Cap'n Proto message (proto/snapshot.capnp). Decoding validates every field against the others,
// so code past this point may trust the Manifest's ranges.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "lazymem/result.h"
#include "lazymem/snapshot.h"

namespace lazymem::snapshot {

constexpr char kManifestMagic[8] = {'L', 'Z', 'M', 'M', 'A', 'N', 'I', 'F'};
// Written by this build; readers also accept every version from kOldestFormatVersion.
constexpr uint32_t kFormatVersion = 2;
constexpr uint32_t kOldestFormatVersion = 1;
// A dictionary larger than this is not one lazymem wrote.
constexpr size_t kMaxDictionaryBytes = 1 << 20;
constexpr size_t kManifestHeaderSize = 32;
// A manifest larger than this is rejected before parsing (a 1 TiB snapshot at 64 KiB chunks is ~400 MiB).
constexpr uint64_t kMaxManifestBytes = 1ULL << 30;

// A region longer than this is not memory: 128 TiB is all of a 48-bit user address space
// (x86-64, arm64), and chunk numbers (ChunkRef::chunk) stay within 32 bits at 64 KiB chunks.
constexpr uint64_t kMaxRegionLength = 1ULL << 47;

constexpr const char* kManifestFile = "manifest";
constexpr const char* kDataFile = "data";

// Names (of snapshots, of regions) are printed on operators' terminals: no control characters.
bool printable_name(std::string_view name);
// `name` with control characters written as \xNN, for messages about names that are refused.
std::string escape_name(std::string_view name);
// A region's name: 1-128 printable characters, unique in its snapshot.
constexpr size_t kMaxRegionName = 128;

// Region names (kMaxRegionName, printable, unique) and, for process regions, no two that overlap:
// an error of `code` naming the first region that breaks a rule. Checked at capture (snapshots
// written before the rule still restore).
Status check_region_layout(std::span<const RegionInfo> regions, Errc code);

std::vector<std::byte> encode_manifest(const Manifest& m);

// `what` names the source in error messages (a path or a URI).
Result<Manifest> decode_manifest(std::span<const std::byte> bytes, const std::string& what);

// Checks the structural invariants decode_manifest relies on; used by writers too.
Status validate_manifest(const Manifest& m);

}  // namespace lazymem::snapshot
