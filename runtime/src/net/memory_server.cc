// MemoryServer: one snapshot served from this process's memory (see memory_server.h).
#include "net/memory_server.h"

#include <arpa/inet.h>
#include <fmt/format.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <optional>
#include <string_view>
#include <system_error>
#include <unordered_map>

#include "core/log.h"
#include "lazymem/snapshot.h"
#include "net/auth.h"
#include "net/server_handshake.h"
#include "net/frame.h"
#include "net/resolver.h"
#include "snapshot/manifest.h"
#include "sys/acceptor.h"
#include "sys/unique_fd.h"
#include "wire.capnp.h"

namespace lazymem::net {
namespace wire = proto::wire;
namespace {

using Clock = std::chrono::steady_clock;

// Per connection, the replies that may wait before its requests are no longer read. A restore
// keeps at most 64 chunk requests in flight (RestoreOptions::reads_in_flight), so it never
// meets the bound; a peer that asks and does not read does, and is then not read either.
constexpr size_t kMaxQueuedReplies = 64;
constexpr size_t kMaxQueuedBytes = 8 << 20;
// No request to a migration source carries a payload it wants (uploads are refused): the frame
// buffer refuses larger ones before making room for them, so a connection holds little.
constexpr uint32_t kMaxRequestPayload = 64 << 10;
// How long a connection being closed may take to read its last replies (an error saying why).
constexpr auto kClosingGrace = std::chrono::seconds(2);
constexpr size_t kMaxIov = 64;  // per sendmsg: a header and a span per reply
constexpr size_t kNoChunk = SIZE_MAX;
constexpr const char* kReadOnly = "this is a migration source: it serves one snapshot, read-only";

// A reply waiting to go: prefix and header, then its payload straight from where it lives (the
// snapshot's memory, or the manifest file the server holds). Nothing of the payload is copied.
struct OutFrame {
  std::vector<std::byte> head;
  std::span<const std::byte> payload;
  size_t chunk = kNoChunk;  // the chunk it carries (flat index): counted as sent once all of it is
  bool page = false;        // a getPage reply
  size_t size() const { return head.size() + payload.size(); }
};

struct Conn {
  sys::UniqueFd fd;
  std::string peer;  // HOST:PORT, for messages
  FrameBuffer in{kMaxRequestPayload};
  // Replies in the order they go: the one partly sent (`sent` bytes of it out), then demand
  // replies, then prefetch ones: a demand reply overtakes queued prefetch at a frame boundary.
  std::optional<OutFrame> partial;
  size_t sent = 0;
  std::deque<OutFrame> demand, prefetch;
  size_t queued_bytes = 0;  // of all of them, not sent yet
  bool hello = false, authed = false;
  bool prove_server = false;  // its hello asked us to prove we hold the token
  bool other_version = false;  // its hello named our snapshot at another manifest checksum
  bool closing = false;        // closed once its replies are out, or after kClosingGrace
  bool reading = false;        // asked for chunks or pages, and has not said `complete` since
  Clock::time_point opened = Clock::now(), closing_since{};
  uint32_t events = EPOLLIN;  // what epoll watches for now
  Nonce server_nonce{}, client_nonce{};

  size_t queued() const { return demand.size() + prefetch.size() + (partial ? 1 : 0); }
  bool over_bound() const { return queued() > kMaxQueuedReplies || queued_bytes > kMaxQueuedBytes; }
  void close_after_replies() {
    if (!closing) closing_since = Clock::now();
    closing = true;
  }
};

std::string peer_name(int fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  if (::getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return fmt::format("fd {}", fd);
  char host[INET6_ADDRSTRLEN] = "?";
  uint16_t port = 0;
  if (ss.ss_family == AF_INET6) {
    const auto& a = reinterpret_cast<const sockaddr_in6&>(ss);
    ::inet_ntop(AF_INET6, &a.sin6_addr, host, sizeof host);
    return fmt::format("[{}]:{}", host, ntohs(a.sin6_port));
  }
  const auto& a = reinterpret_cast<const sockaddr_in&>(ss);
  ::inet_ntop(AF_INET, &a.sin_addr, host, sizeof host);
  port = ntohs(a.sin_port);
  return fmt::format("{}:{}", host, port);
}

std::string_view text(capnp::Text::Reader t) { return {t.cStr(), t.size()}; }

}  // namespace

struct MemoryServer::Impl {
  std::string name;
  std::vector<std::byte> manifest_file;
  Manifest manifest;
  MemoryServerOptions opt;
  std::vector<size_t> first_chunk;                // per region: the flat index of its chunk 0
  std::vector<std::span<const std::byte>> bytes;  // per chunk (flat): what is sent; empty: not served
  std::vector<bool> sent;                         // per chunk (flat): sent whole at least once
  uint64_t to_serve = 0;
  sys::UniqueFd listen_fd, epoll_fd, stop_fd;
  uint16_t port = 0;
  sys::Acceptor acceptor;  // sheds peers when out of descriptors
  std::unordered_map<int, std::unique_ptr<Conn>> conns;
  std::shared_ptr<spdlog::logger> log = log::get("runtime");
  Clock::time_point next_warn{};

  std::atomic<uint64_t> st_conn{0}, st_open{0}, st_refused{0}, st_hs{0}, st_req{0}, st_chunks{0}, st_bytes{0}, st_pages{0},
      st_distinct{0}, st_proto{0}, st_auth{0}, st_nf{0}, st_range{0}, st_completed{0};
  // wait_drained() sleeps on `drained`, woken whenever chunks are sent or connections come and go.
  std::mutex mu;
  std::condition_variable drained;
  std::optional<Error> failed;  // (under mu) what stopped the loop

  static void bump(std::atomic<uint64_t>& c, uint64_t n = 1) { c.fetch_add(n, std::memory_order_relaxed); }
  // After a change wait_drained() waits for: the lock orders it before a waiter's next look.
  void changed() {
    { std::lock_guard lock(mu); }
    drained.notify_all();
  }
  // Drained: a destination read the manifest, and then said it holds every page it needs
  // (Request.complete) with no connection still reading (one that asked for chunks or pages and
  // said nothing since: a restore's page fetchers, another process's restore, a second
  // destination), or every chunk went out at least once and no connection has been open for
  // `linger` (a restore that lost its connection comes back; one from before `complete` says
  // nothing). Without the first, a source with nothing written since pre-copy would be drained
  // before the destination ever came, and would exit with the only copy of the manifest.
  bool is_drained(Clock::time_point now) const {
    if (manifest_state.load(std::memory_order_relaxed) != kManifestSent) return false;
    if (st_completed.load(std::memory_order_relaxed) > 0 && reading_conns.load(std::memory_order_relaxed) == 0) {
      return true;
    }
    return st_distinct.load(std::memory_order_relaxed) == to_serve && st_open.load(std::memory_order_relaxed) == 0 &&
           now - Clock::time_point(Clock::duration(last_close.load(std::memory_order_relaxed))) >= opt.linger;
  }
  // Whether a peer has read the manifest, or it was withdrawn (withdraw()) before any did: one
  // atomic, so that a manifest being read and a migration being called off cannot both win.
  static constexpr int kManifestOpen = 0, kManifestSent = 1, kManifestWithdrawn = 2;
  std::atomic<int> manifest_state{kManifestOpen};
  std::atomic<Clock::rep> last_close{0};
  std::atomic<uint64_t> reading_conns{0};  // open connections with Conn::reading

  // Peers' misbehaviour: counted always, logged at most once a second (a flood of bad peers must
  // not flood the log of the host being migrated).
  void warn(const Conn& c, std::string_view what) {
    const auto now = Clock::now();
    if (now < next_warn) return;
    next_warn = now + std::chrono::seconds(1);
    log->warn("migration source '{}': {}: {}; closing it (more this second only counted)", name, c.peer, what);
  }

  size_t chunk_index(uint32_t region, uint32_t chunk) const {
    if (region >= manifest.regions.size() || chunk >= manifest.regions[region].chunks.size()) return kNoChunk;
    return first_chunk[region] + chunk;
  }

  // ---- replies ----

  void push(Conn& c, OutFrame f, bool demand) {
    c.queued_bytes += f.size();
    (demand ? c.demand : c.prefetch).push_back(std::move(f));
  }
  void reply(Conn& c, capnp::MessageBuilder& m, std::span<const std::byte> payload = {}) {
    push(c, OutFrame{encode_frame(m, static_cast<uint32_t>(payload.size())), payload, kNoChunk, false}, true);
  }
  void reply_error(Conn& c, uint64_t id, wire::ErrorCode code, const std::string& msg, uint64_t tag = 0,
                   bool demand = true) {
    capnp::MallocMessageBuilder m(64);
    auto r = m.initRoot<wire::Reply>();
    r.setId(id);
    auto e = r.initError();
    e.setCode(code);
    e.setMessage(msg);
    e.setTag(tag);
    push(c, OutFrame{encode_frame(m, 0), {}, kNoChunk, false}, demand);
  }

  // Why requests of `c` naming snapshot `asked` are not served (nullopt: they are).
  std::optional<std::string> not_ours(const Conn& c, std::string_view asked) const {
    if (asked != name) {
      return fmt::format("no snapshot '{}' here: this migration source serves '{}' only",
                         snapshot::escape_name(asked.substr(0, 256)), name);
    }
    if (c.other_version) {
      return fmt::format("this migration source serves another version of '{}' (manifest {:016x}) than the one this "
                         "restore read: restore again from its current manifest",
                         name, manifest.checksum);
    }
    return std::nullopt;
  }

  // A chunk (getChunks) or a page of it (getPage, `page` set): the reply points into the memory.
  void queue_chunk(Conn& c, uint64_t id, uint32_t region, uint32_t chunk, uint64_t tag, std::optional<uint32_t> page,
                   bool demand) {
    if (!c.reading) {
      c.reading = true;
      reading_conns.fetch_add(1, std::memory_order_relaxed);
    }
    const size_t at = chunk_index(region, chunk);
    if (at == kNoChunk || bytes[at].empty()) {
      bump(st_range);
      std::string why;
      if (at == kNoChunk) {
        why = fmt::format("chunk {}/{} is outside snapshot '{}'", region, chunk, name);
      } else if (manifest.regions[region].chunks[chunk].codec == Codec::kZero) {
        why = fmt::format("chunk {}/{} of snapshot '{}' is all zero: nothing is stored to send", region, chunk, name);
      } else {
        why = fmt::format("chunk {}/{} of snapshot '{}' is not served by this migration source", region, chunk, name);
      }
      return reply_error(c, id, wire::ErrorCode::OUT_OF_RANGE, why, tag, demand);
    }
    const ChunkInfo& ci = manifest.regions[region].chunks[chunk];
    capnp::MallocMessageBuilder m(64);
    auto r = m.initRoot<wire::Reply>();
    r.setId(id);
    if (page) {
      const uint32_t pages = manifest.chunk_length(region, chunk) / manifest.regions[region].page_size;
      if (*page >= pages) {
        bump(st_range);
        return reply_error(c, id, wire::ErrorCode::OUT_OF_RANGE,
                           fmt::format("page {} is outside chunk {}/{} of snapshot '{}' ({} pages)", *page, region,
                                       chunk, name, pages),
                           tag, demand);
      }
      // Always the whole stored chunk: the client verifies it against its manifest as for
      // getChunks (a page frame alone would be ours to verify first; not worth it here).
      auto p = r.initPage();
      p.setRegion(region);
      p.setChunk(chunk);
      p.setPage(*page);
      p.setTag(tag);
      p.setWhole(true);
      p.setStoredChecksum(ci.stored_checksum);
    } else {
      auto ch = r.initChunk();
      ch.setRegion(region);
      ch.setChunk(chunk);
      ch.setTag(tag);
    }
    push(c, OutFrame{encode_frame(m, static_cast<uint32_t>(bytes[at].size())), bytes[at], at, page.has_value()}, demand);
  }

  // ---- requests ----

  void on_hello(Conn& c, uint64_t id, wire::Hello::Reader h) {
    if (auto refused = accept_hello(h, c.client_nonce, c.server_nonce)) {
      if (refused->code == wire::ErrorCode::BAD_REQUEST) {
        bump(st_proto);
        warn(c, refused->message);
      }
      reply_error(c, id, refused->code, refused->message);
      return c.close_after_replies();
    }
    c.hello = true;
    c.authed = opt.token.empty();
    c.prove_server = h.getProveServer();
    // A restore's connections name the version they read; another name is refused per request.
    c.other_version = h.getManifestChecksum() != 0 && h.hasSnapshot() && text(h.getSnapshot()) == name &&
                      h.getManifestChecksum() != manifest.checksum;
    capnp::MallocMessageBuilder m(64);
    auto r = m.initRoot<wire::Reply>();
    r.setId(id);
    fill_hello_reply(r.initHello(), c.server_nonce, !opt.token.empty());
    reply(c, m);
  }

  void on_authenticate(Conn& c, uint64_t id, capnp::Data::Reader mac) {
    if (authentic(opt.token, mac, c.server_nonce, c.client_nonce)) {
      c.authed = true;
      capnp::MallocMessageBuilder m(32);
      auto r = m.initRoot<wire::Reply>();
      r.setId(id);
      fill_authenticated(r, c.prove_server, opt.token, c.server_nonce, c.client_nonce);
      return reply(c, m);
    }
    bump(st_auth);
    warn(c, "wrong token");
    reply_error(c, id, wire::ErrorCode::AUTH_FAILED,
                "wrong token: the restore's token file does not hold this migration source's token");
    c.close_after_replies();
  }

  void on_stats(Conn& c, uint64_t id) {
    const Stats st = stats();
    capnp::MallocMessageBuilder m(64);
    auto r = m.initRoot<wire::Reply>();
    r.setId(id);
    auto o = r.initStats();
    o.setConnections(st.connections);
    o.setOpenConnections(st.open_connections);
    o.setConnectionsRefused(st.connections_refused);
    o.setHandshakeTimeouts(st.handshake_timeouts);
    o.setRequests(st.requests);
    o.setChunks(st.chunks_sent);
    o.setBytes(st.bytes_sent);
    o.setPlainBytes(st.bytes_sent);  // every send is a plain one
    o.setErrorsProtocol(st.errors_protocol);
    o.setErrorsAuth(st.errors_auth);
    o.setErrorsNotFound(st.errors_not_found);
    o.setErrorsRange(st.errors_range);
    o.setRestoresCompleted(st.restores_completed);
    reply(c, m);
  }

  void on_list(Conn& c, uint64_t id) {
    capnp::MallocMessageBuilder m(64);
    auto r = m.initRoot<wire::Reply>();
    r.setId(id);
    auto s = r.initSnapshots(1)[0];
    s.setName(name);
    s.setTotalBytes(manifest.total_bytes());
    s.setStoredBytes(manifest.stored_bytes());
    s.setRegions(static_cast<uint32_t>(manifest.regions.size()));
    s.setCreatedUnixNs(manifest.created_unix_ns);
    s.setFormatVersion(manifest.format_version);
    reply(c, m);
  }

  void handle(Conn& c, Header& h) {
    bump(st_req);
    uint64_t id = 0;
    try {
      auto rq = h.root<wire::Request>();
      id = rq.getId();
      if (rq.isHello()) return on_hello(c, id, rq.getHello());
      if (!c.hello) {
        bump(st_proto);
        warn(c, "a request before hello");
        reply_error(c, id, wire::ErrorCode::BAD_REQUEST, "send hello first");
        return c.close_after_replies();
      }
      if (rq.isAuthenticate()) return on_authenticate(c, id, rq.getAuthenticate());
      if (!c.authed) {
        bump(st_auth);
        warn(c, "a request before authenticating");
        reply_error(c, id, wire::ErrorCode::AUTH_REQUIRED,
                    "authenticate first: this migration source needs a token (give the restore its token file)");
        return c.close_after_replies();
      }
      switch (rq.which()) {
        case wire::Request::LIST:
          return on_list(c, id);
        case wire::Request::STATS:
          return on_stats(c, id);
        case wire::Request::GET_MANIFEST: {
          if (auto why = not_ours(c, text(rq.getGetManifest()))) {
            bump(st_nf);
            return reply_error(c, id, wire::ErrorCode::NOT_FOUND, *why);
          }
          if (int was = kManifestOpen; !manifest_state.compare_exchange_strong(was, kManifestSent) &&
                                       was == kManifestWithdrawn) {
            bump(st_nf);
            return reply_error(c, id, wire::ErrorCode::NOT_FOUND,
                               fmt::format("the migration of '{}' was called off at its source, which runs it again; "
                                           "nothing here to restore",
                                           name));
          }
          capnp::MallocMessageBuilder m(16);
          auto r = m.initRoot<wire::Reply>();
          r.setId(id);
          r.setManifest();
          changed();
          return reply(c, m, manifest_file);
        }
        case wire::Request::GET_CHUNKS: {
          auto gc = rq.getGetChunks();
          const bool demand = gc.getDemand();
          auto why = not_ours(c, text(gc.getSnapshot()));
          for (auto ch : gc.getChunks()) {
            if (why) {
              bump(st_nf);
              reply_error(c, id, wire::ErrorCode::NOT_FOUND, *why, ch.getTag(), demand);
              continue;
            }
            queue_chunk(c, id, ch.getRegion(), ch.getChunk(), ch.getTag(), std::nullopt, demand);
          }
          return;
        }
        case wire::Request::GET_PAGE: {  // a thread waits on it: the demand lane
          auto gp = rq.getGetPage();
          if (auto why = not_ours(c, text(gp.getSnapshot()))) {
            bump(st_nf);
            return reply_error(c, id, wire::ErrorCode::NOT_FOUND, *why, gp.getTag());
          }
          return queue_chunk(c, id, gp.getRegion(), gp.getChunk(), gp.getTag(), gp.getPage(), true);
        }
        case wire::Request::COMPLETE: {  // no reply: the destination is hanging up
          if (auto why = not_ours(c, text(rq.getComplete()))) {
            bump(st_nf);
            return reply_error(c, id, wire::ErrorCode::NOT_FOUND, *why);
          }
          if (manifest_state.load(std::memory_order_relaxed) != kManifestSent) {
            // Nobody has read the manifest: whoever says this restores nothing from here.
            bump(st_proto);
            warn(c, "'complete' before any destination read the manifest");
            return reply_error(c, id, wire::ErrorCode::BAD_REQUEST, "nothing was restored from here yet");
          }
          if (c.reading) {
            c.reading = false;
            reading_conns.fetch_sub(1, std::memory_order_relaxed);
          }
          if (!st_completed.fetch_add(1, std::memory_order_relaxed)) {
            log->info("migration source '{}': the destination holds every page it needs ({} of {} chunks sent from "
                      "here); serving no longer",
                      name, st_distinct.load(std::memory_order_relaxed), to_serve);
          }
          return changed();
        }
        case wire::Request::OPEN_DATAGRAMS:
          // Any error will do: the page fetcher then asks for its pages on the connection.
          return reply_error(c, id, wire::ErrorCode::BAD_REQUEST,
                             "this migration source takes no datagrams: ask on the connection");
        case wire::Request::PUT_DATA:
          // Answered only to refuse; the upload's next frames would not be: closed.
          reply_error(c, id, wire::ErrorCode::BAD_REQUEST, kReadOnly);
          return c.close_after_replies();
        case wire::Request::PUT_BEGIN:
        case wire::Request::PUT_COMMIT:
        case wire::Request::REMOVE:
          return reply_error(c, id, wire::ErrorCode::BAD_REQUEST, kReadOnly);
        default:
          bump(st_proto);
          return reply_error(c, id, wire::ErrorCode::BAD_REQUEST,
                             "unknown request (from a newer protocol than this migration source speaks)");
      }
    } catch (const kj::Exception& e) {
      bump(st_proto);
      warn(c, fmt::format("malformed request: {}", e.getDescription().cStr()));
      reply_error(c, id, wire::ErrorCode::BAD_REQUEST,
                  fmt::format("malformed request: {}", e.getDescription().cStr()));
      c.close_after_replies();
    }
  }

  // Handles the whole frames buffered while the connection is under its bound. The number
  // handled, or -1 if the peer broke the framing (the caller closes it).
  int handle_frames(Conn& c) {
    int handled = 0;
    while (!c.closing && !c.over_bound()) {
      auto f = c.in.next();
      if (!f.ok()) {
        bump(st_proto);
        warn(c, f.error().message());
        return -1;
      }
      if (!f->has_value()) break;
      auto h = Header::parse((*f)->header);
      if (!h.ok()) {
        bump(st_proto);
        warn(c, h.error().message());
        return -1;
      }
      // A payload is never used (no request here takes one): only its length was checked.
      handle(c, **h);
      c.in.consume();
      ++handled;
    }
    return handled;
  }

  // ---- connections ----

  // Reads what the peer sent while under its bound. False: it broke the framing.
  bool on_readable(Conn& c) {
    for (int i = 0; i < 8 && !c.closing && !c.over_bound(); ++i) {
      auto space = c.in.writable(16 << 10);
      const ssize_t n = ::recv(c.fd.get(), space.data(), space.size(), MSG_DONTWAIT);
      if (n == 0) {  // it sent all it will: its replies still go out
        c.close_after_replies();
        break;
      }
      if (n < 0) {
        if (errno == EINTR) continue;
        return errno == EAGAIN;
      }
      c.in.commit(static_cast<size_t>(n));
      if (handle_frames(c) < 0) return false;
      if (static_cast<size_t>(n) < space.size()) break;  // level-triggered: more wakes us again
    }
    return true;
  }

  void sent_whole(const OutFrame& f) {
    if (f.chunk == kNoChunk) return;
    bump(st_chunks);
    bump(st_bytes, f.payload.size());
    if (f.page) bump(st_pages);
    if (sent[f.chunk]) return;
    sent[f.chunk] = true;
    bump(st_distinct);
    changed();
  }

  // `n` bytes went out, from the front of the queue in the order flush() gathered them.
  void consume(Conn& c, size_t n) {
    c.queued_bytes -= n;
    if (c.partial) {
      const size_t left = c.partial->size() - c.sent;
      if (n < left) {
        c.sent += n;
        return;
      }
      n -= left;
      sent_whole(*c.partial);
      c.partial.reset();
      c.sent = 0;
    }
    for (auto* lane : {&c.demand, &c.prefetch}) {
      while (!lane->empty()) {
        const size_t size = lane->front().size();
        if (n < size) {
          if (n > 0) {  // begun: it goes on first, whatever comes into the lanes meanwhile
            c.partial = std::move(lane->front());
            lane->pop_front();
            c.sent = n;
          }
          return;
        }
        n -= size;
        sent_whole(lane->front());
        lane->pop_front();
      }
    }
  }

  // Sends as much of the queue as the socket takes now, many replies per sendmsg. False: the
  // connection failed.
  // Sends queued replies until the socket is full, or, with `down_to_bound`, until the
  // connection is back under its bound.
  bool flush(Conn& c, bool down_to_bound = false) {
    while (c.queued() > 0 && !(down_to_bound && !c.over_bound())) {
      iovec iov[kMaxIov];
      size_t n = 0;
      auto add = [&](const OutFrame& f, size_t skip) {
        if (n + 2 > kMaxIov) return false;
        for (std::span<const std::byte> part : {std::span<const std::byte>(f.head), f.payload}) {
          if (skip >= part.size()) {
            skip -= part.size();
            continue;
          }
          iov[n++] = {const_cast<std::byte*>(part.data()) + skip, part.size() - skip};
          skip = 0;
        }
        return true;
      };
      if (c.partial) add(*c.partial, c.sent);
      for (const OutFrame& f : c.demand)
        if (!add(f, 0)) break;
      for (const OutFrame& f : c.prefetch)
        if (!add(f, 0)) break;
      msghdr mh{};
      mh.msg_iov = iov;
      mh.msg_iovlen = n;
      const ssize_t s = ::sendmsg(c.fd.get(), &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (s < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN) return true;
        if (errno == EFAULT) {  // ours, not the peer's: say so whatever the rate
          log->error("migration source '{}': the memory of a chunk could not be read (unmapped while it is served?); "
                     "closing {}",
                     name, c.peer);
        } else {
          log->debug("migration source '{}': send to {}: {}", name, c.peer, std::strerror(errno));
        }
        return false;
      }
      consume(c, static_cast<size_t>(s));
    }
    return true;
  }

  // Moves a connection on after an event: frames left buffered while it was over its bound are
  // handled once it is under again, and replies sent. False: close it.
  bool pump(Conn& c) {
    for (;;) {
      const bool was_over = c.over_bound();
      const int handled = handle_frames(c);
      if (handled < 0) return false;
      // Over the bound with requests still buffered: send only down to the bound, then handle
      // them, so that a demand request among them goes ahead of the prefetch replies still
      // queued. They are handled even if the queue empties meanwhile: the peer may have sent
      // all it will, and no read event would come for them.
      const bool requests_wait = c.over_bound() && c.in.buffered() > 0;
      if (!flush(c, requests_wait)) return false;
      if (requests_wait && !c.over_bound()) continue;
      if (c.queued() > 0) break;             // more when the socket takes it (EPOLLOUT)
      if (handled == 0 && !was_over) break;  // nothing left buffered
    }
    if (c.closing && c.queued() == 0) return false;
    const uint32_t want = (c.closing || c.over_bound() ? 0u : uint32_t{EPOLLIN}) | (c.queued() > 0 ? uint32_t{EPOLLOUT} : 0u);
    if (want != c.events) {
      epoll_event ev{};
      ev.events = want;
      ev.data.fd = c.fd.get();
      ::epoll_ctl(epoll_fd.get(), EPOLL_CTL_MOD, c.fd.get(), &ev);
      c.events = want;
    }
    return true;
  }

  void close_conn(int fd) {
    auto it = conns.find(fd);
    if (it == conns.end()) return;
    ::epoll_ctl(epoll_fd.get(), EPOLL_CTL_DEL, fd, nullptr);
    if (it->second->reading) reading_conns.fetch_sub(1, std::memory_order_relaxed);
    conns.erase(it);
    last_close = Clock::now().time_since_epoch().count();
    st_open.fetch_sub(1, std::memory_order_relaxed);
    changed();
  }

  void accept_all() {
    for (;;) {
      auto next = acceptor.accept(listen_fd.get());
      if (next.shed) {
        bump(st_refused);
        log->warn("migration source '{}': out of file descriptors: a connection was refused (raise ulimit -n)", name);
        continue;
      }
      if (!next.fd.valid()) return;
      // Full: the oldest connection still in its handshake makes room (the destination is
      // never kept out by peers that never authenticate).
      if (conns.size() >= opt.max_connections) {
        if (const int oldest = net::oldest_unauthenticated(conns); oldest >= 0) {
          bump(st_hs);
          close_conn(oldest);
        }
      }
      if (conns.size() >= opt.max_connections) {
        bump(st_refused);
        const auto now = Clock::now();
        if (now >= next_warn) {
          next_warn = now + std::chrono::seconds(1);
          log->warn("migration source '{}': {} connections open, the limit: {} refused (raise "
                    "MemoryServerOptions::max_connections if a restore needs more)",
                    name, conns.size(), peer_name(next.fd.get()));
        }
        continue;  // closed as it goes
      }
      int one = 1;
      ::setsockopt(next.fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);  // replies are latency
      auto c = std::make_unique<Conn>();
      c->peer = peer_name(next.fd.get());
      c->fd = std::move(next.fd);
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.fd = c->fd.get();
      if (::epoll_ctl(epoll_fd.get(), EPOLL_CTL_ADD, c->fd.get(), &ev) != 0) {
        bump(st_refused);
        continue;
      }
      const int fd = c->fd.get();
      conns.emplace(fd, std::move(c));
      bump(st_conn);
      bump(st_open);
      changed();
    }
  }

  // Connections past their time: no handshake within opt.handshake_timeout, or closing and
  // still not reading their last replies. Returns the ms until the next such deadline (-1: none).
  int expire() {
    const auto now = Clock::now();
    std::vector<int> doomed;
    auto soonest = Clock::time_point::max();
    for (const auto& [fd, c] : conns) {
      const auto due = c->closing ? c->closing_since + kClosingGrace
                       : !c->authed ? c->opened + opt.handshake_timeout
                                    : Clock::time_point::max();
      if (due <= now) {
        doomed.push_back(fd);
        if (!c->closing) {
          bump(st_hs);
          log->debug("migration source '{}': {}: no handshake within {} ms; closing", name, c->peer,
                     opt.handshake_timeout.count());
        }
      } else {
        soonest = std::min(soonest, due);
      }
    }
    for (int fd : doomed) close_conn(fd);
    if (soonest == Clock::time_point::max()) return -1;
    return static_cast<int>(std::chrono::ceil<std::chrono::milliseconds>(soonest - now).count());
  }

  Status run() {
    epoll_event events[64];
    int timeout = -1;
    for (;;) {
      const int n = ::epoll_wait(epoll_fd.get(), events, 64, timeout);
      if (n < 0 && errno != EINTR) return sys_error(fmt::format("migration source '{}': epoll_wait", name), errno);
      for (int i = 0; i < n; ++i) {
        const int fd = events[i].data.fd;
        const uint32_t what = events[i].events;
        if (fd == stop_fd.get()) return ok_status();
        if (fd == listen_fd.get()) {
          accept_all();
          continue;
        }
        auto it = conns.find(fd);
        if (it == conns.end()) continue;
        Conn& c = *it->second;
        // Hung up or reset: nothing sent can arrive any more.
        bool keep = (what & (EPOLLHUP | EPOLLERR)) == 0;
        if (keep && (what & EPOLLIN)) keep = on_readable(c);
        if (keep) keep = pump(c);
        if (!keep) close_conn(fd);
      }
      timeout = expire();
    }
  }

  Stats stats() const {
    auto r = [](const std::atomic<uint64_t>& a) { return a.load(std::memory_order_relaxed); };
    Stats st;
    st.connections = r(st_conn);
    st.open_connections = r(st_open);
    st.connections_refused = r(st_refused);
    st.handshake_timeouts = r(st_hs);
    st.requests = r(st_req);
    st.chunks_sent = r(st_chunks);
    st.bytes_sent = r(st_bytes);
    st.pages_sent = r(st_pages);
    st.chunks_to_serve = to_serve;
    st.distinct_chunks_sent = r(st_distinct);
    st.errors_protocol = r(st_proto);
    st.errors_auth = r(st_auth);
    st.errors_not_found = r(st_nf);
    st.errors_range = r(st_range);
    st.restores_completed = r(st_completed);
    return st;
  }
};

MemoryServer::MemoryServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Result<std::unique_ptr<MemoryServer>> MemoryServer::start(std::string name, std::vector<std::byte> manifest_file,
                                                          ChunkBytes chunk_bytes, MemoryServerOptions options) {
  if (name.empty() || name.size() > 200 || name.find('/') != std::string::npos || !snapshot::printable_name(name)) {
    return Error(Errc::kInvalidArgument,
                 fmt::format("migration source name '{}': give 1-200 printable characters without '/' (the NAME of "
                             "lazymem://HOST:PORT/NAME)",
                             snapshot::escape_name(name)));
  }
  auto im = std::make_unique<Impl>();
  im->name = std::move(name);
  im->opt = std::move(options);
  LAZYMEM_ASSIGN_OR_RETURN(im->manifest,
                           snapshot::decode_manifest(manifest_file, fmt::format("migration source '{}'", im->name)));
  im->manifest_file = std::move(manifest_file);
  const Manifest& man = im->manifest;
  size_t total = 0;
  for (const RegionInfo& r : man.regions) {
    im->first_chunk.push_back(total);
    total += r.chunks.size();
  }
  im->bytes.resize(total);
  im->sent.resize(total);
  for (uint32_t r = 0; r < man.regions.size(); ++r) {
    for (uint32_t k = 0; k < man.regions[r].chunks.size(); ++k) {
      const ChunkInfo& ci = man.regions[r].chunks[k];
      if (ci.codec == Codec::kZero) continue;
      std::span<const std::byte> b = chunk_bytes(r, k);
      if (b.empty()) continue;
      if (b.size() != ci.stored_length) {
        return Error(Errc::kInvalidArgument,
                     fmt::format("migration source '{}': chunk {}/{} of region '{}' was given {} bytes; its manifest "
                                 "entry ({}) stores {}: give the bytes the manifest describes",
                                 im->name, r, k, man.regions[r].name, b.size(), codec_name(ci.codec), ci.stored_length));
      }
      im->bytes[im->first_chunk[r] + k] = b;
      ++im->to_serve;
    }
  }
  if (!im->opt.listener) {
    LAZYMEM_ASSIGN_OR_RETURN(Listener l, listen_tcp("migration source listen address", im->opt.listen, 64));
    im->opt.listener = std::make_shared<Listener>(std::move(l));
  }
  im->listen_fd = std::move(im->opt.listener->fd);
  im->port = im->opt.listener->port;
  im->epoll_fd.reset(::epoll_create1(EPOLL_CLOEXEC));
  if (!im->epoll_fd.valid()) return sys_error("migration source: epoll_create1", errno);
  im->stop_fd.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!im->stop_fd.valid()) return sys_error("migration source: eventfd", errno);
  for (int fd : {im->listen_fd.get(), im->stop_fd.get()}) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = fd;
    if (::epoll_ctl(im->epoll_fd.get(), EPOLL_CTL_ADD, fd, &ev) != 0) return sys_error("migration source: epoll_ctl", errno);
  }
  std::unique_ptr<MemoryServer> s(new MemoryServer(std::move(im)));
  Impl* loop = s->impl_.get();
  try {
    s->thread_ = std::thread([loop] {
      Status st = loop->run();
      if (st.ok()) return;
      loop->log->error("{}; no longer serving", st.error().message());
      {
        std::lock_guard lock(loop->mu);
        loop->failed = st.error();
      }
      loop->drained.notify_all();
    });
  } catch (const std::system_error& e) {
    return Error(Errc::kIo, fmt::format("migration source '{}': no thread to serve it: {}", loop->name, e.what()));
  }
  return s;
}

MemoryServer::~MemoryServer() {
  if (thread_.joinable()) {
    const uint64_t one = 1;
    (void)!::write(impl_->stop_fd.get(), &one, sizeof one);
    thread_.join();
  }
}

uint16_t MemoryServer::port() const { return impl_->port; }

MemoryServer::Stats MemoryServer::stats() const { return impl_->stats(); }

bool MemoryServer::withdraw() {
  int was = Impl::kManifestOpen;
  return impl_->manifest_state.compare_exchange_strong(was, Impl::kManifestWithdrawn) || was == Impl::kManifestWithdrawn;
}

Status MemoryServer::wait_drained(std::chrono::milliseconds timeout, const std::function<bool()>& stop) {
  Impl& im = *impl_;
  std::unique_lock lock(im.mu);
  const auto deadline = Clock::now() + timeout;
  // Woken by every change; the linger after the last close passes with no change: looked at
  // every 50 ms.
  for (auto now = Clock::now(); !im.failed && !im.is_drained(now); now = Clock::now()) {
    if (stop && stop()) return Error(Errc::kCancelled, fmt::format("migration source '{}': the wait was stopped", im.name));
    if (now >= deadline) {
      const Stats st = im.stats();
      const uint64_t missing = st.chunks_to_serve - st.distinct_chunks_sent;
      return Error(Errc::kTimeout,
                   fmt::format("migration source '{}' not drained after {} ms: {}{} of its {} chunks were never sent "
                               "(the destination has not asked for them), {} connections are open; wait longer, or "
                               "check that the destination's restore runs and finishes",
                               im.name, timeout.count(),
                               im.manifest_state == Impl::kManifestSent ? "" : "no destination has read the manifest, ",
                               missing,
                               st.chunks_to_serve, st.open_connections));
    }
    im.drained.wait_until(lock, std::min(deadline, now + std::chrono::milliseconds(50)));
  }
  if (im.failed) return *im.failed;
  return ok_status();
}

}  // namespace lazymem::net
