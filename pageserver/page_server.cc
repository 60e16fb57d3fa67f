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

#include <array>
#include <cstdlib>
#include <cstring>
#include <atomic>
#include <deque>
#include <filesystem>
#include <list>
#include <map>
#include <optional>
#include <set>
#include <thread>
#include <unordered_map>

#include "core/log.h"
#include "extent_cache.h"
#include "send_queue.h"
#include "store_listing.h"
#include "sys/acceptor.h"
#include "sys/cpu_latency.h"
#include "sys/ring.h"
#include "net/auth.h"
#include "net/server_handshake.h"
#include "net/frame.h"
#include "net/metrics_endpoint.h"
#include "net/resolver.h"
#include "snapshot/chunk_codec.h"
#include "snapshot/manifest.h"
#include "snapshot/store.h"
#include "wire.capnp.h"

namespace lazymem::pageserver {
namespace wire = proto::wire;
namespace {

using Clock = std::chrono::steady_clock;

struct OpenSnapshot {
  std::string name;
  uint64_t file_id = 0;  // names its extents in the cache; a replaced snapshot gets a new one
  bool retired = false;  // no longer what the store holds under the name (PageServer::Impl::retired)
  Manifest manifest;
  std::vector<std::byte> manifest_bytes;
  sys::UniqueFd data;
  // Per region and chunk: the newest Extent::loaded of the extents its stored checksum was last
  // checked in (0: never). A getPage checks a chunk again only when one of its extents was read
  // since: the bytes in memory were checked once; it is the disk we do not trust.
  std::vector<std::vector<uint64_t>> verified;
};

// A peer's address: where a datagram came from, and where its reply goes.
struct Peer {
  sockaddr_storage addr{};
  socklen_t len = 0;
  // The address a datagram was sent to (IP_PKTINFO / IPV6_PKTINFO; level 0: unknown): its reply
  // leaves from there. Else, on a host with several addresses, the kernel may pick another
  // source, and the client's UDP socket, connected to the address it asked, drops the reply.
  int pktinfo_level = 0;
  union {
    in_pktinfo v4;
    in6_pktinfo v6;
  } pktinfo{};
  int socket = -1;  // a reply goes out of this connected socket (the session's own), if set
};

// A datagram socket that never fragments: DF set, and a datagram over the path MTU (the route's,
// lowered by ICMP "fragmentation needed") fails with EMSGSIZE instead of leaving in fragments,
// which firewalls drop and which are lost whole when one is. Both families' options on an IPv6
// socket: a dual-stack one sends v4 too.
void never_fragment(int fd, int family) {
  int v4 = IP_PMTUDISC_DO, v6 = IPV6_PMTUDISC_DO;
  (void)::setsockopt(fd, IPPROTO_IP, IP_MTU_DISCOVER, &v4, sizeof v4);
  if (family == AF_INET6) (void)::setsockopt(fd, IPPROTO_IPV6, IPV6_MTU_DISCOVER, &v6, sizeof v6);
}

bool same_endpoint(const Peer& a, const Peer& b) {
  return a.len == b.len && std::memcmp(&a.addr, &b.addr, a.len) == 0;
}

// Whether two addresses are the same host (ports aside).
bool same_host(const Peer& a, const Peer& b) {
  if (a.addr.ss_family != b.addr.ss_family) return false;
  if (a.addr.ss_family == AF_INET) {
    return reinterpret_cast<const sockaddr_in&>(a.addr).sin_addr.s_addr ==
           reinterpret_cast<const sockaddr_in&>(b.addr).sin_addr.s_addr;
  }
  if (a.addr.ss_family == AF_INET6) {
    const auto& x = reinterpret_cast<const sockaddr_in6&>(a.addr);
    const auto& y = reinterpret_cast<const sockaddr_in6&>(b.addr);
    return std::memcmp(&x.sin6_addr, &y.sin6_addr, sizeof(in6_addr)) == 0 &&
           (!IN6_IS_ADDR_LINKLOCAL(&x.sin6_addr) || x.sin6_scope_id == y.sin6_scope_id);  // fe80:: on another link
  }
  return false;
}

using Session = std::array<std::byte, 16>;

// The largest page frame sent by datagram (4 KiB pages compress below it; anything bigger, or a
// reply that needs the whole chunk, is refused with useStream).
constexpr uint32_t kMaxDatagramPayload = 8192;
constexpr size_t kMaxQueuedDatagramJobs = 64;
constexpr const char* kUseStream = "this page goes as its whole chunk: ask on the connection";
constexpr const char* kReadingUseStream = "this page's chunk is being read from disk: ask on the connection";
constexpr const char* kOnStream = "this page's reply comes on the connection";

// A chunk to send (getChunks), or one page of it (getPage: `page` set), once its extents are in.
struct Job {
  std::shared_ptr<OpenSnapshot> snap;
  uint32_t region, chunk;
  uint64_t tag, id;
  bool demand;
  std::optional<uint32_t> page;
  std::optional<Peer> reply_to;  // a getPage that came by datagram: answered by datagram (reset
                                 // by move_to_stream: then answered on the connection)
  bool on_stream;                // (reply_to) what no datagram can carry goes on the connection
};

// A chunk reply waiting for reads of its extents.
struct Waiting {
  Job job;
  boost::container::small_vector<Pin, 2> pins;
};

constexpr uint32_t kPayloadBeforeAuth = 64 * 1024;

struct Conn {
  explicit Conn(bool zerocopy) : out(zerocopy) {}
  sys::UniqueFd fd;
  uint64_t serial = 0;        // tells a reused fd number from the connection a read was for
  // Requests before authentication carry no payload: until then a frame announcing one is
  // refused before anything is buffered for it (else 8 bytes from anyone make the connection
  // hold 16 MiB, 1024 connections 16 GiB). Raised to the protocol's limit once authenticated.
  net::FrameBuffer in{kPayloadBeforeAuth};
  SendQueue out;
  bool hello = false;
  bool authed = false;
  bool prove_server = false;   // its hello asked the server to prove it holds the token
  bool reads_corrupt = false;  // its hello said it knows ErrorCode corrupt
  bool closing = false;  // close once everything is sent (and its zero-copy completions are in)
  bool starved = false;  // waits for a free extent
  bool committing = false;  // its upload's commit runs (Impl::Commit): nothing more is read meanwhile
  bool listing = false;     // its list waits for the store's listing (Impl::ListWaiter): likewise
  uint32_t events = EPOLLIN;  // what epoll watches for now
  net::Nonce server_nonce{};
  net::Nonce client_nonce{};
  Peer peer;                       // the TCP peer: the only sender its session's datagrams may have
  std::optional<Session> session;  // openDatagrams was asked on this connection
  // A UDP socket of the session's own, bound to the address its datagrams were sent to and
  // connected to their sender: replies leave through it (a connected send skips the route
  // lookup and the source-address option: 3.85 against 4.55 us here), and the kernel hands it
  // that sender's datagrams from then on.
  sys::UniqueFd dgram;
  Peer dgram_peer;
  std::deque<Job> demand, prefetch;
  std::deque<Waiting> waiting;
  size_t waiting_bytes = 0;
  Clock::time_point opened = Clock::now();
  // Since when replies wait without the socket taking any (Impl::expire_stalled).
  uint64_t sent_seen = 0;
  Clock::time_point progress_at = Clock::now();
  // An upload in progress: dropped (and its temporary directory removed) if the connection
  // ends before putCommit, so a half-uploaded snapshot is never served.
  std::unique_ptr<snapshot::SnapshotSink> upload;
  std::string upload_name;
  // The version of a snapshot this connection reads (Hello.manifestChecksum): its requests for
  // that name are served from it, whatever the store holds under the name now. Bound once the
  // connection is authenticated; `reads` null with `reads_name` set: that version is not held
  // here (its requests fail with notFound, never with another version's pages).
  std::string reads_name;
  uint64_t reads_checksum = 0;
  std::shared_ptr<OpenSnapshot> reads;

  // Bytes of replies this connection holds: queued or in the kernel's hands, and reads for it.
  size_t replies_held() const { return out.bytes() + waiting_bytes; }
  // Those, and chunks asked for and not yet turned into replies, at a nominal cost each: its
  // requests are read only while under the bound, so a flood of getChunks is bounded too, while
  // a restore's 64 requests in flight stay far below it.
  size_t held() const { return replies_held() + (demand.size() + prefetch.size()) * kJobCost; }
  static constexpr size_t kJobCost = 256;
};

}  // namespace

struct PageServer::Impl {
  ServerOptions opt;
  sys::UniqueFd listen_fd, epoll_fd, stop_fd;
  std::unique_ptr<net::MetricsEndpoint> metrics;  // ServerOptions::metrics
  std::map<std::string, std::shared_ptr<OpenSnapshot>> snapshots;  // what the store holds, as opened
  uint64_t next_file_id = 1;
  // Versions no longer in the store (replaced or removed) that restores may still read, by
  // file id (a checksum is no key: the same bytes may be stored twice, or under two names):
  // alive while a connection reads one (Conn::reads), and kept `lingering` for
  // opt.keep_replaced after it left the store and after its last reader closed, so that a
  // restore between its manifest and its first connection, or reconnecting, still finds it.
  struct Retired {
    std::weak_ptr<OpenSnapshot> snap;
    std::string name;
    uint64_t checksum;
    uint64_t stored_bytes;  // on disk until it is let go: what `rm` has not freed yet
  };
  std::unordered_map<uint64_t, Retired> retired;
  std::deque<std::pair<Clock::time_point, std::shared_ptr<OpenSnapshot>>> lingering;
  std::atomic<uint64_t> st_conn{0}, st_open{0}, st_req{0}, st_chunks{0}, st_bytes{0}, st_proto{0}, st_auth{0},
      st_nf{0}, st_range{0}, st_io{0}, st_hs{0}, st_up{0}, st_disk{0}, st_hits{0}, st_misses{0}, st_pages{0},
      st_corrupt{0}, st_dgram_req{0}, st_dgram_drop{0}, st_dgram_unsent{0}, st_refused{0}, st_dgram_over_mtu{0},
      st_dgram_on_stream{0}, st_retired{0}, st_retired_bytes{0}, st_stalled{0},
      st_completed{0};
  SendCounters sends;
  // getPage by datagram: the socket (invalid: datagrams off), the live sessions (each names its
  // connection, by fd and serial), and when the last page request came (the loop polls a while).
  sys::UniqueFd udp_fd;
  uint16_t port = 0;
  std::map<Session, std::pair<int, uint64_t>> sessions;
  std::unordered_map<int, int> dgram_owner;  // a session's own UDP socket -> its connection's fd
  sys::Acceptor acceptor;  // sheds peers when out of descriptors
  Clock::time_point next_refused_log{};
  std::array<std::byte, 4096> dgram_{};  // a request datagram (a getPage is ~150 bytes)
  Clock::time_point last_page{}, next_drop_log{};

  // Chunk reads go through io_uring, O_DIRECT, into extents of the cache, many in flight at
  // once (demand first): the device works on a queue instead of one pread at a time.
  static constexpr size_t kMaxReads = 256;
  std::unique_ptr<sys::Ring> ring;
  sys::UniqueFd ring_event;
  bool ring_pending = false;  // SQEs prepared but not submitted
  std::unique_ptr<ExtentCache> cache;
  // A read in flight: its own pin, and its snapshot, whose data descriptor the read uses (were
  // the snapshot dropped meanwhile, removed or replaced, the number could name another file).
  struct Read {
    Pin pin;
    std::shared_ptr<OpenSnapshot> snap;
  };
  std::unordered_map<Extent*, Read> reading;  // until each completes
  bool reads_completed = false;              // since the last retry of starved connections
  uint64_t next_serial = 1;
  sys::CpuLatencyHold cpu_latency;  // held while requests keep coming
  Clock::time_point last_request{};
  // Declared after the cache: connections (and their pins) go first.
  std::unordered_map<int, std::unique_ptr<Conn>> conns;
  // Frames of connections closed while the kernel may still read them (zero-copy in flight):
  // their extents stay pinned a while so that no read overwrites them.
  std::deque<std::pair<Clock::time_point, std::deque<OutFrame>>> graveyard;
  std::shared_ptr<spdlog::logger> log = log::get("pageserver");

  // A putCommit's fsyncs and rename (and, replacing, the old version's deletion) take as long as
  // the disk does: ~400 ms for 512 MiB here, during which a loop that waited served nobody. They
  // run on a thread of their own; the uploading connection reads nothing more meanwhile (its
  // next request follows the commit), and the loop answers when commit_event says it is done.
  // The thread owns what it uses: the connection may close meanwhile.
  struct Commit {
    int fd;
    uint64_t serial, id;
    std::string name;
    std::unique_ptr<snapshot::SnapshotSink> sink;
    std::vector<std::byte> manifest;
    Status result;
    std::atomic<bool> done{false};
    std::thread thread;
  };
  std::list<std::unique_ptr<Commit>> commits;
  sys::UniqueFd commit_event;

  // `list`: the store's listing is made on a thread of its own (StoreListing: it reads
  // directories and changed manifests, as long as the disk takes); a list request waits for one
  // that begins after it, and its connection reads nothing more meanwhile (one list in flight
  // per connection, its replies in order). On the loop a list costs its reply.
  std::unique_ptr<StoreListing> listing;
  struct ListWaiter {
    int fd;
    uint64_t serial, id, listing;
  };
  std::vector<ListWaiter> list_waiters;

  ~Impl() {
    listing.reset();  // waits a second at most for a listing under way
    for (auto& cm : commits) {
      if (cm->thread.joinable()) cm->thread.join();  // a snapshot half renamed is not left behind
    }
    conns.clear();
    graveyard.clear();
    reading.clear();
    ring.reset();  // no read may land in an extent after the cache is gone
    cache.reset();
  }

  static void bump(std::atomic<uint64_t>& c, uint64_t n = 1) { c.fetch_add(n, std::memory_order_relaxed); }

  // A small reply (header and payload copied into one buffer).
  void queue(Conn& c, capnp::MessageBuilder& m, std::span<const std::byte> payload) {
    OutFrame f;
    f.head = net::encode_frame(m, static_cast<uint32_t>(payload.size()));
    size_t head = f.head.size();
    f.head.resize(head + payload.size());
    if (!payload.empty()) std::memcpy(f.head.data() + head, payload.data(), payload.size());
    c.out.push(std::move(f));
  }

  // An error's text may repeat what the client sent (a snapshot name of up to 64 KiB), once per
  // chunk of a getChunks: cut at 512 bytes, a request cannot make its replies much larger than itself.
  static void build_error(capnp::MessageBuilder& m, uint64_t id, wire::ErrorCode code, const std::string& msg,
                          uint64_t tag) {
    constexpr size_t kMaxText = 512;
    auto r = m.initRoot<wire::Reply>();
    r.setId(id);
    auto e = r.initError();
    e.setCode(code);
    e.setMessage(msg.size() <= kMaxText ? msg : msg.substr(0, kMaxText - 3) + "...");
    e.setTag(tag);
  }

  // Damage is `corrupt` to clients that know the code. An older client reads an unknown code as
  // a refusal it does not pass over to another server: it gets ioError, as before the code.
  static wire::ErrorCode for_client(const Conn& c, wire::ErrorCode code) {
    return code == wire::ErrorCode::CORRUPT && !c.reads_corrupt ? wire::ErrorCode::IO_ERROR : code;
  }
  void reply_error(Conn& c, uint64_t id, wire::ErrorCode code, const std::string& msg, uint64_t tag = 0) {
    code = for_client(c, code);
    capnp::MallocMessageBuilder m;
    build_error(m, id, code, msg, tag);
    queue(c, m, {});
  }

  // A reply to a getPage datagram: one frame in one datagram, to its sender. The socket is not
  // waited for: a reply it refuses is counted (kRefused), and the client, not hearing back, asks
  // again. Never fragmented (never_fragment()): one too big for the path MTU is not sent
  // (kTooBig), for the caller to say so in a small one.
  enum class Sent { kSent, kTooBig, kRefused };
  Sent send_datagram(const Peer& to, capnp::MessageBuilder& m, std::span<const std::byte> payload) {
    std::vector<std::byte> head = net::encode_frame(m, static_cast<uint32_t>(payload.size()));
    iovec iov[2] = {{head.data(), head.size()}, {const_cast<std::byte*>(payload.data()), payload.size()}};
    msghdr mh{};
    mh.msg_iov = iov;
    mh.msg_iovlen = payload.empty() ? 1 : 2;
    auto sent = [&](ssize_t r) {
      if (r >= 0) return Sent::kSent;
      if (errno == EMSGSIZE) return Sent::kTooBig;
      bump(st_dgram_unsent);
      return Sent::kRefused;
    };
    if (to.socket >= 0) return sent(::sendmsg(to.socket, &mh, MSG_DONTWAIT | MSG_NOSIGNAL));  // connected: no address, no source option
    mh.msg_name = const_cast<sockaddr_storage*>(&to.addr);
    mh.msg_namelen = to.len;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(in6_pktinfo))] = {};
    if (to.pktinfo_level == IPPROTO_IP || to.pktinfo_level == IPPROTO_IPV6) {
      const bool v4 = to.pktinfo_level == IPPROTO_IP;
      const size_t len = v4 ? sizeof(in_pktinfo) : sizeof(in6_pktinfo);
      mh.msg_control = control;
      mh.msg_controllen = CMSG_SPACE(len);
      cmsghdr* cm = CMSG_FIRSTHDR(&mh);
      cm->cmsg_level = to.pktinfo_level;
      cm->cmsg_type = v4 ? IP_PKTINFO : IPV6_PKTINFO;
      cm->cmsg_len = CMSG_LEN(len);
      std::memcpy(CMSG_DATA(cm), &to.pktinfo, len);
    }
    return sent(::sendmsg(udp_fd.get(), &mh, MSG_DONTWAIT | MSG_NOSIGNAL));
  }

  // An error for a chunk or page job: on its connection, or by datagram if it came as one.
  void reply_error(Conn& c, const Job& j, wire::ErrorCode code, const std::string& msg) {
    if (!j.reply_to) return reply_error(c, j.id, code, msg, j.tag);
    code = for_client(c, code);
    capnp::MallocMessageBuilder m;
    build_error(m, j.id, code, msg, j.tag);
    // Small, but its text may repeat what the client sent (a snapshot name): one that the path
    // cannot carry either is counted as unsent, and the client asks again on its connection.
    if (send_datagram(*j.reply_to, m, {}) == Sent::kTooBig) bump(st_dgram_unsent);
  }

  // A getPage datagram whose reply no datagram can carry (the whole chunk, a frame over the path
  // MTU, a chunk still being read): where the client takes it on the connection (replyOnStream)
  // the job becomes the connection's, under the datagram request's id and tag, and an onStream
  // datagram says so at once: the client reads its connection instead of asking again there (a
  // round trip saved). False where it does not: the caller answers useStream.
  bool move_to_stream(Conn& c, Job& j) {
    if (!j.reply_to || !j.on_stream) return false;
    reply_error(c, j, wire::ErrorCode::ON_STREAM, kOnStream);
    j.reply_to.reset();
    bump(st_dgram_on_stream);
    return true;
  }

  // `recheck` (a restore starting: getManifest): a snapshot held open is first checked to be
  // still the one in the store, so one removed or replaced there by another program is seen.
  // Requests for its pages keep what is open: a stat() per request would cost every fault.
  Result<std::shared_ptr<OpenSnapshot>> open_snapshot(const std::string& name, bool recheck = false,
                                                      bool again_if_replaced = true) {
    auto it = snapshots.find(name);
    if (it != snapshots.end()) {
      // The data file held open is still the one in the store (its inode number cannot be
      // given to another file while it is open; a manifest's could).
      struct stat now{}, held{};
      if (!recheck || (::stat((opt.store_dir + "/" + name + "/" + snapshot::kDataFile).c_str(), &now) == 0 &&
                       ::fstat(it->second->data.get(), &held) == 0 && now.st_dev == held.st_dev &&
                       now.st_ino == held.st_ino)) {
        return it->second;
      }
      retire(it);
    }
    auto loc = SnapshotLocation::in_store(opt.store_dir, name);
    if (!loc.ok()) return std::move(loc).error();
    auto snap = std::make_shared<OpenSnapshot>();
    snap->name = name;
    snap->file_id = next_file_id++;
    std::string dir = opt.store_dir + "/" + name;
    auto missing = [&] { return Error(Errc::kNotFound, fmt::format("no snapshot '{}' in this store", name)); };
    // Manifest and data from one directory, opened once: a snapshot swapped in by another
    // program between the two opens would otherwise pair one's manifest with the other's data.
    sys::UniqueFd dir_fd(::open(dir.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC));
    if (const int e = errno; !dir_fd.valid()) return e == ENOENT || e == ENOTDIR ? missing() : sys_error("open snapshot " + name, e);
    auto bytes = snapshot::read_small_file(snapshot::kManifestFile, snapshot::kMaxManifestBytes, dir_fd.get());
    if (!bytes.ok()) return bytes.error().code() == Errc::kNotFound ? missing() : std::move(bytes).error();
    LAZYMEM_ASSIGN_OR_RETURN(snap->manifest, snapshot::decode_manifest(*bytes, dir));
    snap->manifest_bytes = std::move(*bytes);
    for (const RegionInfo& r : snap->manifest.regions) snap->verified.emplace_back(r.chunks.size(), 0);
    int fd = ::openat(dir_fd.get(), snapshot::kDataFile, O_RDONLY | O_CLOEXEC | O_DIRECT);
    if (fd < 0) fd = ::openat(dir_fd.get(), snapshot::kDataFile, O_RDONLY | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT) {
      // Its manifest was there: the snapshot is damaged, not absent, unless it left the store
      // meanwhile (its directory renamed away, then deleted): removed, it is not found; replaced,
      // the new one is opened.
      struct stat held{}, now{};
      const bool still_ours = ::fstat(dir_fd.get(), &held) == 0 && ::stat(dir.c_str(), &now) == 0 &&
                              held.st_dev == now.st_dev && held.st_ino == now.st_ino;
      if (!still_ours) return again_if_replaced ? open_snapshot(name, recheck, false) : missing();  // (once)
      return Error(Errc::kCorrupt, fmt::format("snapshot '{}': its data file is missing", name));
    }
    if (fd < 0) return sys_error("open data of snapshot " + name, errno);
    snap->data.reset(fd);
    struct stat st{};
    if (::fstat(fd, &st) != 0 || static_cast<uint64_t>(st.st_size) < snap->manifest.data_length) {
      return Error(Errc::kCorrupt, fmt::format("snapshot '{}': data file is truncated", name));
    }
    snapshots[name] = snap;
    return snap;
  }

  // A version leaves the store (replaced or removed): restores that read it keep it.
  void retire(std::map<std::string, std::shared_ptr<OpenSnapshot>>::iterator it) {
    std::shared_ptr<OpenSnapshot> old = std::move(it->second);
    snapshots.erase(it);
    old->retired = true;
    retired[old->file_id] = Retired{old, old->name, old->manifest.checksum, old->manifest.stored_bytes()};
    keep_a_while(std::move(old));
  }
  void keep_a_while(std::shared_ptr<OpenSnapshot> snap) {
    lingering.emplace_back(Clock::now() + opt.keep_replaced, std::move(snap));
  }

  // Version `checksum` of snapshot `name`: the store's (checked against the store first if what
  // is open differs: another server may share it), or one that left it and is still held.
  // kNotFound if neither; another error if the store's could not be opened (it may be that one).
  Result<std::shared_ptr<OpenSnapshot>> find_version(const std::string& name, uint64_t checksum) {
    std::optional<Error> failed;
    for (bool recheck : {false, true}) {
      auto cur = open_snapshot(name, recheck);
      if (cur.ok() && (*cur)->manifest.checksum == checksum) return *cur;
      if (!cur.ok() && cur.error().code() != Errc::kNotFound) failed = std::move(cur).error();
    }
    for (const auto& [file_id, r] : retired) {  // a few at most
      if (r.checksum != checksum || r.name != name) continue;
      if (auto s = r.snap.lock()) return s;
    }
    if (failed) return std::move(*failed);
    return Error(Errc::kNotFound,
                 fmt::format("snapshot '{}' changed in the store since this restore read its manifest, and the "
                             "version it reads is no longer held here (the server restarted, or no restore read it "
                             "for {} s): restore again",
                             name, opt.keep_replaced.count()));
  }

  // A snapshot that could not be opened for a request: counted, and the code its reply says.
  wire::ErrorCode open_failure(const Error& e) {
    switch (e.code()) {
      case Errc::kNotFound: bump(st_nf); return wire::ErrorCode::NOT_FOUND;
      case Errc::kInvalidArgument: bump(st_proto); return wire::ErrorCode::BAD_REQUEST;  // a name no store has
      case Errc::kCorrupt: bump(st_corrupt); return wire::ErrorCode::CORRUPT;
      default: bump(st_io); return wire::ErrorCode::IO_ERROR;
    }
  }

  // The connection is authenticated: the version its hello named, if any, is what it reads.
  void bind_version(Conn& c) {
    if (c.reads_name.empty()) return;
    auto v = find_version(c.reads_name, c.reads_checksum);
    if (v.ok()) c.reads = std::move(*v);
  }

  // The snapshot a request of `c` names: the version the connection reads, or the store's. One
  // not found when the connection was made is looked for again (it may have been out of the
  // store a moment, or the store unreadable): a failed bind never sticks.
  Result<std::shared_ptr<OpenSnapshot>> snapshot_for(Conn& c, const char* name) {
    if (c.reads_name.empty() || c.reads_name != name) return open_snapshot(name);
    if (!c.reads) {
      LAZYMEM_ASSIGN_OR_RETURN(c.reads, find_version(c.reads_name, c.reads_checksum));
    }
    return c.reads;
  }

  // Out of the store at once (renamed away: restores reading it keep it, see `retired`; its
  // disk space is freed when they are done), deleted on a thread of its own: a large data
  // file takes a while, and this loop serves faults.
  void remove_snapshot(Conn& c, uint64_t id, const std::string& name) {
    auto loc = SnapshotLocation::in_store(opt.store_dir, name);
    if (!loc.ok()) return reply_error(c, id, wire::ErrorCode::BAD_REQUEST, loc.error().message());
    auto doomed = snapshot::retire_snapshot(*loc);
    if (!doomed.ok()) {
      const bool missing = doomed.error().code() == Errc::kNotFound;
      bump(missing ? st_nf : st_io);
      return reply_error(c, id, missing ? wire::ErrorCode::NOT_FOUND : wire::ErrorCode::IO_ERROR,
                         missing ? fmt::format("no snapshot '{}' in this store", name) : doomed.error().message());
    }
    if (auto it = snapshots.find(name); it != snapshots.end()) retire(it);
    auto erase = [dir = *doomed, log = log] {
      std::error_code ec;
      std::filesystem::remove_all(dir, ec);
      if (ec) log->warn("deleting removed snapshot {} failed: {} (delete it by hand)", dir, ec.message());
    };
    try {
      std::thread(erase).detach();
    } catch (const std::system_error&) {
      erase();  // no thread to be had: the loop waits this once
    }
    log->info("snapshot '{}' removed (connection {})", name, c.fd.get());
    reply_ok(c, id);
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
      auto loc = SnapshotLocation::in_store(opt.store_dir, name);
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
    if (!m.ok()) {
      reply_error(c, id, wire::ErrorCode::BAD_REQUEST, m.error().message());
      c.upload.reset();
      return;
    }
    auto cm = std::make_unique<Commit>();
    cm->fd = c.fd.get();
    cm->serial = c.serial;
    cm->id = id;
    cm->name = c.upload_name;
    cm->sink = std::move(c.upload);
    cm->manifest.assign(payload.begin(), payload.end());
    Commit* job = cm.get();
    auto work = [job, event = commit_event.get()] {
      job->result = job->sink->commit(job->manifest);
      job->done.store(true, std::memory_order_release);
      const uint64_t one = 1;
      (void)!::write(event, &one, sizeof one);
    };
    c.committing = true;
    commits.push_back(std::move(cm));
    try {
      job->thread = std::thread(work);
    } catch (const std::system_error&) {
      work();  // no thread to be had: the loop waits this once
    }
  }

  // Answers the uploads whose commit is done (commit_event).
  void on_commits_done() {
    uint64_t junk;
    (void)!::read(commit_event.get(), &junk, sizeof junk);
    for (auto it = commits.begin(); it != commits.end();) {
      Commit& cm = **it;
      if (!cm.done.load(std::memory_order_acquire)) {
        ++it;
        continue;
      }
      if (cm.thread.joinable()) cm.thread.join();
      if (cm.result.ok()) {
        if (auto old = snapshots.find(cm.name); old != snapshots.end()) retire(old);  // reopened on next use
        bump(st_up);
        log->info("upload of snapshot '{}' complete", cm.name);
      } else {
        bump(st_io);
        log->warn("upload of snapshot '{}' failed at its commit: {}", cm.name, cm.result.error().message());
      }
      auto c = conns.find(cm.fd);
      if (c != conns.end() && c->second->serial == cm.serial) {  // else it closed meanwhile
        c->second->committing = false;
        if (cm.result.ok()) {
          reply_ok(*c->second, cm.id);
        } else {
          reply_error(*c->second, cm.id, wire::ErrorCode::IO_ERROR, cm.result.error().message());
        }
        pump(cm.fd);
      }
      it = commits.erase(it);
    }
  }

  // Answers the list requests a listing just done covers (listing->event_fd()).
  void on_listing_done() {
    auto [done, result] = listing->take();
    if (!result) return;
    std::vector<const snapshot::SnapshotSummary*> offered;
    if (result->ok()) {
      // What cannot be served is not offered (the operator sees it in `ls --store` and `verify`).
      for (const auto& s : **result)
        if (s.damage.empty()) offered.push_back(&s);
    }
    std::vector<int> answered;
    std::erase_if(list_waiters, [&](const ListWaiter& w) {
      if (w.listing > done) return false;  // it came while this listing was under way
      auto it = conns.find(w.fd);
      if (it == conns.end() || it->second->serial != w.serial) return true;  // closed meanwhile
      Conn& c = *it->second;
      c.listing = false;
      if (!result->ok()) {
        reply_error(c, w.id, wire::ErrorCode::IO_ERROR, result->error().message());
      } else {
        capnp::MallocMessageBuilder m;
        auto r = m.initRoot<wire::Reply>();
        r.setId(w.id);
        auto out = r.initSnapshots(static_cast<unsigned>(offered.size()));
        for (size_t i = 0; i < offered.size(); ++i) {
          const auto& s = *offered[i];
          auto o = out[static_cast<unsigned>(i)];
          o.setName(s.name);
          o.setTotalBytes(s.total_bytes);
          o.setStoredBytes(s.stored_bytes);
          o.setRegions(static_cast<uint32_t>(s.regions));
          o.setFormatVersion(s.format_version);
          o.setCreatedUnixNs(s.created_unix_ns);
        }
        queue(c, m, {});
      }
      answered.push_back(w.fd);
      return true;
    });
    for (int fd : answered) pump(fd);  // its replies, and the requests it sent meanwhile
  }

  void handle(Conn& c, net::Header& h, std::span<const std::byte> payload) {
    bump(st_req);
    last_request = Clock::now();
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
        if (auto refused = net::accept_hello(hello, c.client_nonce, c.server_nonce)) {
          if (refused->code == wire::ErrorCode::BAD_REQUEST) bump(st_proto);
          reply_error(c, id, refused->code, refused->message);
          c.closing = true;
          return;
        }
        c.hello = true;
        c.authed = opt.token.empty();
        if (c.authed) c.in.set_max_payload(net::kMaxPayload);
        c.reads_corrupt = hello.getReadsCorrupt();
        c.prove_server = hello.getProveServer();
        c.reads_name.clear();
        c.reads_checksum = 0;
        c.reads.reset();
        // (A name no store can hold is not kept: requests naming it are refused anyway.)
        if (hello.getManifestChecksum() != 0 && hello.hasSnapshot() &&
            SnapshotLocation::in_store(opt.store_dir, hello.getSnapshot().cStr()).ok()) {
          c.reads_name = hello.getSnapshot().cStr();
          c.reads_checksum = hello.getManifestChecksum();
          if (c.authed) bind_version(c);
        }
        capnp::MallocMessageBuilder m;
        auto r = m.initRoot<wire::Reply>();
        r.setId(id);
        net::fill_hello_reply(r.initHello(), c.server_nonce, !opt.token.empty());
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
        if (net::authentic(opt.token, rq.getAuthenticate(), c.server_nonce, c.client_nonce)) {
          c.authed = true;
          c.in.set_max_payload(net::kMaxPayload);
          bind_version(c);
          capnp::MallocMessageBuilder m;
          auto r = m.initRoot<wire::Reply>();
          r.setId(id);
          net::fill_authenticated(r, c.prove_server, opt.token, c.server_nonce, c.client_nonce);
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
        o.setDiskReadBytes(st.disk_read_bytes);
        o.setCacheHits(st.cache_hits);
        o.setCacheMisses(st.cache_misses);
        o.setZerocopySends(st.zerocopy_sends);
        o.setZerocopyBytes(st.zerocopy_bytes);
        o.setZerocopyCopiedSends(st.zerocopy_copied_sends);
        o.setZerocopyFallbacks(st.zerocopy_fallbacks);
        o.setPlainSends(st.plain_sends);
        o.setPlainBytes(st.plain_bytes);
        o.setPages(st.pages);
        o.setErrorsCorrupt(st.errors_corrupt);
        o.setDatagramRequests(st.datagram_requests);
        o.setDatagramsDropped(st.datagrams_dropped);
        o.setDatagramsUnsent(st.datagrams_unsent);
        o.setDatagramsOverMtu(st.datagrams_over_mtu);
        o.setDatagramsOnStream(st.datagrams_on_stream);
        o.setSnapshotsRetired(st.snapshots_retired);
        o.setSnapshotsRetiredBytes(st.snapshots_retired_bytes);
        o.setConnectionsStalled(st.connections_stalled);
        o.setRestoresCompleted(st.restores_completed);
        o.setListings(st.listings);
        o.setListingManifestReads(st.listing_manifest_reads);
        o.setConnectionsRefused(st.connections_refused);
        queue(c, m, {});
        return;
      }
      if (rq.isList()) {
        c.listing = true;
        list_waiters.push_back(ListWaiter{c.fd.get(), c.serial, id, listing->want()});
        return;
      }
      if (rq.isGetManifest()) {
        // A connection that reads a version gets that version's manifest; any other, the store's.
        const char* name = rq.getGetManifest().cStr();
        auto snap = c.reads_name == name ? snapshot_for(c, name) : open_snapshot(name, true);
        if (!snap.ok()) {
          reply_error(c, id, open_failure(snap.error()), snap.error().message());
          return;
        }
        capnp::MallocMessageBuilder m;
        auto r = m.initRoot<wire::Reply>();
        r.setId(id);
        r.setManifest();
        queue(c, m, (*snap)->manifest_bytes);
        return;
      }
      if (rq.isRemove()) {
        remove_snapshot(c, id, rq.getRemove());
        return;
      }
      if (rq.isGetChunks()) {
        auto gc = rq.getGetChunks();
        auto snap = snapshot_for(c, gc.getSnapshot().cStr());
        auto chunks = gc.getChunks();
        if (!snap.ok()) {
          const auto code = open_failure(snap.error());
          for (auto ch : chunks) reply_error(c, id, code, snap.error().message(), ch.getTag());
          return;
        }
        for (auto ch : chunks) enqueue(c, Job{*snap, ch.getRegion(), ch.getChunk(), ch.getTag(), id, gc.getDemand(), {}, {}, false});
        return;
      }
      if (rq.isGetPage()) {
        get_page(c, rq.getGetPage(), id, std::nullopt);
        return;
      }
      if (rq.isOpenDatagrams()) {
        open_datagrams(c, id);
        return;
      }
      if (rq.isComplete()) {  // the restore is hanging up, done: counted, no reply
        bump(st_completed);
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

  // getPage, from the connection or (reply_to) by datagram: a thread waits on it, so the demand lane.
  void get_page(Conn& c, wire::GetPage::Reader gp, uint64_t id, std::optional<Peer> reply_to) {
    last_page = Clock::now();
    auto snap = snapshot_for(c, gp.getSnapshot().cStr());
    const bool on_stream = reply_to && gp.getReplyOnStream();
    Job j{nullptr, gp.getRegion(), gp.getChunk(), gp.getTag(), id, true, gp.getPage(), std::move(reply_to), on_stream};
    if (!snap.ok()) {
      reply_error(c, j, open_failure(snap.error()), snap.error().message());
      return;
    }
    j.snap = *snap;
    enqueue(c, std::move(j));
  }

  void open_datagrams(Conn& c, uint64_t id) {
    if (!udp_fd.valid()) {
      reply_error(c, id, wire::ErrorCode::BAD_REQUEST,
                  "this server takes no datagrams (started without them, or its UDP port was taken): ask on the "
                  "connection");
      return;
    }
    if (!c.session) {
      net::Nonce n = net::random_nonce();
      Session s;
      std::memcpy(s.data(), n.data(), s.size());
      c.session = s;
      sessions[s] = {c.fd.get(), c.serial};
    }
    capnp::MallocMessageBuilder m;
    auto r = m.initRoot<wire::Reply>();
    r.setId(id);
    auto d = r.initDatagrams();
    d.setSession(capnp::Data::Reader(reinterpret_cast<const kj::byte*>(c.session->data()), c.session->size()));
    d.setMaxPayload(kMaxDatagramPayload);
    queue(c, m, {});
  }

  // Request datagrams waiting on the UDP socket, a bounded number per loop turn.
  void on_datagrams(int fd) {
    for (int i = 0; i < 64; ++i) {
      Peer from;
      iovec iov{dgram_.data(), dgram_.size()};
      alignas(cmsghdr) char control[CMSG_SPACE(sizeof(in6_pktinfo)) + CMSG_SPACE(sizeof(in_pktinfo))];
      msghdr mh{};
      mh.msg_name = &from.addr;
      mh.msg_namelen = sizeof from.addr;
      mh.msg_iov = &iov;
      mh.msg_iovlen = 1;
      mh.msg_control = control;
      mh.msg_controllen = sizeof control;
      ssize_t n = ::recvmsg(fd, &mh, MSG_DONTWAIT | MSG_TRUNC);
      if (n < 0) return;  // none left (or an error the socket reports once: nothing to do)
      from.len = mh.msg_namelen;
      for (cmsghdr* cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
        if (cm->cmsg_level == IPPROTO_IP && cm->cmsg_type == IP_PKTINFO) {
          from.pktinfo_level = IPPROTO_IP;
          std::memcpy(&from.pktinfo.v4, CMSG_DATA(cm), sizeof(in_pktinfo));
          from.pktinfo.v4.ipi_spec_dst = from.pktinfo.v4.ipi_addr;  // reply from where it was sent
          from.pktinfo.v4.ipi_ifindex = 0;                          // by whichever route
        } else if (cm->cmsg_level == IPPROTO_IPV6 && cm->cmsg_type == IPV6_PKTINFO) {
          from.pktinfo_level = IPPROTO_IPV6;
          std::memcpy(&from.pktinfo.v6, CMSG_DATA(cm), sizeof(in6_pktinfo));  // its interface kept: link-local
        }
      }
      handle_datagram(std::span(dgram_.data(), std::min(static_cast<size_t>(n), dgram_.size())),
                      static_cast<size_t>(n) > dgram_.size(), from);
    }
  }

  // Where a reply to `from` for connection `c` leaves from: the session's own connected socket,
  // made on its first datagram (see Conn::dgram), or the shared one where that cannot be had.
  Peer session_socket(Conn& c, Peer from) {
    if (c.dgram.valid()) {
      if (same_endpoint(c.dgram_peer, from)) from.socket = c.dgram.get();
      return from;  // (another port of the same host: the shared socket answers it)
    }
    sockaddr_storage local{};
    socklen_t len = 0;
    if (from.addr.ss_family == AF_INET && from.pktinfo_level == IPPROTO_IP) {
      auto& a = reinterpret_cast<sockaddr_in&>(local);
      a.sin_family = AF_INET;
      a.sin_addr = from.pktinfo.v4.ipi_addr;
      a.sin_port = htons(port);
      len = sizeof a;
    } else if (from.addr.ss_family == AF_INET6 && from.pktinfo_level == IPPROTO_IPV6) {
      auto& a = reinterpret_cast<sockaddr_in6&>(local);
      a.sin6_family = AF_INET6;
      a.sin6_addr = from.pktinfo.v6.ipi6_addr;
      a.sin6_port = htons(port);
      if (IN6_IS_ADDR_LINKLOCAL(&a.sin6_addr)) a.sin6_scope_id = from.pktinfo.v6.ipi6_ifindex;
      len = sizeof a;
    } else {
      return from;  // where it was sent is unknown (a v4 datagram on a dual-stack socket): shared
    }
    sys::UniqueFd s(::socket(from.addr.ss_family, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    int one = 1;
    if (s.valid()) never_fragment(s.get(), from.addr.ss_family);
    if (!s.valid() || ::setsockopt(s.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
        ::bind(s.get(), reinterpret_cast<sockaddr*>(&local), len) != 0 ||
        ::connect(s.get(), reinterpret_cast<sockaddr*>(&from.addr), from.len) != 0) {
      return from;
    }
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = s.get();
    if (::epoll_ctl(epoll_fd.get(), EPOLL_CTL_ADD, s.get(), &ev) != 0) return from;
    dgram_owner[s.get()] = c.fd.get();
    c.dgram_peer = from;
    c.dgram = std::move(s);
    from.socket = c.dgram.get();
    return from;
  }

  // Anyone can send us datagrams: one that is not a well-formed getPage of a live session, from
  // that session's peer, is dropped without an answer (no reflection), counted, and logged at
  // most once a second.
  void handle_datagram(std::span<const std::byte> d, bool truncated, const Peer& from) {
    auto drop = [&](const char* why) {
      bump(st_dgram_drop);
      auto now = Clock::now();
      if (now < next_drop_log) return;
      next_drop_log = now + std::chrono::seconds(1);
      char host[INET6_ADDRSTRLEN] = "?";
      const void* a = from.addr.ss_family == AF_INET6
                          ? static_cast<const void*>(&reinterpret_cast<const sockaddr_in6&>(from.addr).sin6_addr)
                          : static_cast<const void*>(&reinterpret_cast<const sockaddr_in&>(from.addr).sin_addr);
      ::inet_ntop(from.addr.ss_family, a, host, sizeof host);
      log->warn("datagram from {}: {}; dropped (further drops this second only counted)", host, why);
    };
    if (truncated) return drop("longer than any request");
    auto header = net::request_datagram_header(d);
    if (!header.ok()) return drop(header.error().message().c_str());
    auto h = net::Header::parse(*header);
    if (!h.ok()) return drop("malformed header");
    try {
      auto rq = (*h)->root<wire::Request>();
      if (!rq.isGetPage()) return drop("not a getPage request");
      auto gp = rq.getGetPage();
      auto sd = gp.getSession();
      Session key;
      if (sd.size() != key.size()) return drop("no session");
      std::memcpy(key.data(), sd.begin(), key.size());
      auto s = sessions.find(key);
      if (s == sessions.end()) return drop("no live session of that id (its connection is gone?)");
      auto it = conns.find(s->second.first);
      if (it == conns.end() || it->second->serial != s->second.second) return drop("no live session of that id");
      Conn& c = *it->second;
      if (!same_host(c.peer, from)) return drop("not from the address of the session's connection");
      // Datagram jobs skip the connection's read backpressure: bounded here instead (a fetcher
      // has one request in flight; the client asks on the connection when we drop one).
      if (c.demand.size() + c.waiting.size() >= kMaxQueuedDatagramJobs) return drop("its connection has too many queued");
      bump(st_req);
      bump(st_dgram_req);
      last_request = Clock::now();
      get_page(c, gp, rq.getId(), session_socket(c, from));
      pump(c.fd.get());
    } catch (const kj::Exception&) {
      drop("malformed request");
    }
  }

  // A chunk (or page) asked for by a peer: checked against the manifest, then queued in its lane.
  void enqueue(Conn& c, Job j) {
    const Manifest& man = j.snap->manifest;
    if (j.region >= man.regions.size() || j.chunk >= man.regions[j.region].chunks.size()) {
      bump(st_range);
      reply_error(c, j, wire::ErrorCode::OUT_OF_RANGE,
                  fmt::format("chunk {}/{} is outside snapshot '{}'", j.region, j.chunk, j.snap->name));
      return;
    }
    if (j.page) {
      uint32_t pages = man.chunk_length(j.region, j.chunk) / man.regions[j.region].page_size;
      if (*j.page >= pages) {
        bump(st_range);
        reply_error(c, j, wire::ErrorCode::OUT_OF_RANGE,
                    fmt::format("page {} is outside chunk {}/{} of snapshot '{}' ({} pages)", *j.page, j.region,
                                j.chunk, j.snap->name, pages));
        return;
      }
    }
    if (j.reply_to && man.regions[j.region].chunks[j.chunk].codec != Codec::kZstdPages && !move_to_stream(c, j)) {
      // Its pages go as the whole chunk, never in a datagram: said before anything is read.
      reply_error(c, j, wire::ErrorCode::USE_STREAM, kUseStream);
      return;
    }
    (j.demand ? c.demand : c.prefetch).push_back(std::move(j));
  }

  // A chunk's stored bytes in one span: the extent's own when one extent holds them, else
  // copied into scratch_ (a chunk may straddle extents).
  std::span<const std::byte> contiguous(const decltype(OutFrame::slices)& slices, size_t length) {
    if (slices.size() == 1) return slices.front().second;
    if (scratch_.size() < length) scratch_.resize(length);  // grows to the largest chunk, once
    size_t at = 0;
    for (const auto& s : slices) {
      std::memcpy(scratch_.data() + at, s.second.data(), s.second.size());
      at += s.second.size();
    }
    return {scratch_.data(), at};
  }

  // A chunk reply: the header, then the chunk's bytes straight from the extents that hold them.
  // A page reply is the same (whole = true) unless the page is stored as a zstd frame of a
  // kZstdPages chunk: then the server verifies the stored chunk (the client, given one frame,
  // cannot check the chunk's storedChecksum) and sends that frame alone, copied.
  void queue_chunk(Conn& c, Job& j, boost::container::small_vector<Pin, 2> pins) {
    const ChunkInfo& ci = j.snap->manifest.regions[j.region].chunks[j.chunk];
    OutFrame f;
    f.urgent = j.demand;
    uint64_t got = 0;
    for (Pin& p : pins) {
      if (p->state != Extent::State::kReady) break;
      uint64_t base = p->index * ExtentCache::kExtentSize;
      uint64_t from = std::max(ci.offset, base), to = std::min(ci.offset + ci.stored_length, base + p->valid);
      if (from >= to) break;
      std::span<const std::byte> slice(p->data + (from - base), to - from);
      got += slice.size();
      f.slices.emplace_back(std::move(p), slice);
    }
    if (got != ci.stored_length) {
      bump(st_io);
      reply_error(c, j, wire::ErrorCode::IO_ERROR,
                  fmt::format("reading chunk {}/{} of snapshot '{}' failed", j.region, j.chunk, j.snap->name));
      return;
    }
    std::span<const std::byte> frame;  // a page reply's own frame; empty: the whole chunk goes
    if (j.page && ci.codec == Codec::kZstdPages) {
      const Manifest& man = j.snap->manifest;
      const uint32_t length = man.chunk_length(j.region, j.chunk), page_size = man.regions[j.region].page_size;
      auto stored = contiguous(f.slices, ci.stored_length);
      uint64_t newest = 0;
      for (const auto& sl : f.slices) newest = std::max(newest, sl.first->loaded);
      uint64_t& verified = j.snap->verified[j.region][j.chunk];
      if (verified == 0 || newest > verified) {  // not checked since its extents were read
        if (Status s = snapshot::ChunkDecoder::verify_stored(ci, stored, length, page_size); !s.ok()) {
          bump(st_corrupt);
          std::string msg = fmt::format("stored chunk {}/{} of snapshot '{}' is corrupt on the server ({}); the store "
                                        "needs the snapshot again (upload it with --replace)",
                                        j.region, j.chunk, j.snap->name, s.error().message());
          log->warn("{}", msg);
          reply_error(c, j, wire::ErrorCode::CORRUPT, msg);
          return;
        }
        verified = newest;
      }
      auto pf = snapshot::page_frame(stored, length, page_size, *j.page);
      if (snapshot::is_compressed_frame(pf, page_size)) frame = pf;
    }
    // capnp::word cannot be assigned (clang's capnp deletes it): cleared as bytes.
    std::memset(static_cast<void*>(word_buffer_.data()), 0, sizeof word_buffer_);
    capnp::MallocMessageBuilder m(kj::arrayPtr(word_buffer_.data(), word_buffer_.size()));
    auto r = m.initRoot<wire::Reply>();
    r.setId(j.id);
    if (j.page) {
      auto pg = r.initPage();
      pg.setRegion(j.region);
      pg.setChunk(j.chunk);
      pg.setPage(*j.page);
      pg.setTag(j.tag);
      pg.setWhole(frame.empty());
      pg.setStoredChecksum(ci.stored_checksum);
    } else {
      auto ch = r.initChunk();
      ch.setRegion(j.region);
      ch.setChunk(j.chunk);
      ch.setTag(j.tag);
    }
    if (j.reply_to) {
      const bool fits = !frame.empty() && frame.size() <= kMaxDatagramPayload;
      const Sent sent = fits ? send_datagram(*j.reply_to, m, frame) : Sent::kTooBig;
      if (sent == Sent::kSent) {
        bump(st_pages);
        bump(st_bytes, frame.size());
        return;
      }
      // Over the path MTU: fragments are lost whole where a firewall drops them, and the client
      // would wait milliseconds for nothing. Sent on the connection, or the client told at once
      // to ask there. Refused by a full socket: on the connection too where the client takes
      // it there, else lost like any datagram (the client asks again).
      if (fits && sent == Sent::kTooBig) bump(st_dgram_over_mtu);
      if (!move_to_stream(c, j)) {
        if (sent == Sent::kTooBig) reply_error(c, j, wire::ErrorCode::USE_STREAM, kUseStream);
        return;
      }
    }
    if (!frame.empty()) {
      // A few KiB at most: copied after the header (small sends are copied anyway), and the
      // extents are released at once.
      f.head = net::encode_frame(m, static_cast<uint32_t>(frame.size()));
      f.head.insert(f.head.end(), frame.begin(), frame.end());
      f.slices.clear();
      c.out.push(std::move(f));
      bump(st_pages);
      bump(st_bytes, frame.size());
      return;
    }
    f.head = net::encode_frame(m, static_cast<uint32_t>(ci.stored_length));
    c.out.push(std::move(f));
    bump(st_chunks);
    bump(st_bytes, ci.stored_length);
  }
  std::array<capnp::word, 16> word_buffer_{};  // a chunk or page reply header without a malloc
  std::vector<std::byte> scratch_;            // a page request's stored chunk that straddles extents

  // Starts the read of a claimed extent (or does it now, without io_uring).
  void start_read(Pin read_pin, const std::shared_ptr<OpenSnapshot>& snap) {
    const int data_fd = snap->data.get();
    Extent* e = read_pin.get();
    off_t at = static_cast<off_t>(e->index * ExtentCache::kExtentSize);
    if (!ring) {
      ssize_t n = ::pread(data_fd, e->data, ExtentCache::kExtentSize, at);
      cache->read_done(e, n < 0 ? -errno : static_cast<int>(n));
      if (n > 0) bump(st_disk, static_cast<uint64_t>(n));
      return;
    }
    io_uring_sqe* sqe = ring->sqe();
    if (e->buf_index >= 0) {
      io_uring_prep_read_fixed(sqe, data_fd, e->data, ExtentCache::kExtentSize, at, e->buf_index);
    } else {
      io_uring_prep_read(sqe, data_fd, e->data, ExtentCache::kExtentSize, static_cast<uint64_t>(at));
    }
    io_uring_sqe_set_data(sqe, e);
    ring_pending = true;
    reading.emplace(e, Read{std::move(read_pin), snap});
  }

  // Turns queued chunk requests into replies, demand first, while the connection holds less
  // than its limit: from the cache at once, or after reads of the missing extents.
  void serve_jobs(Conn& c) {
    c.starved = false;

    while (c.replies_held() < opt.max_queued_bytes && (!c.demand.empty() || !c.prefetch.empty())) {
      auto& lane = c.demand.empty() ? c.prefetch : c.demand;
      const Job& j = lane.front();
      const ChunkInfo& ci = j.snap->manifest.regions[j.region].chunks[j.chunk];
      boost::container::small_vector<Pin, 2> pins;
      bool ready = true;
      if (ci.stored_length > 0) {
        uint64_t first = ci.offset / ExtentCache::kExtentSize;
        uint64_t last = (ci.offset + ci.stored_length - 1) / ExtentCache::kExtentSize;
        for (uint64_t i = first; i <= last; ++i) {
          Pin p = cache->lookup(j.snap->file_id, i);
          if (!p.get()) {
            if (reading.size() >= kMaxReads || !(p = cache->claim(j.snap->file_id, i)).get()) {
              c.starved = true;  // resumed when an extent is unpinned or a read completes
              return;
            }
            start_read(cache->share(p.get()), j.snap);
          }
          if (p->state == Extent::State::kReading) {
            ready = false;
            p->waiters.emplace_back(c.fd.get(), c.serial);
          }
          pins.push_back(std::move(p));
        }
      }
      Job job = std::move(lane.front());
      lane.pop_front();
      if (ready) {
        queue_chunk(c, job, std::move(pins));
      } else if (job.reply_to && !move_to_stream(c, job)) {
        // Asked by datagram for a chunk that is being read from disk: the client is told at
        // once to ask on its connection (where it can wait as long as the read takes), not
        // left to take a reply later than its datagram wait for a loss and, after three such,
        // to stop using datagrams for a while. The read goes on for that request. (With
        // replyOnStream the job waits for the read as the connection's, announced.)
        reply_error(c, job, wire::ErrorCode::USE_STREAM, kReadingUseStream);
      } else {
        c.waiting_bytes += ci.stored_length;
        c.waiting.push_back(Waiting{std::move(job), std::move(pins)});
      }
    }
  }

  // Replies whose extents have all been read (or failed) go out.
  void finish_waiting(Conn& c) {
    auto reading_any = [](const Waiting& w) {
      for (const Pin& p : w.pins)
        if (p->state == Extent::State::kReading) return true;
      return false;
    };
    std::deque<Waiting> still;
    for (Waiting& w : c.waiting) {
      if (reading_any(w)) {
        still.push_back(std::move(w));
        continue;
      }
      c.waiting_bytes -= w.job.snap->manifest.regions[w.job.region].chunks[w.job.chunk].stored_length;
      queue_chunk(c, w.job, std::move(w.pins));
    }
    c.waiting = std::move(still);
  }

  void submit_reads() {
    if (ring_pending) {
      io_uring_submit(ring->get());
      ring_pending = false;
    }
  }

  // Completed reads: their waiting replies go out.
  void on_reads_done() {
    uint64_t junk;
    (void)!::read(ring_event.get(), &junk, sizeof junk);
    std::set<int> touched;
    io_uring_cqe* cqe = nullptr;
    while (io_uring_peek_cqe(ring->get(), &cqe) == 0) {
      auto* e = static_cast<Extent*>(io_uring_cqe_get_data(cqe));
      int res = cqe->res;
      io_uring_cqe_seen(ring->get(), cqe);
      if (res > 0) bump(st_disk, static_cast<uint64_t>(res));
      else if (res < 0) log->warn("reading the data file failed: {}", std::strerror(-res));
      cache->read_done(e, res);
      for (auto [fd, serial] : e->waiters) {
        auto it = conns.find(fd);
        if (it != conns.end() && it->second->serial == serial) touched.insert(fd);
      }
      e->waiters.clear();
      reading.erase(e);  // drops the read's pin (and its hold on the snapshot)
      reads_completed = true;
    }
    for (int fd : touched) {
      auto it = conns.find(fd);
      if (it == conns.end()) continue;
      finish_waiting(*it->second);
      pump(fd);
    }
  }

  // Connections that found no free extent (or read slot) try again once some were released.
  void retry_starved() {
    bool freed = cache->take_unpinned();
    if (!std::exchange(reads_completed, false) && !freed) return;
    std::vector<int> fds;
    for (auto& [fd, c] : conns)
      if (c->starved) fds.push_back(fd);
    for (int fd : fds) pump(fd);
  }

  // Moves a connection forward: write what is queued, start more reads, re-arm epoll.
  void pump(int fd) {
    auto it = conns.find(fd);
    if (it == conns.end()) return;
    Conn& c = *it->second;
    // Send, then turn more requests into replies, for as long as the socket takes them.
    bool keep = true;
    while (keep) {
      if (c.out.has_unsent()) keep = on_writable(c);
      if (!keep || c.out.has_unsent()) break;  // the socket is full: EPOLLOUT resumes us
      // Requests left buffered while the connection was over its bound: no read event may come
      // for them (the peer may have sent all it will).
      const size_t before = c.out.bytes(), buffered = c.in.buffered();
      keep = handle_frames(c);
      serve_jobs(c);
      if (c.out.bytes() == before && c.in.buffered() == buffered) break;  // nothing new (waiting for reads, or done)
    }
    if (keep && c.closing && c.out.idle() && c.waiting.empty()) keep = false;
    if (!keep) {
      close_conn(fd);
      return;
    }
    update_events(c);
  }

  void update_events(Conn& c) {
    bool want_read = !c.closing && !c.committing && !c.listing && c.held() < opt.max_queued_bytes;
    uint32_t events = (want_read ? uint32_t{EPOLLIN} : 0u) | (c.out.has_unsent() ? uint32_t{EPOLLOUT} : 0u);
    if (events == c.events) return;  // a syscall saved on nearly every turn
    c.events = events;
    epoll_event ev{};
    ev.events = events;
    ev.data.fd = c.fd.get();
    ::epoll_ctl(epoll_fd.get(), EPOLL_CTL_MOD, c.fd.get(), &ev);
  }

  void close_conn(int fd) {
    ::epoll_ctl(epoll_fd.get(), EPOLL_CTL_DEL, fd, nullptr);
    auto it = conns.find(fd);
    if (it == conns.end()) return;
    std::deque<OutFrame> held = it->second->out.take_in_flight();
    if (!held.empty()) {
      // The kernel may still send from these extents: reset the connection (its send queue is
      // dropped at once) and keep them pinned a little longer.
      linger lg{1, 0};
      ::setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
      graveyard.emplace_back(Clock::now() + std::chrono::seconds(2), std::move(held));
    }
    if (it->second->session) sessions.erase(*it->second->session);  // its datagrams are strangers now
    if (const auto& v = it->second->reads; v && v->retired) keep_a_while(v);  // it may reconnect
    if (it->second->dgram.valid()) {
      ::epoll_ctl(epoll_fd.get(), EPOLL_CTL_DEL, it->second->dgram.get(), nullptr);
      dgram_owner.erase(it->second->dgram.get());
    }
    conns.erase(it);
    st_open.fetch_sub(1, std::memory_order_relaxed);
  }

  // Returns false when the connection is to be closed.
  bool on_readable(Conn& c) {
    for (int rounds = 0; rounds < 16 && !over_bound(c); ++rounds) {
      auto space = c.in.writable();
      ssize_t n = ::recv(c.fd.get(), space.data(), space.size(), MSG_DONTWAIT);
      if (n == 0) return false;
      if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) break;
        return false;
      }
      c.in.commit(static_cast<size_t>(n));
      bool drained = static_cast<size_t>(n) < space.size();  // a short read: no need to ask again
      if (!handle_frames(c)) return false;
      if (drained) break;  // epoll is level-triggered: more data wakes us again
    }
    return true;
  }

  bool over_bound(const Conn& c) const { return c.held() >= opt.max_queued_bytes; }

  // Handles the whole frames buffered while the connection is under its bound: a frame's reply
  // (a manifest, an error per chunk) is queued before the next frame is looked at, so one read
  // of many requests cannot queue more than one reply's worth past it. The rest wait in the
  // buffer for pump(). False: the peer broke the framing (close it).
  bool handle_frames(Conn& c) {
    while (!c.closing && !c.committing && !c.listing && !over_bound(c)) {
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
    }
    return true;
  }

  // Returns false when the connection is to be closed (a send failed).
  bool on_writable(Conn& c) { return c.out.send(c.fd.get(), sends) != SendQueue::Outcome::kError; }

  void accept_all() {
    for (;;) {
      Peer peer;
      peer.len = sizeof peer.addr;
      auto next = acceptor.accept(listen_fd.get(), reinterpret_cast<sockaddr*>(&peer.addr), &peer.len);
      if (next.shed) {
        bump(st_refused);
        auto now = Clock::now();
        if (now >= next_refused_log) {
          next_refused_log = now + std::chrono::seconds(1);
          log->warn("out of file descriptors ({}): connections refused; raise the open-file limit (ulimit -n)",
                    std::strerror(EMFILE));
        }
        continue;
      }
      if (!next.fd.valid()) return;
      // Full: the oldest connection still in its handshake makes room.
      if (conns.size() >= opt.max_connections) {
        if (const int oldest = net::oldest_unauthenticated(conns); oldest >= 0) {
          bump(st_hs);
          close_conn(oldest);
        }
      }
      if (conns.size() >= opt.max_connections) {
        bump(st_refused);
        const auto now = Clock::now();
        if (now >= next_refused_log) {
          next_refused_log = now + std::chrono::seconds(1);
          log->warn("{} connections open, the limit, every one authenticated: connections refused", conns.size());
        }
        continue;  // closed as it goes
      }
      int fd = next.fd.release();
      int one = 1;
      ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      bool zc = opt.zerocopy && ::setsockopt(fd, SOL_SOCKET, SO_ZEROCOPY, &one, sizeof one) == 0;
      auto c = std::make_unique<Conn>(zc);
      c->fd.reset(fd);
      c->serial = next_serial++;
      c->peer = peer;
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
    ServerStats st;
    st.connections = r(st_conn);
    st.open_connections = r(st_open);
    st.requests = r(st_req);
    st.chunks = r(st_chunks);
    st.bytes = r(st_bytes);
    st.errors_protocol = r(st_proto);
    st.errors_auth = r(st_auth);
    st.errors_not_found = r(st_nf);
    st.errors_range = r(st_range);
    st.errors_io = r(st_io);
    st.handshake_timeouts = r(st_hs);
    st.uploads = r(st_up);
    st.disk_read_bytes = r(st_disk);
    st.cache_hits = r(st_hits);
    st.cache_misses = r(st_misses);
    st.zerocopy_sends = r(sends.zerocopy_sends);
    st.zerocopy_bytes = r(sends.zerocopy_bytes);
    st.zerocopy_copied_sends = r(sends.copied_sends);
    st.zerocopy_fallbacks = r(sends.fallbacks);
    st.plain_sends = r(sends.plain_sends);
    st.plain_bytes = r(sends.plain_bytes);
    st.pages = r(st_pages);
    st.errors_corrupt = r(st_corrupt);
    st.datagram_requests = r(st_dgram_req);
    st.datagrams_dropped = r(st_dgram_drop);
    st.datagrams_unsent = r(st_dgram_unsent);
    st.datagrams_over_mtu = r(st_dgram_over_mtu);
    st.datagrams_on_stream = r(st_dgram_on_stream);
    st.connections_refused = r(st_refused);
    st.snapshots_retired = r(st_retired);
    st.snapshots_retired_bytes = r(st_retired_bytes);
    st.connections_stalled = r(st_stalled);
    st.restores_completed = r(st_completed);
    st.listings = listing->listings();
    st.listing_manifest_reads = listing->manifest_reads();
    return st;
  }

  // Per loop turn: counters other threads read, starved connections, expired pins.
  // Returns the epoll timeout for the next turn (ms).
  // Every loop turn, polling or not: reads prepared this turn go to the device now.
  void every_turn() {
    retry_starved();
    submit_reads();
  }

  int housekeeping() {
    st_hits.store(cache->stats().hits, std::memory_order_relaxed);
    st_misses.store(cache->stats().misses, std::memory_order_relaxed);
    auto now = Clock::now();
    while (!graveyard.empty() && graveyard.front().first <= now) graveyard.pop_front();
    while (!lingering.empty() && lingering.front().first <= now) lingering.pop_front();
    uint64_t held_bytes = 0;
    for (auto it = retired.begin(); it != retired.end();) {
      if (!it->second.snap.expired()) {
        held_bytes += it->second.stored_bytes;
        ++it;
        continue;
      }
      cache->drop_file(it->first);
      log->info("snapshot '{}': the version that left the store ({:016x}) is no longer read; closed",
                it->second.name, it->second.checksum);
      it = retired.erase(it);
    }
    st_retired.store(retired.size(), std::memory_order_relaxed);
    st_retired_bytes.store(held_bytes, std::memory_order_relaxed);
    expire_handshakes();
    expire_stalled();
    bool busy = opt.cpu_latency_qos && now - last_request < std::chrono::milliseconds(100);
    return cpu_latency.set(busy) ? 100 : 1000;  // held: wake up in time to give it back
  }

  void expire_stalled() {
    const auto now = Clock::now();
    std::vector<int> doomed;
    for (auto& [fd, c] : conns) {
      // Waiting on the peer: replies unsent, or sent zero-copy and not yet released (on
      // loopback their completions come only as the peer reads them).
      if (c->out.idle() || c->out.sent_total() != c->sent_seen) {
        c->sent_seen = c->out.sent_total();
        c->progress_at = now;
      } else if (now - c->progress_at > opt.send_stall_timeout) {
        doomed.push_back(fd);
      }
    }
    for (int fd : doomed) {
      bump(st_stalled);
      log->warn("connection {}: took none of its replies for {} ms; closing", fd, opt.send_stall_timeout.count());
      close_conn(fd);
    }
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

namespace {

// The server's stats in Prometheus text format (ServerOptions::metrics).
std::string metrics_text(const ServerStats& st) {
  net::MetricsText out;
  auto one = [&](const char* name, const char* type, const char* help, uint64_t v) {
    out.family(name, type, help);
    out.sample(name, "", v);
  };
  auto by = [&](const char* name, const char* help, const char* label,
                std::initializer_list<std::pair<const char*, uint64_t>> values) {
    out.family(name, "counter", help);
    for (const auto& [k, v] : values) out.sample(name, fmt::format("{}=\"{}\"", label, k), v);
  };
  one("lazymem_pageserver_connections_total", "counter", "Connections accepted.", st.connections);
  one("lazymem_pageserver_open_connections", "gauge", "Connections open now.", st.open_connections);
  one("lazymem_pageserver_connections_refused_total", "counter", "Connections refused: over the limit, or out of descriptors.", st.connections_refused);
  one("lazymem_pageserver_requests_total", "counter", "Requests, on connections and by datagram.", st.requests);
  one("lazymem_pageserver_chunks_total", "counter", "Chunks sent (getChunks, and pages sent as their whole chunk).", st.chunks);
  one("lazymem_pageserver_pages_total", "counter", "Pages sent as their own frame (getPage).", st.pages);
  one("lazymem_pageserver_restores_completed_total", "counter", "Restores that said they hold every page they need.",
      st.restores_completed);
  by("lazymem_pageserver_sent_bytes_total", "Chunk and page bytes sent, by how.", "how",
     {{"zerocopy", st.zerocopy_bytes}, {"plain", st.plain_bytes}});
  by("lazymem_pageserver_sends_total", "Sends of chunk and page data, by how (copied: zero-copy sends the kernel copied).", "how",
     {{"zerocopy", st.zerocopy_sends}, {"copied", st.zerocopy_copied_sends}, {"plain", st.plain_sends}});
  one("lazymem_pageserver_zerocopy_fallbacks_total", "counter", "Connections switched to plain sends (the kernel copied).", st.zerocopy_fallbacks);
  one("lazymem_pageserver_disk_read_bytes_total", "counter", "Bytes read from the store (O_DIRECT).", st.disk_read_bytes);
  by("lazymem_pageserver_cache_lookups_total", "Extents of chunk data looked up in memory.", "result",
     {{"hit", st.cache_hits}, {"miss", st.cache_misses}});
  by("lazymem_pageserver_errors_total", "Requests refused or failed, by kind.", "kind",
     {{"protocol", st.errors_protocol}, {"auth", st.errors_auth}, {"not_found", st.errors_not_found},
      {"range", st.errors_range}, {"io", st.errors_io}, {"corrupt", st.errors_corrupt},
      {"handshake_timeout", st.handshake_timeouts}, {"send_stall", st.connections_stalled}});
  one("lazymem_pageserver_uploads_total", "counter", "Snapshots uploaded and committed.", st.uploads);
  one("lazymem_pageserver_listings_total", "counter", "Listings of the store made for list requests (off the serving loop).",
      st.listings);
  one("lazymem_pageserver_listing_manifest_reads_total", "counter",
      "Manifests read by those listings (only new or changed ones are).", st.listing_manifest_reads);
  by("lazymem_pageserver_datagrams_total", "getPage datagrams, by outcome.", "outcome",
     {{"request", st.datagram_requests}, {"dropped", st.datagrams_dropped}, {"unsent", st.datagrams_unsent},
      {"over_mtu", st.datagrams_over_mtu}, {"on_stream", st.datagrams_on_stream}});
  one("lazymem_pageserver_snapshots_retired", "gauge", "Snapshot versions replaced or removed in the store, still held for restores reading them.",
      st.snapshots_retired);
  one("lazymem_pageserver_snapshots_retired_bytes", "gauge",
      "Stored bytes of those versions: disk space a removal or replacement has not freed yet.", st.snapshots_retired_bytes);
  return out.take();
}

}  // namespace

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
    return net::bind_error("--listen", SnapshotLocation::Server{options.host, options.port}.to_string(), errno);
  }
  if (::listen(im.listen_fd.get(), 256) != 0) return sys_error("listen", errno);
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  ::getsockname(im.listen_fd.get(), reinterpret_cast<sockaddr*>(&ss), &len);
  s->port_ = ntohs(ss.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port
                                            : reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
  im.port = s->port_;
  if (options.datagrams) {
    // The TCP socket's address and port (ss), by UDP. Not fatal when taken: clients use TCP.
    sys::UniqueFd udp(::socket(ss.ss_family, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (udp.valid()) {  // where each datagram was sent to, so that its reply leaves from there
      (void)::setsockopt(udp.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);  // sessions' own bind it too
      (void)::setsockopt(udp.get(), IPPROTO_IP, IP_PKTINFO, &one, sizeof one);
      if (ss.ss_family == AF_INET6) (void)::setsockopt(udp.get(), IPPROTO_IPV6, IPV6_RECVPKTINFO, &one, sizeof one);
      never_fragment(udp.get(), ss.ss_family);
    }
    if (udp.valid() && ::bind(udp.get(), reinterpret_cast<sockaddr*>(&ss), len) == 0) {
      im.udp_fd = std::move(udp);
    } else {
      im.log->warn("UDP port {} unavailable ({}): serving getPage on connections only", s->port_, std::strerror(errno));
    }
  }
  im.epoll_fd.reset(::epoll_create1(EPOLL_CLOEXEC));
  im.stop_fd.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  im.commit_event.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  LAZYMEM_ASSIGN_OR_RETURN(im.listing, StoreListing::start(options.store_dir));
  {
    auto ring = sys::Ring::create(static_cast<unsigned>(Impl::kMaxReads));
    if (ring.ok()) {
      im.ring_event.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
      if (io_uring_register_eventfd((*ring)->get(), im.ring_event.get()) == 0) im.ring = std::move(*ring);
    }
    if (!im.ring) im.log->info("io_uring unavailable: reading chunks with pread, one at a time");
    im.cache = std::make_unique<ExtentCache>(options.cache_bytes, im.ring ? im.ring->get() : nullptr);
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = im.listen_fd.get();
  ::epoll_ctl(im.epoll_fd.get(), EPOLL_CTL_ADD, im.listen_fd.get(), &ev);
  ev.data.fd = im.stop_fd.get();
  ::epoll_ctl(im.epoll_fd.get(), EPOLL_CTL_ADD, im.stop_fd.get(), &ev);
  ev.data.fd = im.commit_event.get();
  ::epoll_ctl(im.epoll_fd.get(), EPOLL_CTL_ADD, im.commit_event.get(), &ev);
  ev.data.fd = im.listing->event_fd();
  ::epoll_ctl(im.epoll_fd.get(), EPOLL_CTL_ADD, im.listing->event_fd(), &ev);
  if (im.ring) {
    ev.data.fd = im.ring_event.get();
    ::epoll_ctl(im.epoll_fd.get(), EPOLL_CTL_ADD, im.ring_event.get(), &ev);
  }
  if (im.udp_fd.valid()) {
    ev.data.fd = im.udp_fd.get();
    ::epoll_ctl(im.epoll_fd.get(), EPOLL_CTL_ADD, im.udp_fd.get(), &ev);
  }
  if (!options.metrics.empty()) {
    LAZYMEM_ASSIGN_OR_RETURN(im.metrics, net::MetricsEndpoint::listen(options.metrics));
    ev.data.fd = im.metrics->fd();
    ::epoll_ctl(im.epoll_fd.get(), EPOLL_CTL_ADD, im.metrics->fd(), &ev);
  }
  return s;
}

uint16_t PageServer::metrics_port() const { return impl_->metrics ? impl_->metrics->port() : 0; }

PageServer::~PageServer() = default;

Status PageServer::run() {
  Impl& im = *impl_;
  std::vector<epoll_event> events(256);
  int timeout = 1000;
  Clock::time_point next_housekeeping{};
  for (;;) {
    int n = ::epoll_wait(im.epoll_fd.get(), events.data(), static_cast<int>(events.size()), timeout);
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
      if (fd == im.commit_event.get()) {
        im.on_commits_done();
        continue;
      }
      if (fd == im.listing->event_fd()) {
        im.on_listing_done();
        continue;
      }
      if (im.metrics && fd == im.metrics->fd()) {
        im.metrics->serve([&] { return metrics_text(im.snapshot_stats()); });
        continue;
      }
      if ((im.udp_fd.valid() && fd == im.udp_fd.get()) || im.dgram_owner.count(fd) != 0) {
        im.on_datagrams(fd);
        continue;
      }
      auto it = im.conns.find(fd);
      if (it == im.conns.end()) continue;
      Conn& c = *it->second;
      if (what & EPOLLERR) c.out.on_error_queue(fd, im.sends);  // zero-copy completions
      bool keep = true;
      if (what & (EPOLLIN | EPOLLHUP | EPOLLERR)) keep = im.on_readable(c);
      if (!keep) {
        im.close_conn(fd);
        continue;
      }
      im.pump(fd);
    }
    im.every_turn();
    // Polling after a page request (ServerOptions::poll_after_page): housekeeping once a ms.
    auto now = Clock::now();
    const bool polling = now - im.last_page < im.opt.poll_after_page;
    if (!polling || now >= next_housekeeping) {
      timeout = im.housekeeping();
      next_housekeeping = now + std::chrono::milliseconds(1);
    }
    if (polling) timeout = 0;
  }
}

void PageServer::stop() {
  uint64_t one = 1;
  (void)!::write(impl_->stop_fd.get(), &one, sizeof one);
}

ServerStats PageServer::stats() const { return impl_->snapshot_stats(); }

}  // namespace lazymem::pageserver
