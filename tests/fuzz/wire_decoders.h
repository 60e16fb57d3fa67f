// The decoders a hostile peer can reach, driven the way the page server and the client drive
// them: frames out of a byte stream, headers parsed, every field of the message read, a
// manifest payload decoded (and its dictionary loaded), a chunk payload decoded as page frames
// (a hostile server can send frames whose checksums match: the manifest is its too), and as the
// single page frame of a getPage reply. Shared by the libFuzzer target and the replay test.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>

#include "byte_stream.h"
#include "net/frame.h"
#include "snapshot/chunk_codec.h"
#include "snapshot/dictionary.h"
#include "snapshot/manifest.h"
#include "wire.capnp.h"

namespace lazymem::fuzz {

inline uint64_t walk_request(proto::wire::Request::Reader r) {
  uint64_t acc = r.getId();
  switch (r.which()) {
    case proto::wire::Request::HELLO: acc += r.getHello().getVersion() + r.getHello().getClientNonce().size(); break;
    case proto::wire::Request::AUTHENTICATE: acc += r.getAuthenticate().size(); break;
    case proto::wire::Request::LIST: break;
    case proto::wire::Request::GET_MANIFEST: acc += r.getGetManifest().size(); break;
    case proto::wire::Request::GET_CHUNKS: {
      auto g = r.getGetChunks();
      acc += g.getSnapshot().size() + g.getDemand();
      for (auto c : g.getChunks()) acc += c.getRegion() + c.getChunk() + c.getTag();
      break;
    }
    case proto::wire::Request::GET_PAGE: {
      auto g = r.getGetPage();
      acc += g.getSnapshot().size() + g.getRegion() + g.getChunk() + g.getPage() + g.getTag() + g.getSession().size() +
             g.getReplyOnStream();
      break;
    }
    case proto::wire::Request::OPEN_DATAGRAMS: break;
    case proto::wire::Request::REMOVE: acc += r.getRemove().size(); break;
    case proto::wire::Request::COMPLETE: acc += r.getComplete().size(); break;
    case proto::wire::Request::PUT_BEGIN: acc += r.getPutBegin().getName().size() + r.getPutBegin().getReplace(); break;
    case proto::wire::Request::PUT_DATA:
    case proto::wire::Request::PUT_COMMIT:
    case proto::wire::Request::STATS: break;
  }
  return acc;
}

inline uint64_t walk_reply(proto::wire::Reply::Reader r) {
  uint64_t acc = r.getId();
  switch (r.which()) {
    case proto::wire::Reply::HELLO:
      acc += r.getHello().getServerNonce().size() + r.getHello().getAuthRequired() + r.getHello().getTakesComplete();
      break;
    case proto::wire::Reply::ERROR: acc += r.getError().getMessage().size() + static_cast<uint64_t>(r.getError().getCode()); break;
    case proto::wire::Reply::OK: break;
    case proto::wire::Reply::SNAPSHOTS:
      for (auto s : r.getSnapshots()) acc += s.getName().size() + s.getTotalBytes() + s.getFormatVersion();
      break;
    case proto::wire::Reply::MANIFEST: break;
    case proto::wire::Reply::CHUNK: acc += r.getChunk().getTag(); break;
    case proto::wire::Reply::PAGE: {
      auto p = r.getPage();
      acc += p.getRegion() + p.getChunk() + p.getPage() + p.getTag() + p.getWhole() + p.getStoredChecksum();
      break;
    }
    case proto::wire::Reply::STATS: acc += r.getStats().getBytes() + r.getStats().getUploads(); break;
    case proto::wire::Reply::DATAGRAMS: acc += r.getDatagrams().getSession().size() + r.getDatagrams().getMaxPayload(); break;
    case proto::wire::Reply::AUTHENTICATED: acc += r.getAuthenticated().size(); break;
  }
  return acc;
}

// `stored` as the stored bytes of a 64 KiB page-frame chunk that passed its stored checksum.
inline uint64_t decode_page_frames(std::span<const std::byte> stored) {
  static snapshot::ChunkDecoder dec;
  static std::vector<std::byte> out(kDefaultChunkSize);
  ChunkInfo info{Codec::kZstdPages, 0, static_cast<uint32_t>(stored.size()), 0, snapshot::chunk_checksum(stored)};
  if (!dec.verify_stored(info, stored, kDefaultChunkSize, 4096).ok()) return 0;
  uint64_t acc = 1;
  for (uint32_t i = 0; i < kDefaultChunkSize / 4096; ++i) {
    acc += dec.decode_page(stored, kDefaultChunkSize, i, std::span(out).subspan(size_t{i} * 4096, 4096), {}).ok();
  }
  return acc;
}

// `frame` as a getPage reply's page frame (what a faulting thread decodes in its handler).
inline uint64_t decode_one_frame(std::span<const std::byte> frame) {
  static snapshot::ChunkDecoder dec;
  static std::vector<std::byte> out(4096);
  return dec.decode_frame(frame, out, {}).ok();
}

// What a faulting thread reads of a reply header (net/page_fetcher.cc), done only when
// net::shallow_structs_in_bounds() passes it, as there: those reads must never throw (a throw
// allocates, in a SIGBUS handler). A throw here aborts: the fuzzer reports it as a crash.
inline uint64_t read_checked_reply(std::span<const std::byte> header) {
  if (header.empty() || header.size() % sizeof(capnp::word) != 0) return 0;
  auto words = kj::heapArray<capnp::word>(header.size() / sizeof(capnp::word));
  std::memcpy(static_cast<void*>(words.begin()), header.data(), header.size());
  if (!net::shallow_structs_in_bounds(words)) return 0;
  capnp::ReaderOptions opts;
  opts.traversalLimitInWords = words.size() * 4 + 64;
  opts.nestingLimit = 8;
  try {
    capnp::FlatArrayMessageReader reader(words, opts);
    auto r = reader.getRoot<proto::wire::Reply>();
    uint64_t acc = r.getId() + r.which();
    if (r.isPage()) {
      auto p = r.getPage();
      acc += p.getRegion() + p.getChunk() + p.getPage() + p.getTag() + p.getWhole() + p.getStoredChecksum();
    }
    if (r.isError()) acc += static_cast<uint64_t>(r.getError().getCode()) + r.getError().getTag();
    return acc | 1;
  } catch (const kj::Exception& e) {
    std::fprintf(stderr, "a reply that passed shallow_structs_in_bounds threw: %s\n", e.getDescription().cStr());
    std::abort();
  }
}

// `data` as one request datagram, as the page server reads it (getPage by UDP).
inline uint64_t decode_datagram(std::span<const uint8_t> data) {
  auto header = net::request_datagram_header(std::as_bytes(data));
  if (!header.ok()) return 0;
  auto h = net::Header::parse(*header);
  if (!h.ok()) return 1;
  try {
    return walk_request((*h)->root<proto::wire::Request>()) | 2;
  } catch (const kj::Exception&) {
    return 3;
  }
}

// Feeds `data` in uneven pieces, like recv() would deliver it. Never crashes, never hangs.
inline uint64_t decode_stream(std::span<const uint8_t> data) {
  uint64_t acc = 0;
  feed_frames(data, [&](const net::FrameView& f) {
    acc += read_checked_reply(f.header);
    auto h = net::Header::parse(f.header);
    if (h.ok()) {
      try {
        acc += walk_request((*h)->root<proto::wire::Request>());
      } catch (const kj::Exception&) {
      }
      try {
        acc += walk_reply((*h)->root<proto::wire::Reply>());
      } catch (const kj::Exception&) {
      }
    }
    auto m = snapshot::decode_manifest(f.payload, "fuzz");
    if (m.ok()) {
      acc += m->regions.size();
      auto d = snapshot::DecodeDictionary::load(m->dictionary);
      acc += d.ok() && *d;
    }
    acc += decode_page_frames(f.payload);
    acc += decode_one_frame(f.payload);
    return true;
  });
  return acc;
}

}  // namespace lazymem::fuzz
