// Manifest file encoding, decoding and validation.
#include "snapshot/manifest.h"

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <fmt/format.h>

#include <algorithm>
#include <xxhash.h>

#include <charconv>
#include <cstring>
#include <limits>

#include "snapshot.capnp.h"

namespace lazymem {

const char* codec_name(Codec c) {
  switch (c) {
    case Codec::kZero: return "zero";
    case Codec::kRaw: return "raw";
    case Codec::kZstd: return "zstd";
    case Codec::kZstdPages: return "zstd-pages";
  }
  return "unknown";
}

uint32_t Manifest::chunk_length(size_t region, size_t chunk) const {
  uint64_t len = regions[region].length;
  uint64_t start = static_cast<uint64_t>(chunk) * chunk_size;
  return static_cast<uint32_t>(std::min<uint64_t>(chunk_size, len - start));
}

uint64_t Manifest::total_bytes() const {
  uint64_t t = 0;
  for (const auto& r : regions) t += r.length;
  return t;
}

uint64_t Manifest::stored_bytes() const {
  uint64_t t = 0;
  for (const auto& r : regions)
    for (const auto& c : r.chunks) t += c.stored_length;
  return t;
}

std::string SnapshotLocation::Server::to_string() const {
  return host.find(':') != std::string::npos ? fmt::format("[{}]:{}", host, port) : fmt::format("{}:{}", host, port);
}

Result<SnapshotLocation::Server> SnapshotLocation::Server::parse(std::string_view hostport, bool any_port) {
  auto bad = [&] {
    return Error(Errc::kInvalidArgument, fmt::format("'{}' is not HOST:PORT (PORT 1-65535{})", hostport,
                                                     any_port ? ", or 0: any free one" : ""));
  };
  size_t colon = hostport.rfind(':');
  if (colon == std::string_view::npos) return bad();
  Server s{std::string(hostport.substr(0, colon)), 0};
  if (s.host.size() > 2 && s.host.front() == '[' && s.host.back() == ']') s.host = s.host.substr(1, s.host.size() - 2);
  std::string_view port = hostport.substr(colon + 1);
  unsigned value = 0;
  auto [p, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
  if (ec != std::errc() || p != port.data() + port.size() || value > 65535 || (value == 0 && !any_port) ||
      s.host.empty() || s.host.find_first_of("[]") != std::string::npos) {
    return bad();
  }
  s.port = static_cast<uint16_t>(value);
  return s;
}

std::vector<SnapshotLocation::Server> SnapshotLocation::servers() const {
  std::vector<Server> all{Server{host, port}};
  all.insert(all.end(), more_servers.begin(), more_servers.end());
  return all;
}

SnapshotLocation SnapshotLocation::at(size_t i) const {
  if (more_servers.empty()) return *this;
  const auto all = servers();
  SnapshotLocation one = *this;
  one.host = all[i % all.size()].host;
  one.port = all[i % all.size()].port;
  one.more_servers.clear();
  return one;
}

bool snapshot::printable_name(std::string_view name) {
  return std::none_of(name.begin(), name.end(), [](char c) { return static_cast<unsigned char>(c) < 0x20 || c == 0x7f; });
}

std::string snapshot::escape_name(std::string_view name) {
  std::string out;
  for (char c : name) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) out += fmt::format("\\x{:02x}", static_cast<unsigned char>(c));
    else out += c;
  }
  return out;
}

std::string SnapshotLocation::to_string() const {
  if (!remote()) return store_dir + "/" + name;
  std::string out = "lazymem://";
  for (const Server& s : servers()) out += (out.size() > 10 ? "," : "") + s.to_string();
  return name.empty() ? out : out + "/" + name;  // no name: the servers alone
}

namespace {

bool valid_name(const std::string& name) {
  return !name.empty() && name.size() <= 200 && name[0] != '.' && name.find('/') == std::string::npos &&
         snapshot::printable_name(name);
}

Error bad_name(const std::string& text) {
  return Error(Errc::kInvalidArgument,
               fmt::format("'{}': a snapshot name must be 1-200 characters, no '/' or control characters, not "
                           "starting with '.'", snapshot::escape_name(text)));
}

}  // namespace

Result<SnapshotLocation> SnapshotLocation::parse(const std::string& text) {
  SnapshotLocation loc;
  constexpr std::string_view kScheme = "lazymem://";
  if (text.rfind(kScheme, 0) == 0) {
    std::string rest = text.substr(kScheme.size());
    size_t slash = rest.find('/');
    if (slash == std::string::npos || slash + 1 >= rest.size()) {
      return Error(Errc::kInvalidArgument, fmt::format("'{}': expected lazymem://HOST:PORT/NAME", text));
    }
    loc.name = rest.substr(slash + 1);
    // HOST:PORT[,HOST:PORT...]
    for (size_t at = 0; at <= slash;) {
      size_t end = rest.find(',', at);
      if (end == std::string::npos || end > slash) end = slash;
      auto s = Server::parse(std::string_view(rest).substr(at, end - at));
      at = end + 1;
      if (!s.ok()) return Error(Errc::kInvalidArgument, fmt::format("'{}': {}", text, s.error().message()));
      if (loc.host.empty()) {
        loc.host = s->host;
        loc.port = s->port;
      } else {
        loc.more_servers.push_back(std::move(*s));
      }
    }
  } else {
    std::string path = text;
    while (path.size() > 1 && path.back() == '/') path.pop_back();
    size_t slash = path.rfind('/');
    loc.store_dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
    loc.name = slash == std::string::npos ? path : path.substr(slash + 1);
  }
  if (!valid_name(loc.name)) return bad_name(text);
  return loc;
}

Result<SnapshotLocation> SnapshotLocation::in_store(const std::string& store_dir, const std::string& name) {
  if (!valid_name(name)) return bad_name(name);
  SnapshotLocation loc;
  loc.store_dir = store_dir;
  loc.name = name;
  return loc;
}

namespace snapshot {
namespace {

void put_le32(std::byte* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = std::byte((v >> (8 * i)) & 0xff);
}
void put_le64(std::byte* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = std::byte((v >> (8 * i)) & 0xff);
}
uint32_t get_le32(const std::byte* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(p[i]) << (8 * i);
  return v;
}
uint64_t get_le64(const std::byte* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

bool is_power_of_two(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

}  // namespace

Status check_region_layout(std::span<const RegionInfo> regions, Errc code) {
  for (size_t i = 0; i < regions.size(); ++i) {
    const RegionInfo& r = regions[i];
    auto bad = [&](const std::string& why) {
      return Error(code, fmt::format("region {} ('{}'): {}", i, escape_name(r.name), why));
    };
    if (r.name.empty() || r.name.size() > kMaxRegionName || !printable_name(r.name)) {
      return bad(fmt::format("a region name must be 1-{} characters, no control characters", kMaxRegionName));
    }
    for (size_t j = 0; j < i; ++j) {
      const RegionInfo& o = regions[j];
      if (o.name == r.name) return bad("another region has that name");
      if (r.kind == RegionKind::kProcess && o.kind == RegionKind::kProcess && r.start_address < o.start_address + o.length &&
          o.start_address < r.start_address + r.length) {
        return bad(fmt::format("overlaps region '{}'", escape_name(o.name)));
      }
    }
  }
  return ok_status();
}

Status validate_manifest(const Manifest& m) {
  if (m.format_version < kOldestFormatVersion || m.format_version > kFormatVersion) {
    return Error(Errc::kUnsupported, fmt::format("format version {} is not one this build knows", m.format_version));
  }
  if (m.dictionary.size() > kMaxDictionaryBytes) {
    return Error(Errc::kCorrupt, fmt::format("dictionary of {} bytes is larger than {}", m.dictionary.size(), kMaxDictionaryBytes));
  }
  if (m.chunk_size < kMinChunkSize || m.chunk_size > kMaxChunkSize || !is_power_of_two(m.chunk_size)) {
    return Error(Errc::kCorrupt, fmt::format("chunk size {} is not a power of two in [{}, {}]", m.chunk_size,
                                             kMinChunkSize, kMaxChunkSize));
  }
  for (size_t i = 0; i < m.regions.size(); ++i) {
    const RegionInfo& r = m.regions[i];
    auto bad = [&](const std::string& why) {
      return Error(Errc::kCorrupt, fmt::format("region {} ('{}'): {}", i, escape_name(r.name), why));
    };

    if (!is_power_of_two(r.page_size) || r.page_size < 4096 || r.page_size > m.chunk_size) {
      return bad(fmt::format("page size {} is not a power of two in [4096, chunk size]", r.page_size));
    }
    if (r.length == 0 || r.length % r.page_size != 0) return bad(fmt::format("length {} is not a positive multiple of the page size", r.length));
    if (r.kind == RegionKind::kProcess && (r.start_address % r.page_size != 0 || r.start_address + r.length < r.start_address)) {
      return bad(fmt::format("start address {:#x} is not page aligned", r.start_address));
    }
    if (r.huge_page_size != 0) {
      if (!is_power_of_two(r.huge_page_size) || r.huge_page_size <= 4096 || r.huge_page_size > (uint64_t{1} << 30)) {
        return bad(fmt::format("huge page size {} is not a power of two in (4096, 1 GiB]", r.huge_page_size));
      }
      if (r.length % r.huge_page_size != 0 || (r.kind == RegionKind::kProcess && r.start_address % r.huge_page_size != 0)) {
        return bad(fmt::format("start address {:#x} or length {} is not a multiple of its huge page size {}",
                               r.start_address, r.length, r.huge_page_size));
      }
    }
    if (r.length > kMaxRegionLength) return bad(fmt::format("length {} is more than {}", r.length, kMaxRegionLength));
    // Not (length + chunk_size - 1) / chunk_size: that wraps for a length near 2^64 and let a
    // region of no chunks through, whose first fault indexed past them.
    uint64_t want_chunks = r.length / m.chunk_size + (r.length % m.chunk_size != 0);
    if (want_chunks > std::numeric_limits<uint32_t>::max()) {
      return bad(fmt::format("length {} needs {} chunks of {} bytes, more than a chunk number holds", r.length,
                             want_chunks, m.chunk_size));
    }
    if (r.chunks.size() != want_chunks) return bad(fmt::format("has {} chunks, its length needs {}", r.chunks.size(), want_chunks));
    for (size_t c = 0; c < r.chunks.size(); ++c) {
      const ChunkInfo& ch = r.chunks[c];
      uint32_t len = m.chunk_length(i, c);
      switch (ch.codec) {
        case Codec::kZero:
          if (ch.stored_length != 0) return bad(fmt::format("zero chunk {} has stored bytes", c));
          break;
        case Codec::kRaw:
          if (ch.stored_length != len) return bad(fmt::format("raw chunk {} stores {} bytes, not {}", c, ch.stored_length, len));
          break;
        case Codec::kZstd:
          if (ch.stored_length == 0 || ch.stored_length > len) {
            return bad(fmt::format("zstd chunk {} stores {} bytes (must be 1..{})", c, ch.stored_length, len));
          }
          break;
        case Codec::kZstdPages: {
          uint64_t table = uint64_t{len / r.page_size} * 4;
          if (m.format_version < 2) return bad(fmt::format("chunk {} uses page frames, which format 1 does not have", c));
          if (ch.stored_length <= table || ch.stored_length > len) {
            return bad(fmt::format("page-frame chunk {} stores {} bytes (must be {}..{})", c, ch.stored_length, table + 1, len));
          }
          break;
        }
        default:
          return Error(Errc::kUnsupported, fmt::format("region {}: chunk {} uses codec {}, which this version does not know", i, c, static_cast<int>(ch.codec)));
      }
      if (ch.codec != Codec::kZero && (ch.offset > m.data_length || m.data_length - ch.offset < ch.stored_length)) {
        return bad(fmt::format("chunk {} lies outside the data file ({}+{} > {})", c, ch.offset, ch.stored_length, m.data_length));
      }
    }
  }
  return ok_status();
}

std::vector<std::byte> encode_manifest(const Manifest& m) {
  capnp::MallocMessageBuilder builder;
  auto root = builder.initRoot<proto::Manifest>();
  root.setChunkSize(m.chunk_size);
  root.setCreatedUnixNs(m.created_unix_ns);
  root.setDataLength(m.data_length);
  root.setCompressionLevel(m.compression_level);
  root.setAppState(capnp::Data::Reader(reinterpret_cast<const kj::byte*>(m.app_state.data()), m.app_state.size()));
  root.setDictionary(capnp::Data::Reader(reinterpret_cast<const kj::byte*>(m.dictionary.data()), m.dictionary.size()));
  auto ws = root.initWorkingSet(static_cast<unsigned>(m.working_set.size()));
  for (size_t i = 0; i < m.working_set.size(); ++i) ws.set(static_cast<unsigned>(i), m.working_set[i]);
  auto regions = root.initRegions(static_cast<unsigned>(m.regions.size()));
  for (size_t i = 0; i < m.regions.size(); ++i) {
    const RegionInfo& r = m.regions[i];
    auto out = regions[static_cast<unsigned>(i)];
    out.setName(r.name);
    out.setStartAddress(r.start_address);
    out.setLength(r.length);
    out.setPageSize(r.page_size);
    out.setProtection(r.protection);
    out.setHugePageSize(r.huge_page_size);
    out.setKind(r.kind == RegionKind::kRawFile ? proto::RegionKind::RAW_FILE : proto::RegionKind::PROCESS);
    auto chunks = out.initChunks(static_cast<unsigned>(r.chunks.size()));
    for (size_t c = 0; c < r.chunks.size(); ++c) {
      auto ch = chunks[static_cast<unsigned>(c)];
      const ChunkInfo& in = r.chunks[c];
      ch.setCodec(static_cast<proto::Codec>(static_cast<uint16_t>(in.codec)));
      ch.setOffset(in.offset);
      ch.setStoredLength(in.stored_length);
      ch.setChecksum(in.checksum);
      ch.setStoredChecksum(in.stored_checksum);
    }
  }
  kj::Array<capnp::word> words = capnp::messageToFlatArray(builder);
  auto body = words.asBytes();
  std::vector<std::byte> out(kManifestHeaderSize + body.size());
  std::memcpy(out.data(), kManifestMagic, sizeof kManifestMagic);
  put_le32(out.data() + 8, m.format_version);
  put_le32(out.data() + 12, kManifestHeaderSize);
  put_le64(out.data() + 16, body.size());
  put_le64(out.data() + 24, XXH3_64bits(body.begin(), body.size()));
  std::memcpy(out.data() + kManifestHeaderSize, body.begin(), body.size());
  return out;
}

Result<Manifest> decode_manifest(std::span<const std::byte> bytes, const std::string& what) {
  auto fail = [&](Errc code, const std::string& why) { return Error(code, fmt::format("snapshot {}: {}", what, why)); };
  if (bytes.size() < kManifestHeaderSize || std::memcmp(bytes.data(), kManifestMagic, sizeof kManifestMagic) != 0) {
    return fail(Errc::kCorrupt, "not a lazymem snapshot manifest (bad magic); check the path");
  }
  uint32_t version = get_le32(bytes.data() + 8);
  if (version < kOldestFormatVersion || version > kFormatVersion) {
    return fail(Errc::kUnsupported,
                fmt::format("format version {} is not supported (this build reads versions {} to {}); upgrade lazymem",
                            version, kOldestFormatVersion, kFormatVersion));
  }
  uint32_t header_size = get_le32(bytes.data() + 12);
  uint64_t body_len = get_le64(bytes.data() + 16);
  uint64_t body_sum = get_le64(bytes.data() + 24);
  if (header_size != kManifestHeaderSize || body_len > kMaxManifestBytes || body_len % sizeof(capnp::word) != 0 ||
      bytes.size() - kManifestHeaderSize != body_len) {
    return fail(Errc::kCorrupt, fmt::format("manifest is truncated or has a bad header ({} body bytes, {} present)",
                                            body_len, bytes.size() - kManifestHeaderSize));
  }
  const std::byte* body = bytes.data() + kManifestHeaderSize;
  if (XXH3_64bits(body, body_len) != body_sum) return fail(Errc::kCorrupt, "manifest checksum mismatch: the file is damaged");

  // Cap'n Proto wants word alignment; the copy also detaches us from the caller's buffer.
  kj::Array<capnp::word> words = kj::heapArray<capnp::word>(body_len / sizeof(capnp::word));
  std::memcpy(words.begin(), body, body_len);
  Manifest m;
  try {
    capnp::ReaderOptions opts;
    opts.traversalLimitInWords = words.size() * 2 + 1024;
    opts.nestingLimit = 16;
    capnp::FlatArrayMessageReader reader(words.asPtr(), opts);
    auto root = reader.getRoot<proto::Manifest>();
    m.chunk_size = root.getChunkSize();
    m.created_unix_ns = root.getCreatedUnixNs();
    m.data_length = root.getDataLength();
    m.compression_level = root.getCompressionLevel();
    m.format_version = version;
    m.checksum = body_sum;
    auto dict = root.getDictionary();
    m.dictionary.assign(reinterpret_cast<const std::byte*>(dict.begin()), reinterpret_cast<const std::byte*>(dict.end()));
    auto state = root.getAppState();
    m.app_state.assign(reinterpret_cast<const std::byte*>(state.begin()), reinterpret_cast<const std::byte*>(state.end()));
    for (uint64_t w : root.getWorkingSet()) m.working_set.push_back(w);
    for (auto r : root.getRegions()) {
      RegionInfo info;
      info.name = r.getName();
      info.start_address = r.getStartAddress();
      info.length = r.getLength();
      info.page_size = r.getPageSize();
      info.protection = r.getProtection();
      info.huge_page_size = r.getHugePageSize();
      info.kind = r.getKind() == proto::RegionKind::RAW_FILE ? RegionKind::kRawFile : RegionKind::kProcess;
      auto chunks = r.getChunks();
      info.chunks.reserve(chunks.size());
      for (auto c : chunks) {
        // A codec number past what fits is kept unknown (validation refuses it), never wrapped.
        uint16_t codec = static_cast<uint16_t>(c.getCodec());
        info.chunks.push_back(ChunkInfo{static_cast<Codec>(codec > 255 ? 255 : codec), c.getOffset(),
                                        c.getStoredLength(), c.getChecksum(), c.getStoredChecksum()});
      }
      m.regions.push_back(std::move(info));
    }
  } catch (const kj::Exception& e) {
    return fail(Errc::kCorrupt, fmt::format("manifest does not parse: {}", e.getDescription().cStr()));
  }
  if (Status s = validate_manifest(m); !s.ok()) return fail(s.error().code(), s.error().message());
  return m;
}

}  // namespace snapshot
}  // namespace lazymem
