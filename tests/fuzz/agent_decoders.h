// The decoders a hostile local peer of the agent reaches (lazymem-agent runs as root), driven
// the way the daemon drives them: frames split out of a control connection's byte stream, each
// header parsed and decoded as an agent Request (agent/control_request.h), and Firecracker's
// handshake body parsed piece by piece as it arrives (agent/firecracker_handshake.h). What a
// decoder accepts must keep the promises the daemon relies on (check_range_table's, absolute
// paths, no NUL in a path): a broken promise aborts, which the fuzzer reports as a crash.
// Shared by the libFuzzer target and the replay test.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <string>
#include <variant>
#include <vector>

#include "byte_stream.h"
#include "control_request.h"
#include "firecracker_handshake.h"
#include "lazymem/snapshot.h"
#include "net/frame.h"
#include "range_table.h"

namespace lazymem::fuzz {

inline void require(bool kept, const char* promise) {
  if (kept) return;
  std::fprintf(stderr, "an agent decoder accepted what it promises to refuse: %s\n", promise);
  std::abort();
}

inline uint64_t walk_ranges(const std::vector<fault::MappedRange>& ranges) {
  require(!ranges.empty() && ranges.size() <= agent::kMaxRanges, "one to kMaxRanges ranges");
  uint64_t acc = 0;
  for (const auto& r : ranges) {
    require(r.length != 0, "no empty range");
    require(r.start % agent::kRangePage == 0 && r.length % agent::kRangePage == 0 &&
                r.region_offset % agent::kRangePage == 0,
            "page-aligned ranges");
    require(r.start + r.length > r.start && r.region_offset + r.length > r.region_offset, "no range wraps");
    acc += r.start + r.length + r.region + r.region_offset;
  }
  std::vector<fault::MappedRange> sorted = ranges;
  std::sort(sorted.begin(), sorted.end(), [](const auto& a, const auto& b) { return a.start < b.start; });
  for (size_t i = 1; i < sorted.size(); ++i) require(sorted[i - 1].end() <= sorted[i].start, "no ranges overlap");
  return acc;
}

inline uint64_t walk_path(const std::string& path, bool may_be_empty) {
  require(path.find('\0') == std::string::npos, "no NUL in a path");
  require(path.empty() ? may_be_empty : path.front() == '/', "absolute paths");
  return path.size();
}

inline uint64_t walk_location(const std::string& location) {
  require(location.find('\0') == std::string::npos, "no NUL in a location");
  auto loc = SnapshotLocation::parse(location);
  require(loc.ok(), "a location that parses");
  require(!location.empty() && (loc->remote() || location.front() == '/'), "a local snapshot path is absolute");
  return location.size() + loc->remote();
}

// What the daemon's on_request acts on: a decoded request, or the reason it is refused.
inline uint64_t walk_control_request(net::Header& header) {
  agent::ControlRequest rq = agent::decode_control_request(header);
  if (!rq.body.ok()) return rq.id + rq.body.error().message().size();
  return rq.id + std::visit(
                     [](const auto& body) -> uint64_t {
                       using T = std::decay_t<decltype(body)>;
                       if constexpr (std::is_same_v<T, agent::RestoreRequest>) {
                         return walk_location(body.snapshot) + walk_path(body.token_file, true) + walk_ranges(body.ranges) +
                                body.prefetch + body.uffd_features + body.manifest_checksum + body.announces_failures;
                       } else if constexpr (std::is_same_v<T, agent::ServeFirecrackerRequest>) {
                         return walk_path(body.socket_path, false) + walk_location(body.snapshot) +
                                walk_path(body.token_file, true) + body.prefetch + body.cancel_on_close;
                       } else if constexpr (std::is_same_v<T, agent::StatusRequest>) {
                         return 1 + body.with_stats;
                       } else if constexpr (std::is_same_v<T, agent::WaitChangeRequest>) {
                         return body.after_generation;
                       } else if constexpr (std::is_same_v<T, agent::FailureSeenRequest>) {
                         return body.session;
                       } else if constexpr (std::is_same_v<T, agent::FetchRestRequest>) {
                         return body.session + 1;
                       } else {
                         return 7;
                       }
                     },
                     *rq.body);
}

// `data` as a control connection's bytes, fed in uneven pieces as recv() delivers them. The
// daemon closes the connection at the first broken frame or header: so does this.
inline uint64_t decode_control_stream(std::span<const uint8_t> data) {
  uint64_t acc = 0;
  feed_frames(data, [&](const net::FrameView& f) {
    auto h = net::Header::parse(f.header);
    if (!h.ok()) return false;
    acc += walk_control_request(**h);
    return true;
  });
  return acc;
}

// `data` as Firecracker's handshake body, arriving in uneven pieces as on_handshake_data reads
// it: parsed after each, until it is whole, refused, or over kMaxHandshake.
inline uint64_t decode_handshake(std::span<const uint8_t> data) {
  std::string body;
  size_t pos = 0, step = 7;
  while (pos < data.size()) {
    const size_t n = std::min(step, data.size() - pos);
    body.append(reinterpret_cast<const char*>(data.data()) + pos, n);
    pos += n;
    step = step * 5 % 65521 + 1;
    if (body.size() > agent::kMaxHandshake) return 1;
    auto parsed = agent::parse_guest_regions(body);
    if (!parsed.ok()) return 2 + parsed.error().message().size();
    if (!parsed->has_value()) continue;
    const agent::GuestMemory& guest = **parsed;
    for (const auto& r : guest.ranges) {
      require(r.region == 0, "guest regions are ranges of region 0");
      require(r.start % guest.page_size == 0 && r.length % guest.page_size == 0 && r.region_offset % guest.page_size == 0,
              "guest regions lie on their page boundaries");
    }
    return walk_ranges(guest.ranges);
  }
  return 0;
}

}  // namespace lazymem::fuzz
