// PageServer: serves the snapshots of a local store to restoring hosts over TCP.
#include "page_server.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <set>
#include <unordered_map>

#include "core/log.h"
#include "sys/ring.h"
#include "net/auth.h"
#include "net/frame.h"
#include "snapshot/manifest.h"
#include "snapshot/store.h"
#include "wire.capnp.h"

namespace lazymem::pageserver {
namespace wire = proto::wire;
namespace {

using Clock = std::chrono::steady_clock;
constexpr uint64_t kAlign = 4096;

struct OpenSnapshot {
  std::string name;
  Manifest manifest;
  std::vector<std::byte> manifest_bytes;
  sys::UniqueFd data;
};

struct Job {
  std::shared_ptr<OpenSnapshot> snap;
  uint32_t region, chunk;
  uint64_t tag, id;
};

struct Conn {
  sys::UniqueFd fd;
  uint64_t serial = 0;        // tells a reused fd number from the connection a read was for
  size_t reads_in_flight = 0;
  size_t read_bytes_in_flight = 0;
  net::FrameBuffer in;
  std::deque<std::vector<std::byte>> out;
  size_t out_off = 0;
  size_t out_bytes = 0;
  bool hello = false;
  bool authed = false;
  bool reading = true;
  bool closing = false;  // close once the output queue is flushed
  net::Nonce server_nonce{};
  net::Nonce client_nonce{};
  std::deque<Job> demand, prefetch;
  Clock::time_point opened = Clock::now();
  // An upload in progress: dropped (and its temporary directory removed) if the connection
  // ends before putCommit, so a half-uploaded snapshot is never served.
  std::unique_ptr<snapshot::SnapshotSink> upload;
  std::string upload_name;
};

}  // namespace

struct PageServer::Impl {
  ServerOptions opt;
  sys::UniqueFd listen_fd, epoll_fd, stop_fd;
  std::unordered_map<int, std::unique_ptr<Conn>> conns;
  std::map<std::string, std::shared_ptr<OpenSnapshot>> snapshots;
  std::atomic<uint64_t> st_conn{0}, st_open{0}, st_req{0}, st_chunks{0}, st_bytes{0}, st_proto{0}, st_auth{0},
      st_nf{0}, st_range{0}, st_io{0}, st_hs{0}, st_up{0};
  std::byte* io_buf = nullptr;  // synchronous fallback: chunks larger than a read slot
  size_t io_buf_size = 0;

  // Chunk reads go through io_uring, O_DIRECT, into aligned slots, many in flight at once
  // (demand first): the device works on a queue instead of one pread at a time.
  static constexpr size_t kReadSlots = 64;
  static constexpr size_t kSlotSize = 64 * 1024 + 2 * kAlign;
  struct ReadSlot {
    int conn_fd = -1;
    uint64_t conn_serial = 0;
    Job job;
    uint64_t skip = 0;  // chunk starts this far into the aligned read
  };
  std::unique_ptr<sys::Ring> ring;
  sys::UniqueFd ring_event;
  std::byte* arena = nullptr;
  std::vector<ReadSlot> slots = std::vector<ReadSlot>(kReadSlots);
  std::vector<size_t> free_slots;
  bool ring_pending = false;  // SQEs prepared but not submitted
  uint64_t next_serial = 1;
  std::shared_ptr<spdlog::logger> log = log::get("pageserver");

  ~Impl() {
    ring.reset();  // no read may land in the arena after it is freed
    std::free(io_buf);
    std::free(arena);
  }

  static void bump(std::atomic<uint64_t>& c, uint64_t n = 1) { c.fetch_add(n, std::memory_order_relaxed); }

  void queue(Conn& c, capnp::MessageBuilder& m, std::span<const std::byte> payload) {
    std::vector<std::byte> f = net::encode_frame(m, static_cast<uint32_t>(payload.size()));
    size_t head = f.size();
    f.resize(head + payload.size());
    if (!payload.empty()) std::memcpy(f.data() + head, payload.data(), payload.size());
    c.out_bytes += f.size();
    c.out.push_back(std::move(f));
  }

  void reply_error(Conn& c, uint64_t id, wire::ErrorCode code, const std::string& msg, uint64_t tag = 0) {
    capnp::MallocMessageBuilder m;
    auto r = m.initRoot<wire::Reply>();
    r.setId(id);
    auto e = r.initError();
    e.setCode(code);
    e.setMessage(msg);
    e.setTag(tag);
    queue(c, m, {});
  }

  Result<std::shared_ptr<OpenSnapshot>> open_snapshot(const std::string& name) {
    auto it = snapshots.find(name);
    if (it != snapshots.end()) return it->second;
    auto loc = SnapshotLocation::parse(opt.store_dir + "/" + name);
    if (!loc.ok()) return std::move(loc).error();
    auto snap = std::make_shared<OpenSnapshot>();
    snap->name = name;
    std::string dir = opt.store_dir + "/" + name;
    auto bytes = snapshot::read_small_file(dir + "/" + snapshot::kManifestFile, snapshot::kMaxManifestBytes);
    if (!bytes.ok()) return Error(Errc::kNotFound, fmt::format("no snapshot '{}' in this store", name));
    LAZYMEM_ASSIGN_OR_RETURN(snap->manifest, snapshot::decode_manifest(*bytes, dir));
    snap->manifest_bytes = std::move(*bytes);
    int fd = ::open((dir + "/" + snapshot::kDataFile).c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
    if (fd < 0) fd = ::open((dir + "/" + snapshot::kDataFile).c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return sys_error("open data of snapshot " + name, errno);
    snap->data.reset(fd);
    struct stat st{};
    if (::fstat(fd, &st) != 0 || static_cast<uint64_t>(st.st_size) < snap->manifest.data_length) {
      return Error(Errc::kCorrupt, fmt::format("snapshot '{}': data file is truncated", name));
    }
    snapshots[name] = snap;
    return snap;
  }

  void reply_ok(Conn& c, uint64_t id) {
    capnp::MallocMessageBuilder m;
    auto r = m.initRoot<wire::Reply>();
    r.setId(id);
    r.setOk();
    queue(c, m, {});
  }

  void handle_upload(Conn& c, wire::Request::Reader rq, std::span<const std::byte> payload) {
    uint64_t id = rq.getId();
    if (rq.isPutBegin()) {
      auto pb = rq.getPutBegin();
      std::string name = pb.getName();
      auto loc = SnapshotLocation::parse(opt.store_dir + "/" + name);
      if (!loc.ok()) {
        reply_error(c, id, wire::ErrorCode::BAD_REQUEST, loc.error().message());
        return;
      }
      auto sink = snapshot::open_local_sink(*loc, pb.getReplace());
      if (!sink.ok()) {
        reply_error(c, id, sink.error().code() == Errc::kExists ? wire::ErrorCode::BAD_REQUEST : wire::ErrorCode::IO_ERROR,
                    sink.error().message());
        return;
      }
      c.upload = std::move(*sink);
      c.upload_name = name;
      reply_ok(c, id);
      return;
    }
    if (!c.upload) {
      bump(st_proto);
      reply_error(c, id, wire::ErrorCode::BAD_REQUEST, "no upload in progress (putBegin first)");
      c.closing = true;
      return;
    }
    if (rq.isPutData()) {
      Status s = c.upload->append(payload);
      if (!s.ok()) {
        bump(st_io);
        reply_error(c, id, wire::ErrorCode::IO_ERROR, s.error().message());
        c.upload.reset();
        c.closing = true;
      }
      return;
    }
    // putCommit: the manifest must be valid before anything appears under the name.
    auto m = snapshot::decode_manifest(payload, c.upload_name);
    Status s = m.ok() ? c.upload->commit(payload) : Status(std::move(m).error());
    if (!s.ok()) {
      reply_error(c, id, wire::ErrorCode::BAD_REQUEST, s.error().message());
      c.upload.reset();
      return;
    }
    c.upload.reset();
    snapshots.erase(c.upload_name);  // a replaced snapshot is reopened on next use
    bump(st_up);
    log->info("upload of snapshot '{}' complete", c.upload_name);
    reply_ok(c, id);
  }

  void handle(Conn& c, net::Header& h, std::span<const std::byte> payload) {
    bump(st_req);
    wire::Request::Reader rq;
    try {
      rq = h.root<wire::Request>();
    } catch (const kj::Exception&) {
      bump(st_proto);
      c.closing = true;
      return;
    }
    uint64_t id = rq.getId();
    try {
      if (rq.isHello()) {
        auto hello = rq.getHello();
        if (hello.getVersion() != wire::PROTOCOL_VERSION) {
          reply_error(c, id, wire::ErrorCode::UNSUPPORTED_VERSION,
                      fmt::format("protocol version {} is not supported (server speaks {})", hello.getVersion(),
                                  wire::PROTOCOL_VERSION));
          c.closing = true;
          return;
        }
        auto cn = hello.getClientNonce();
        if (cn.size() != c.client_nonce.size()) {
          bump(st_proto);
          reply_error(c, id, wire::ErrorCode::BAD_REQUEST, "client nonce must be 32 bytes");
          c.closing = true;
          return;
        }
        std::memcpy(c.client_nonce.data(), cn.begin(), cn.size());
        c.server_nonce = net::random_nonce();
        c.hello = true;
        c.authed = opt.token.empty();
        capnp::MallocMessageBuilder m;
        auto r = m.initRoot<wire::Reply>();
        r.setId(id);
        auto hr = r.initHello();
        hr.setVersion(wire::PROTOCOL_VERSION);
        hr.setServerNonce(capnp::Data::Reader(reinterpret_cast<const kj::byte*>(c.server_nonce.data()), c.server_nonce.size()));
        hr.setAuthRequired(!opt.token.empty());
        queue(c, m, {});
        return;
      }
      if (!c.hello) {
        bump(st_proto);
        reply_error(c, id, wire::ErrorCode::BAD_REQUEST, "hello first");
        c.closing = true;
        return;
      }
      if (rq.isAuthenticate()) {
        auto mac = rq.getAuthenticate();
        net::Mac want = net::auth_mac(opt.token, c.server_nonce, c.client_nonce);
        if (opt.token.empty() ||
            net::mac_equal(std::span(reinterpret_cast<const std::byte*>(mac.begin()), mac.size()), want)) {
          c.authed = true;
          capnp::MallocMessageBuilder m;
          auto r = m.initRoot<wire::Reply>();
          r.setId(id);
          r.setOk();
          queue(c, m, {});
        } else {
          bump(st_auth);
          log->warn("connection {}: wrong token; closing", c.fd.get());
          reply_error(c, id, wire::ErrorCode::AUTH_FAILED, "wrong token");
          c.closing = true;
        }
        return;
      }
      if (!c.authed) {
        bump(st_auth);
        reply_error(c, id, wire::ErrorCode::AUTH_REQUIRED, "authenticate first (this server needs a token)");
        c.closing = true;
        return;
      }
      if (rq.isPutBegin() || rq.isPutData() || rq.isPutCommit()) {
        handle_upload(c, rq, payload);
        return;
      }
      if (rq.isStats()) {
        ServerStats st = snapshot_stats();
        capnp::MallocMessageBuilder m;
        auto r = m.initRoot<wire::Reply>();
        r.setId(id);
        auto o = r.initStats();
        o.setConnections(st.connections);
        o.setOpenConnections(st.open_connections);
        o.setRequests(st.requests);
        o.setChunks(st.chunks);
        o.setBytes(st.bytes);
        o.setErrorsProtocol(st.errors_protocol);
        o.setErrorsAuth(st.errors_auth);
        o.setErrorsNotFound(st.errors_not_found);
        o.setErrorsRange(st.errors_range);
        o.setErrorsIo(st.errors_io);
        o.setHandshakeTimeouts(st.handshake_timeouts);
        o.setUploads(st.uploads);
        queue(c, m, {});
        return;
      }
      if (rq.isList()) {
        auto list = snapshot::list_store(opt.store_dir);
        if (!list.ok()) {
          reply_error(c, id, wire::ErrorCode::IO_ERROR, list.error().message());
          return;
        }
        capnp::MallocMessageBuilder m;
        auto r = m.initRoot<wire::Reply>();
        r.setId(id);
        auto out = r.initSnapshots(static_cast<unsigned>(list->size()));
        for (size_t i = 0; i < list->size(); ++i) {
          const auto& s = (*list)[i];
          auto o = out[static_cast<unsigned>(i)];
          o.setName(s.name);
          o.setTotalBytes(s.total_bytes);
          o.setStoredBytes(s.stored_bytes);
          o.setRegions(static_cast<uint32_t>(s.regions));
          o.setCreatedUnixNs(s.created_unix_ns);
        }
        queue(c, m, {});
        return;
      }
      if (rq.isGetManifest()) {
        auto snap = open_snapshot(rq.getGetManifest().cStr());
        if (!snap.ok()) {
          bump(st_nf);
          reply_error(c, id, wire::ErrorCode::NOT_FOUND, snap.error().message());
          return;
        }
        capnp::MallocMessageBuilder m;
        auto r = m.initRoot<wire::Reply>();
        r.setId(id);
        r.setManifest();
        queue(c, m, (*snap)->manifest_bytes);
        return;
      }
      if (rq.isGetChunks()) {
        auto gc = rq.getGetChunks();
        auto snap = open_snapshot(gc.getSnapshot().cStr());
        auto chunks = gc.getChunks();
        if (!snap.ok()) {
          bump(st_nf);
          for (auto ch : chunks) reply_error(c, id, wire::ErrorCode::NOT_FOUND, snap.error().message(), ch.getTag());
          return;
        }
        const Manifest& man = (*snap)->manifest;
        auto& lane = gc.getDemand() ? c.demand : c.prefetch;
        for (auto ch : chunks) {
          if (ch.getRegion() >= man.regions.size() || ch.getChunk() >= man.regions[ch.getRegion()].chunks.size()) {
            bump(st_range);
            reply_error(c, id, wire::ErrorCode::OUT_OF_RANGE,
                        fmt::format("chunk {}/{} is outside snapshot '{}'", ch.getRegion(), ch.getChunk(), (*snap)->name),
                        ch.getTag());
            continue;
          }
          lane.push_back(Job{*snap, ch.getRegion(), ch.getChunk(), ch.getTag(), id});
        }
        return;
      }
      bump(st_proto);
      reply_error(c, id, wire::ErrorCode::BAD_REQUEST, "unknown request");
    } catch (const kj::Exception& e) {
      bump(st_proto);
      reply_error(c, id, wire::ErrorCode::BAD_REQUEST, fmt::format("malformed request: {}", e.getDescription().cStr()));
      c.closing = true;
    }
  }

  void queue_chunk(Conn& c, const Job& j, std::span<const std::byte> payload) {
    capnp::MallocMessageBuilder m;
    auto r = m.initRoot<wire::Reply>();
    r.setId(j.id);
    auto ch = r.initChunk();
    ch.setRegion(j.region);
    ch.setChunk(j.chunk);
    ch.setTag(j.tag);
    queue(c, m, payload);
    bump(st_chunks);
    bump(st_bytes, payload.size());
  }

  // Synchronous read, for chunks larger than a slot (chunk size above 64 KiB).
  void read_now(Conn& c, const Job& j) {
    const ChunkInfo& ci = j.snap->manifest.regions[j.region].chunks[j.chunk];
    uint64_t a = ci.offset & ~(kAlign - 1);
    uint64_t end = (ci.offset + ci.stored_length + kAlign - 1) & ~(kAlign - 1);
    if (end - a > io_buf_size) {
      std::free(io_buf);
      void* p = nullptr;
      if (::posix_memalign(&p, kAlign, end - a) != 0) throw std::bad_alloc();
      io_buf = static_cast<std::byte*>(p);
      io_buf_size = end - a;
    }
    ssize_t n = ::pread(j.snap->data.get(), io_buf, end - a, static_cast<off_t>(a));
    if (n < 0 || static_cast<uint64_t>(n) < ci.offset - a + ci.stored_length) {
      bump(st_io);
      reply_error(c, j.id, wire::ErrorCode::IO_ERROR, fmt::format("reading chunk {} failed", j.chunk), j.tag);
      return;
    }
    queue_chunk(c, j, std::span<const std::byte>(io_buf + (ci.offset - a), ci.stored_length));
  }

  // Starts reads of queued chunks, demand first, while the connection's output (queued plus
  // being read) stays under the limit and slots are free.
  void serve_jobs(Conn& c) {
    while (c.out_bytes + c.read_bytes_in_flight < opt.max_queued_bytes && (!c.demand.empty() || !c.prefetch.empty())) {
      auto& lane = c.demand.empty() ? c.prefetch : c.demand;
      const ChunkInfo& ci = lane.front().snap->manifest.regions[lane.front().region].chunks[lane.front().chunk];
      uint64_t a = ci.offset & ~(kAlign - 1);
      uint64_t end = (ci.offset + ci.stored_length + kAlign - 1) & ~(kAlign - 1);
      if (ci.stored_length == 0 || !ring || end - a > kSlotSize) {
        Job j = std::move(lane.front());
        lane.pop_front();
        if (ci.stored_length == 0) queue_chunk(c, j, {});
        else read_now(c, j);
        continue;
      }
      if (free_slots.empty()) return;  // resumed when a read completes
      size_t slot = free_slots.back();
      free_slots.pop_back();
      ReadSlot& rs = slots[slot];
      rs.job = std::move(lane.front());
      lane.pop_front();
      rs.conn_fd = c.fd.get();
      rs.conn_serial = c.serial;
      rs.skip = ci.offset - a;
      io_uring_sqe* sqe = ring->sqe();
      io_uring_prep_read_fixed(sqe, rs.job.snap->data.get(), arena + slot * kSlotSize, static_cast<unsigned>(end - a), a, 0);
      io_uring_sqe_set_data64(sqe, slot);
      ring_pending = true;
      ++c.reads_in_flight;
      c.read_bytes_in_flight += ci.stored_length;
    }
  }

  void submit_reads() {
    if (ring_pending) {
      io_uring_submit(ring->get());
      ring_pending = false;
    }
  }

  // Completed reads become replies on their connections.
  void on_reads_done() {
    uint64_t junk;
    (void)!::read(ring_event.get(), &junk, sizeof junk);
    std::set<int> touched;
    io_uring_cqe* cqe = nullptr;
    while (io_uring_peek_cqe(ring->get(), &cqe) == 0) {
      size_t slot = static_cast<size_t>(io_uring_cqe_get_data64(cqe));
      int res = cqe->res;
      io_uring_cqe_seen(ring->get(), cqe);
      ReadSlot& rs = slots[slot];
      Job job = std::move(rs.job);
      free_slots.push_back(slot);
      auto it = conns.find(rs.conn_fd);
      if (it == conns.end() || it->second->serial != rs.conn_serial) continue;  // connection gone
      Conn& c = *it->second;
      const ChunkInfo& ci = job.snap->manifest.regions[job.region].chunks[job.chunk];
      --c.reads_in_flight;
      c.read_bytes_in_flight -= ci.stored_length;
      if (res < 0 || static_cast<uint64_t>(res) < rs.skip + ci.stored_length) {
        bump(st_io);
        reply_error(c, job.id, wire::ErrorCode::IO_ERROR, fmt::format("reading chunk {} failed", job.chunk), job.tag);
      } else {
        queue_chunk(c, job, std::span<const std::byte>(arena + slot * kSlotSize + rs.skip, ci.stored_length));
      }
      touched.insert(c.fd.get());
    }
    for (int fd : touched) pump(fd);
    // Slots freed: connections waiting for one may go on.
    for (auto& [fd, c] : conns)
      if (!c->demand.empty() || !c->prefetch.empty()) serve_jobs(*c);
    submit_reads();
  }

  // Moves a connection forward: write what is queued, start more reads, re-arm epoll.
  void pump(int fd) {
    auto it = conns.find(fd);
    if (it == conns.end()) return;
    Conn& c = *it->second;
    bool keep = true;
    if (!c.out.empty()) keep = on_writable(c);
    if (keep) serve_jobs(c);
    if (keep && c.closing && c.out.empty() && c.reads_in_flight == 0) keep = false;
    if (!keep) {
      close_conn(fd);
      return;
    }
    update_events(c);
  }

  void update_events(Conn& c) {
    bool want_read = !c.closing && c.out_bytes < opt.max_queued_bytes;
    epoll_event ev{};
    ev.events = (want_read ? uint32_t{EPOLLIN} : 0u) | (c.out.empty() ? 0u : uint32_t{EPOLLOUT});
    ev.data.fd = c.fd.get();
    ::epoll_ctl(epoll_fd.get(), EPOLL_CTL_MOD, c.fd.get(), &ev);
    c.reading = want_read;
  }

  void close_conn(int fd) {
    ::epoll_ctl(epoll_fd.get(), EPOLL_CTL_DEL, fd, nullptr);
    conns.erase(fd);
    st_open.fetch_sub(1, std::memory_order_relaxed);
  }

  // Returns false when the connection is to be closed.
  bool on_readable(Conn& c) {
    for (int rounds = 0; rounds < 16 && c.out_bytes < opt.max_queued_bytes; ++rounds) {
      auto space = c.in.writable();
      ssize_t n = ::recv(c.fd.get(), space.data(), space.size(), MSG_DONTWAIT);
      if (n == 0) return false;
      if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) break;
        return false;
      }
      c.in.commit(static_cast<size_t>(n));
      for (;;) {
        auto f = c.in.next();
        if (!f.ok()) {
          bump(st_proto);
          log->warn("connection {}: {}; closing", c.fd.get(), f.error().message());
          return false;
        }
        if (!f->has_value()) break;
        auto h = net::Header::parse((*f)->header);
        if (!h.ok()) {
          bump(st_proto);
          log->warn("connection {}: {}; closing", c.fd.get(), h.error().message());
          return false;
        }
        handle(c, **h, (*f)->payload);
        c.in.consume();
        if (c.closing) return true;
      }
    }
    return true;
  }

  bool on_writable(Conn& c) {
    while (!c.out.empty()) {
      auto& f = c.out.front();
      ssize_t n = ::send(c.fd.get(), f.data() + c.out_off, f.size() - c.out_off, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) return true;
        return false;
      }
      c.out_off += static_cast<size_t>(n);
      if (c.out_off == f.size()) {
        c.out_bytes -= f.size();
        c.out.pop_front();
        c.out_off = 0;
      }
    }
    return !c.closing;
  }

  void accept_all() {
    for (;;) {
      int fd = ::accept4(listen_fd.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) return;
      if (conns.size() >= opt.max_connections) {
        ::close(fd);
        continue;
      }
      int one = 1;
      ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      auto c = std::make_unique<Conn>();
      c->fd.reset(fd);
      c->serial = next_serial++;
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.fd = fd;
      ::epoll_ctl(epoll_fd.get(), EPOLL_CTL_ADD, fd, &ev);
      conns[fd] = std::move(c);
      bump(st_conn);
      bump(st_open);
    }
  }

  ServerStats snapshot_stats() const {
    auto r = [](const std::atomic<uint64_t>& a) { return a.load(std::memory_order_relaxed); };
    return ServerStats{r(st_conn),  r(st_open), r(st_req),   r(st_chunks), r(st_bytes), r(st_proto), r(st_auth),
                       r(st_nf),    r(st_range), r(st_io),   r(st_hs),     r(st_up)};
  }

  void expire_handshakes() {
    auto now = Clock::now();
    std::vector<int> doomed;
    for (auto& [fd, c] : conns) {
      if (!c->authed && now - c->opened > opt.handshake_timeout) doomed.push_back(fd);
    }
    for (int fd : doomed) {
      bump(st_hs);
      log->info("connection {}: no handshake within {} ms; closing", fd, opt.handshake_timeout.count());
      close_conn(fd);
    }
  }
};

Result<std::unique_ptr<PageServer>> PageServer::listen(const ServerOptions& options) {
  std::unique_ptr<PageServer> s(new PageServer());
  s->impl_ = std::make_unique<Impl>();
  Impl& im = *s->impl_;
  im.opt = options;
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* res = nullptr;
  int g = ::getaddrinfo(options.host.c_str(), std::to_string(options.port).c_str(), &hints, &res);
  if (g != 0) return Error(Errc::kInvalidArgument, fmt::format("listen address {}: {}", options.host, gai_strerror(g)));
  std::unique_ptr<addrinfo, void (*)(addrinfo*)> guard(res, ::freeaddrinfo);
  im.listen_fd.reset(::socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!im.listen_fd.valid()) return sys_error("socket", errno);
  int one = 1;
  ::setsockopt(im.listen_fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (::bind(im.listen_fd.get(), res->ai_addr, res->ai_addrlen) != 0) {
    return sys_error(fmt::format("bind {}:{} (in use? pick another --listen port)", options.host, options.port), errno);
  }
  if (::listen(im.listen_fd.get(), 256) != 0) return sys_error("listen", errno);
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  ::getsockname(im.listen_fd.get(), reinterpret_cast<sockaddr*>(&ss), &len);
  s->port_ = ntohs(ss.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port
                                            : reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
  im.epoll_fd.reset(::epoll_create1(EPOLL_CLOEXEC));
  im.stop_fd.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  {
    void* arena = nullptr;
    if (::posix_memalign(&arena, kAlign, Impl::kReadSlots * Impl::kSlotSize) != 0) throw std::bad_alloc();
    im.arena = static_cast<std::byte*>(arena);
    auto ring = sys::Ring::create(Impl::kReadSlots * 2);
    if (ring.ok()) {
      iovec iov{im.arena, Impl::kReadSlots * Impl::kSlotSize};
      im.ring_event.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
      if (io_uring_register_buffers((*ring)->get(), &iov, 1) == 0 &&
          io_uring_register_eventfd((*ring)->get(), im.ring_event.get()) == 0) {
        im.ring = std::move(*ring);
        for (size_t i = Impl::kReadSlots; i > 0; --i) im.free_slots.push_back(i - 1);
      }
    }
    if (!im.ring) im.log->info("io_uring unavailable: reading chunks with pread, one at a time");
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = im.listen_fd.get();
  ::epoll_ctl(im.epoll_fd.get(), EPOLL_CTL_ADD, im.listen_fd.get(), &ev);
  ev.data.fd = im.stop_fd.get();
  ::epoll_ctl(im.epoll_fd.get(), EPOLL_CTL_ADD, im.stop_fd.get(), &ev);
  if (im.ring) {
    ev.data.fd = im.ring_event.get();
    ::epoll_ctl(im.epoll_fd.get(), EPOLL_CTL_ADD, im.ring_event.get(), &ev);
  }
  return s;
}

PageServer::~PageServer() = default;

Status PageServer::run() {
  Impl& im = *impl_;
  std::vector<epoll_event> events(256);
  for (;;) {
    int n = ::epoll_wait(im.epoll_fd.get(), events.data(), static_cast<int>(events.size()), 1000);
    if (n < 0 && errno != EINTR) return sys_error("epoll_wait", errno);
    for (int i = 0; i < n; ++i) {
      int fd = events[static_cast<size_t>(i)].data.fd;
      uint32_t what = events[static_cast<size_t>(i)].events;
      if (fd == im.stop_fd.get()) {
        im.conns.clear();
        return ok_status();
      }
      if (fd == im.listen_fd.get()) {
        im.accept_all();
        continue;
      }
      if (im.ring_event.valid() && fd == im.ring_event.get()) {
        im.on_reads_done();
        continue;
      }
      auto it = im.conns.find(fd);
      if (it == im.conns.end()) continue;
      Conn& c = *it->second;
      bool keep = true;
      if (what & (EPOLLIN | EPOLLHUP | EPOLLERR)) keep = im.on_readable(c);
      if (keep) im.serve_jobs(c);
      if (keep && !c.out.empty()) keep = im.on_writable(c);
      if (keep && c.out.empty()) {
        im.serve_jobs(c);  // the queue drained: read more chunks
        if (!c.out.empty()) keep = im.on_writable(c);
      }
      if (keep && c.closing && c.out.empty() && c.reads_in_flight == 0) keep = false;
      if (!keep) {
        im.close_conn(fd);
        continue;
      }
      im.update_events(c);
    }
    im.submit_reads();
    im.expire_handshakes();
  }
}

void PageServer::stop() {
  uint64_t one = 1;
  (void)!::write(impl_->stop_fd.get(), &one, sizeof one);
}

ServerStats PageServer::stats() const { return impl_->snapshot_stats(); }

}  // namespace lazymem::pageserver
