// The agent daemon: accepts uffds and serves their faults with one FaultEngine.
#include "daemon.h"

#include <fmt/format.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <system_error>
#include <thread>

#include "agent.capnp.h"
#include "agent_client/unix_channel.h"
#include "control_request.h"
#include "core/log.h"
#include "firecracker_handshake.h"
#include "net/auth.h"
#include "net/metrics_endpoint.h"
#include "snapshot/manifest.h"
#include "sys/process_maps.h"
#include "source_opener.h"
#include "sys/acceptor.h"
#include "sys/fd_kind.h"
#include "sys/peer_cred.h"
#include "sys/unix_listeners.h"

namespace lazymem::agent {
namespace pa = proto::agent;
namespace {

// epoll tags: kind << 32 | fd. Kind 0 is for the single objects below.
constexpr uint64_t kListenTag = 1, kStopTag = 3, kEngineTag = 4, kMetricsTag = 5, kOpenedTag = 6;
enum Kind : uint64_t { kSingle = 0, kConn = 1, kPidfd = 2, kFcListen = 3, kFcConn = 4, kFcTimer = 5, kNoticeTimer = 6 };
uint64_t tag(Kind k, int fd) { return (uint64_t{k} << 32) | static_cast<uint32_t>(fd); }

constexpr int kHandshakeSeconds = 5;         // a handshake must be complete this long after connect
constexpr size_t kMaxPendingHandshakes = 64;  // silent peers cost an fd each, never a stalled loop
// Status long polls held at once: per user, so that one user's cannot lock out another's (1024
// of one user's refused root's), and in all, larger. Root's count against its own limit only.
constexpr size_t kMaxWaitersPerUser = 256;
constexpr size_t kMaxWaiters = 4096;
constexpr size_t kMaxFdsPerRequest = 1;       // a Restore's uffd; no other request carries one
// Replies queued for one connection. Reading stops while any wait, so only notices (complete,
// failed, long-poll answers) can add to them; a peer this far behind is not reading at all.
constexpr size_t kMaxQueuedReplyBytes = 16 << 20;

// A client's control connection. Replies wait in `out` until the socket takes them: the loop
// never blocks on a peer. While they wait, no further request of that peer is read (its own
// requests are its backpressure), so a peer that never reads holds one reply's memory and an
// fd, not the loop and not an unbounded queue.
struct Conn {
  sys::UniqueFd fd;
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
  std::vector<gid_t> groups;  // as at connect (SO_PEERGROUPS)
  // The process that connected, taken at accept: its pid, read later, may be another's by then.
  sys::UniqueFd pidfd;
  net::FrameBuffer buf;
  std::deque<sys::UniqueFd> fds;
  std::vector<std::byte> out;  // frames not yet sent, from out_sent on
  size_t out_sent = 0;
  uint32_t events = EPOLLIN;  // what the loop watches it for: EPOLLOUT while `out` waits
  bool broken = false;        // a send failed: closed once the current event is handled
};

struct Served {
  fault::SessionId session;
  pid_t pid;
  uid_t uid;
  int conn_fd;  // -1: none (Firecracker, or the client went away)
  sys::UniqueFd pidfd;
  bool reported = false;
  uint64_t reply_id = 0;    // request id the complete / failed notices answer
  sys::UniqueFd peer_sock;  // Firecracker's handshake connection, held open while we serve it
  std::string name;         // the engine session's name; forked children's are "<name>/fork..."
  // Its failed pages wait to be poisoned until the client has said why (Restore
  // announcesFailures): released on its failureSeen, its connection closing, or notice_timer.
  bool hold_failures = false;
  sys::UniqueFd notice_timer;
};

// A socket accepting Firecracker's UFFD handshake, and the snapshot it serves.
// Where a listening socket's file is. Removed through the directory it was made in, and only
// while that name still holds the very file it bound: the agent runs as root, and a user who
// owns the directory could otherwise swap in a symlink (for the directory or the name) and have
// it remove any file.
struct SocketFile {
  sys::UniqueFd dir;
  std::string name;
  dev_t dev = 0;
  ino_t ino = 0;

  void remove() const {
    struct stat st {};
    if (dir.valid() && ::fstatat(dir.get(), name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISSOCK(st.st_mode) &&
        st.st_dev == dev && st.st_ino == ino) {
      ::unlinkat(dir.get(), name.c_str(), 0);
    }
  }
};

struct FcListener {
  sys::UniqueFd fd;
  std::string path, snapshot, token_file;
  bool prefetch = true;
  bool once = false;    // a per-VM socket made by `restore`: closed after one handshake
  int notify_conn = -1;  // control connection told of complete / failed (-1: none)
  uint64_t notify_id = 0;
  bool cancel_on_close = false;  // closed, unhandshaken, when notify_conn closes
  uid_t uid = 0;                 // who asked for it (status shows it to that user)
  pid_t pid = 0;                 // the requesting process (0: the daemon's own)
  // Who asked for it, if a client: its VM's snapshot is opened as that user again at the
  // handshake (where the paths lead may have changed since the socket was asked for).
  std::optional<Requester> reader;
  SocketFile file;
};

// A Firecracker connection whose handshake message has not fully arrived yet.
struct FcHandshake {
  sys::UniqueFd fd, timer;
  sys::PeerCred cred;  // its pidfd kills the VM if its memory cannot be served
  std::chrono::steady_clock::time_point opened;
  std::string refusal;  // when not empty: refused with this once its message is whole
  std::string body;
  std::vector<sys::UniqueFd> fds;
  std::vector<fault::MappedRange> ranges;  // once the message parsed: what to poison if refused
  std::string snapshot, token_file;
  std::optional<Requester> reader;  // FcListener::reader
  bool prefetch = true;
  int notify_conn = -1;
  uint64_t notify_id = 0;
};

// Creates a listening Unix socket at `path`, mode 0600 (0660 with a group), owned by `owner`
// (when not -1). The parent directory is opened first and everything after goes through it, so
// a peer that owns the directory cannot redirect us with a symlink; `require_dir_owner` (when
// not -1) must own that directory. Only a stale socket is ever removed at the path.
Result<sys::UniqueFd> listen_unix(const std::string& path, gid_t group, SocketFile* file,
                                  uid_t owner = static_cast<uid_t>(-1), uid_t require_dir_owner = static_cast<uid_t>(-1)) {
  size_t slash = path.rfind('/');
  std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
  if (name.empty() || name == "." || name == "..") return Error(Errc::kInvalidArgument, "not a socket path: " + path);
  sys::UniqueFd dfd(::open(dir.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC));
  if (!dfd.valid()) return sys_error("open directory " + dir + " (does it exist?)", errno);
  struct stat st {};
  if (::fstat(dfd.get(), &st) != 0) return sys_error("stat " + dir, errno);
  if (require_dir_owner != static_cast<uid_t>(-1) && st.st_uid != require_dir_owner) {
    return Error(Errc::kPermission, fmt::format("{}: the directory must belong to the requesting user (uid {})", dir,
                                                require_dir_owner));
  }
  std::string via = fmt::format("/proc/self/fd/{}/{}", dfd.get(), name);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (via.size() >= sizeof addr.sun_path) return Error(Errc::kInvalidArgument, "socket name too long: " + path);
  std::memcpy(addr.sun_path, via.c_str(), via.size() + 1);
  if (::fstatat(dfd.get(), name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0) {
    if (!S_ISSOCK(st.st_mode)) return Error(Errc::kExists, path + " exists and is not a socket; not replacing it");
    // A socket somebody still listens on is not stale: replacing it would cut a running daemon
    // (or a VM's pending handshake) off from its clients, and its exit would then remove ours.
    // Without the kernel's socket diagnostics, a connection tells (the listener sees it close).
    auto live = sys::unix_listener_bound_to(st);
    if (!live.ok()) {
      sys::UniqueFd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
      if (!probe.valid()) return sys_error("socket", errno);
      live = ::connect(probe.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 || errno == EAGAIN;
    }
    if (*live) {
      return Error(Errc::kExists, path + " is in use: another process (a running lazymem-agent?) listens on it; stop "
                                         "that one or choose another path");
    }
    ::unlinkat(dfd.get(), name.c_str(), 0);  // a stale socket from a previous run
  }
  sys::UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd.valid()) return sys_error("socket", errno);
  // The mode is set at creation (umask), never by a chmod that a swapped-in symlink could redirect.
  bool grouped = group != static_cast<gid_t>(-1);
  mode_t old = ::umask(grouped ? 0117 : 0177);
  int r = ::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  ::umask(old);
  if (r != 0) return sys_error("bind " + path, errno);
  if (::fstatat(dfd.get(), name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) return sys_error("stat " + path, errno);
  const int dir_fd = dfd.get();
  *file = SocketFile{std::move(dfd), name, st.st_dev, st.st_ino};  // from here on, removed with the socket
  if ((grouped || owner != static_cast<uid_t>(-1)) &&
      ::fchownat(dir_fd, name.c_str(), owner, grouped ? group : static_cast<gid_t>(-1), AT_SYMLINK_NOFOLLOW) != 0) {
    const int e = errno;
    file->remove();
    return sys_error("chown " + path, e);
  }
  if (::listen(fd.get(), 128) != 0) {
    const int e = errno;
    file->remove();
    return sys_error("listen " + path, e);
  }
  return fd;
}

// Every range must lie inside the peer's own mappings: a client cannot point the agent at
// memory it does not have (the uffd would refuse anyway; this gives a clear reason).
// `pidfd` is the process's: alive once its maps are read, they were its (its pid not reused).
// And mapped with the page size it said: the kernel installs a huge page only whole, and a 4 KiB
// page not at all into huge-page memory (every install, then every poison, would fail).
Status check_ranges_mapped(pid_t pid, int pidfd, const std::vector<fault::MappedRange>& ranges, uint64_t page_size) {
  sys::Ranges bounds;
  for (const auto& r : ranges) bounds.emplace_back(r.start, r.start + r.length);
  LAZYMEM_ASSIGN_OR_RETURN(std::vector<sys::Vma> vmas, sys::read_vmas_sized(pid, bounds));
  pollfd exited{pidfd, POLLIN, 0};  // readable once it has exited
  if (::poll(&exited, 1, 0) != 0) return Error(Errc::kPeerGone, fmt::format("process {} has exited", pid));
  for (const auto& r : ranges) {
    const uint64_t end = r.start + r.length;  // does not wrap: check_range_table
    const sys::Coverage c = sys::coverage(vmas, r.start, end);
    if (c.covered_to < end) {
      return Error(Errc::kInvalidArgument, fmt::format("range {:#x}-{:#x} is not mapped in process {}", r.start, end, pid));
    }
    if (c.page_size != page_size) {
      return Error(Errc::kInvalidArgument,
                   fmt::format("range {:#x}-{:#x} of process {} is mapped with {} pages, not the {} KiB pages it said",
                               r.start, end, pid, c.page_size ? fmt::format("{} KiB", c.page_size >> 10) : "mixed",
                               page_size >> 10));
    }
  }
  return ok_status();
}

}  // namespace

struct Daemon::Impl {
  DaemonOptions opt;
  KernelFeatures kf;
  std::unique_ptr<fault::FaultEngine> engine;
  sys::UniqueFd listen_fd, epoll_fd, stop_fd;
  SocketFile listen_file;
  std::unique_ptr<net::MetricsEndpoint> metrics;  // --metrics
  std::map<int, std::unique_ptr<Conn>> conns;
  std::map<int, FcListener> fc_listeners;
  std::map<int, std::unique_ptr<FcHandshake>> handshakes;  // by connection fd
  std::map<int, int> handshake_timers;                     // timer fd -> connection fd
  std::map<fault::SessionId, Served> served;
  // One per snapshot location, shared by every client restoring it (one manifest in memory, one
  // page-server connection setup). Shared ownership: the engine's sessions hold it too.
  std::map<std::string, std::shared_ptr<snapshot::ChunkSource>> sources;
  // Requests waiting for their snapshot to open (open_then).
  struct Opening {
    std::string location;
    uint64_t version = 0;
    int conn_fd = -1;  // the request's connection (-1: none, or closed since)
    pid_t pid = 0;     // who asked, for status
    uid_t uid = 0;
    std::function<void(Result<std::shared_ptr<snapshot::ChunkSource>>, int conn_fd)> then;
    // Dropped when its connection closes (all but a VM's handshake), and with it what `then`
    // holds: a restore's uffd is let go of at once. The client has given up (it closes the
    // connection first), and its munmap of the regions waits until every holder of the uffd has
    // read the unmap event or closed it.
    bool needs_conn = true;
  };
  SourceOpener opener;
  std::map<uint64_t, Opening> opening;
  uint64_t opened_jobs = 0;
  // Sessions that ended (complete, or their process exited), newest last, so `stats` still
  // shows them: (owner uid, report entry).
  std::deque<std::pair<uid_t, nlohmann::json>> finished;
  std::unordered_map<fault::SessionId, uid_t> child_owner;  // forked children's sessions
  // Status long polls (Request.waitChange), answered when `generation` passes `after`.
  struct Waiter {
    int conn_fd;
    uint64_t id;
    uid_t uid;
    uint64_t after;
  };
  std::vector<Waiter> waiters;
  uint64_t generation = 0;
  bool any_broken = false;  // some connection awaits close_broken()
  std::vector<int> resume;  // connections with requests buffered to handle (resume_buffered)
  sys::Acceptor acceptor;
  std::chrono::steady_clock::time_point next_shed_log;
  static constexpr size_t kFinishedKept = 64;
  std::shared_ptr<spdlog::logger> log = log::get("agent");

  void add(int fd, uint64_t t, uint32_t events = EPOLLIN) {
    epoll_event ev{};
    ev.events = events;
    ev.data.u64 = t;
    ::epoll_ctl(epoll_fd.get(), EPOLL_CTL_ADD, fd, &ev);
  }
  void del(int fd) { ::epoll_ctl(epoll_fd.get(), EPOLL_CTL_DEL, fd, nullptr); }

  // Queues a reply to control connection `fd` (gone: dropped) and sends what its socket takes.
  void reply_on(int fd, uint64_t id, const std::function<void(pa::Reply::Builder)>& fill) {
    auto it = conns.find(fd);
    if (it == conns.end() || it->second->broken) return;
    Conn& c = *it->second;
    capnp::MallocMessageBuilder b;
    auto r = b.initRoot<pa::Reply>();
    r.setId(id);
    fill(r);
    std::vector<std::byte> frame = net::encode_frame(b, 0);
    if (c.out.size() - c.out_sent + frame.size() > kMaxQueuedReplyBytes) {
      log->warn("pid {}: does not read its replies ({} bytes waiting); closing its connection", c.pid,
                c.out.size() - c.out_sent);
      return break_conn(c);
    }
    c.out.insert(c.out.end(), frame.begin(), frame.end());
    flush(c);
  }
  void reply(Conn& c, uint64_t id, const std::function<void(pa::Reply::Builder)>& fill) { reply_on(c.fd.get(), id, fill); }

  // Sends queued replies as far as the socket takes them without waiting. While some wait, the
  // connection is watched for room only (its requests stay unread); once all are sent, for
  // requests again.
  void flush(Conn& c) {
    while (c.out_sent < c.out.size()) {
      ssize_t n = ::send(c.fd.get(), c.out.data() + c.out_sent, c.out.size() - c.out_sent, MSG_DONTWAIT | MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno == EAGAIN) return watch_conn(c, EPOLLOUT);
      if (n < 0) return break_conn(c);  // the peer is gone: its close is handled after this event
      c.out_sent += static_cast<size_t>(n);
    }
    c.out.clear();
    c.out_sent = 0;
    watch_conn(c, EPOLLIN);
    // Requests read before the replies backed up wait in its buffer: no event would come for
    // them (the socket holds nothing new), so they are handled after the current event.
    if (c.buf.buffered() > 0) resume.push_back(c.fd.get());
  }
  void watch_conn(Conn& c, uint32_t events) {
    if (c.events == events) return;
    c.events = events;
    epoll_event ev{};
    ev.events = events;
    ev.data.u64 = tag(kConn, c.fd.get());
    ::epoll_ctl(epoll_fd.get(), EPOLL_CTL_MOD, c.fd.get(), &ev);
  }
  // Closed by close_broken(), after the event being handled: callers up the stack may still
  // hold the connection or be iterating what closing it changes.
  void break_conn(Conn& c) {
    c.broken = true;
    c.out.clear();
    c.out_sent = 0;
    any_broken = true;
  }
  void resume_buffered() {
    while (!resume.empty()) {
      std::vector<int> fds;
      fds.swap(resume);
      for (int fd : fds) on_conn(fd, 0);
    }
  }
  void close_broken() {
    while (any_broken) {  // closing one can break another (its status long poll is answered)
      any_broken = false;
      std::vector<int> gone;
      for (const auto& [fd, c] : conns)
        if (c->broken) gone.push_back(fd);
      for (int fd : gone) close_conn(fd);
    }
  }

  // The source an open found, kept, or swapped for the same one open already (with what it has
  // cached). Sources are shared between requests with the same token only (one opened with the
  // daemon's token is never lent to a request without it), and of the version the client read
  // (`version`, its manifest checksum). Without one (a VM's request, older clients) the store's
  // version now: the open read its manifest again, so a replaced snapshot is never served from
  // the old one.
  Result<std::shared_ptr<snapshot::ChunkSource>> adopt(const std::string& location, Opened opened, uint64_t version) {
    std::shared_ptr<snapshot::ChunkSource> src = std::move(opened.source);
    const std::string key = location + '\n' + opened.token;
    auto it = sources.find(key);
    if (it != sources.end() && it->second->manifest().checksum == src->manifest().checksum) {
      src = it->second;
    } else if (opened.fresh) {  // one taken from open_now may be older than the one cached since
      sources[key] = src;       // the store's version now: what the next client will have read
    }
    if (version != 0 && src->manifest().checksum != version) {
      return Error(Errc::kNotFound, fmt::format("{}: the agent finds another version of the snapshot than the client read "
                                                "(manifest {:016x}, the client's {:016x}): it was replaced in between; "
                                                "restore again",
                                                location, src->manifest().checksum, version));
    }
    return src;
  }

  // The open sources of `location` in `version` (none for 0: the store's now must be read), by
  // token: an open takes one of these rather than open again.
  std::vector<std::pair<std::string, std::shared_ptr<snapshot::ChunkSource>>> open_now(const std::string& location,
                                                                                       uint64_t version) {
    std::vector<std::pair<std::string, std::shared_ptr<snapshot::ChunkSource>>> out;
    if (version == 0) return out;
    const std::string prefix = location + '\n';
    for (auto it = sources.lower_bound(prefix); it != sources.end() && it->first.starts_with(prefix); ++it) {
      if (it->second->manifest().checksum == version) out.emplace_back(it->first.substr(prefix.size()), it->second);
    }
    return out;
  }

  // Opens `spec` off the loop (SourceOpener); `then` goes on with the source (or why not), on
  // the loop, given the request's connection as it is by then. A client's request (a restore, a
  // VM socket asked for) is dropped when its connection closes; `for_vm`, a VM's handshake, is
  // opened at once, whatever else is, and goes on with -1 if the connection to tell has closed.
  using Then = std::function<void(Result<std::shared_ptr<snapshot::ChunkSource>>, int conn_fd)>;
  Status open_then(OpenSpec spec, uint64_t version, int conn_fd, pid_t pid, uid_t uid, Then then, bool for_vm) {
    spec.open_now = open_now(spec.key(), version);
    const uint64_t job = ++opened_jobs;
    Opening o{spec.key(), version, conn_fd, pid, uid, std::move(then), !for_vm};
    LAZYMEM_TRY(opener.submit(job, uid, std::move(spec), for_vm));
    opening.emplace(job, std::move(o));
    changed();  // status shows it opening
    return ok_status();
  }

  void on_opened() {
    for (auto& [job, r] : opener.take()) {
      auto it = opening.find(job);
      if (it == opening.end()) continue;
      Opening o = std::move(it->second);
      opening.erase(it);
      if (r.ok()) {
        o.then(adopt(o.location, std::move(*r), o.version), o.conn_fd);
      } else {
        o.then(std::move(r).error(), o.conn_fd);
      }
      changed();
    }
  }

  // What a session is made of: a process's Restore request, or Firecracker's handshake.
  struct ServeRequest {
    std::string name;  // the engine session's
    sys::UniqueFd uffd;
    uint64_t features = 0;  // negotiated on the uffd
    std::string location, token_file;
    uint64_t version = 0;  // the manifest checksum the client read (0: not checked)
    std::vector<fault::MappedRange> ranges;
    uint64_t page_size = 4096;  // of the memory `ranges` are in
    pid_t pid = 0;
    sys::UniqueFd pidfd;  // of `pid`, taken when it connected
    uid_t uid = 0;
    bool prefetch = true;
    bool hold_failures = false;  // the client says why before its failed pages are poisoned
    int conn_fd = -1;            // told of complete / failed
    uint64_t reply_id = 0;
  };

  Result<fault::SessionId> serve(ServeRequest rq, std::shared_ptr<snapshot::ChunkSource> src) {
    if (!rq.pidfd.valid()) return Error(Errc::kInvalidArgument, fmt::format("no pidfd of process {}", rq.pid));
    LAZYMEM_TRY(check_ranges_mapped(rq.pid, rq.pidfd.get(), rq.ranges, rq.page_size));
    sys::UniqueFd pidfd = std::move(rq.pidfd);
    fault::SessionSpec spec;
    spec.name = rq.name;
    spec.uffd = sys::Uffd::adopt(std::move(rq.uffd), rq.features);
    spec.source = src;
    spec.ranges = std::move(rq.ranges);
    spec.page_size = rq.page_size;
    spec.pid = rq.pid;
    spec.prefetch = rq.prefetch;
    spec.hold_failures = rq.hold_failures;
    LAZYMEM_ASSIGN_OR_RETURN(fault::SessionId id, engine->add_session(std::move(spec)));
    add(pidfd.get(), tag(kPidfd, pidfd.get()));
    Served& sv = served[id];
    sv.session = id;
    sv.pid = rq.pid;
    sv.uid = rq.uid;
    sv.conn_fd = rq.conn_fd;
    sv.pidfd = std::move(pidfd);
    sv.reply_id = rq.reply_id;
    sv.name = rq.name;
    sv.hold_failures = rq.hold_failures;
    log->info("serving pid {} ({}) from {}", rq.pid, rq.name, rq.location);
    changed();
    return id;
  }

  // A process's Restore request (its uffd came with it), answered once its snapshot is open.
  Status start_restore(Conn& c, uint64_t id, RestoreRequest r, sys::UniqueFd uffd) {
    auto rq = std::make_shared<ServeRequest>();
    rq->name = fmt::format("pid {}", c.pid);
    rq->uffd = std::move(uffd);
    rq->features = r.uffd_features;
    rq->location = std::move(r.snapshot);
    rq->token_file = std::move(r.token_file);
    rq->version = r.manifest_checksum;
    rq->ranges = std::move(r.ranges);
    rq->pid = c.pid;
    rq->pidfd.reset(::fcntl(c.pidfd.get(), F_DUPFD_CLOEXEC, 0));
    if (!rq->pidfd.valid()) return sys_error("dup of a pidfd", errno);
    rq->uid = c.uid;
    rq->prefetch = r.prefetch;
    rq->hold_failures = r.announces_failures;
    rq->reply_id = id;
    OpenSpec spec{rq->location, rq->token_file, Requester{c.pid, c.uid, c.gid, c.groups}, {}, std::move(r.base)};
    return open_then(std::move(spec), rq->version, c.fd.get(), c.pid, c.uid, [this, rq](auto src, int conn_fd) {
      rq->conn_fd = conn_fd;  // open still: a closing one drops this (close_conn)
      const pid_t pid = rq->pid;
      const uint64_t id = rq->reply_id;
      auto sid = src.ok() ? serve(std::move(*rq), std::move(*src)) : Result<fault::SessionId>(std::move(src).error());
      if (!sid.ok()) return refuse(conn_fd, pid, id, "restore", sid.error());
      reply_on(conn_fd, id, [&](auto b) { b.setAccepted(*sid); });
    }, false);
  }

  void refuse(int conn_fd, pid_t pid, uint64_t id, const char* what, const Error& why) {
    log->warn("pid {}: {} refused: {}", pid, what, why.message());
    const std::string msg = why.message();
    reply_on(conn_fd, id, [&](auto b) { b.setError(msg); });
  }

  // Gives the client opt.failure_notice to answer the failed notice. False if no timer could be made.
  bool arm_notice_timer(Served& sv) {
    sv.notice_timer.reset(::timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK));
    if (!sv.notice_timer.valid()) return false;
    const int64_t ms = opt.failure_notice.count();
    itimerspec its{};
    its.it_value.tv_sec = ms / 1000;
    its.it_value.tv_nsec = (ms % 1000) * 1'000'000L;
    ::timerfd_settime(sv.notice_timer.get(), 0, &its, nullptr);
    add(sv.notice_timer.get(), tag(kNoticeTimer, sv.notice_timer.get()));
    return true;
  }

  // Whether timer `tfd` has expired. One epoll batch can hold an event of a timer closed earlier
  // in the same batch whose number a new timer (another session's) got since: that one has not
  // fired, and acting on it would, e.g., poison a session before its process said why.
  static bool fired(int tfd) {
    uint64_t expirations = 0;
    return ::read(tfd, &expirations, sizeof expirations) == static_cast<ssize_t>(sizeof expirations) && expirations > 0;
  }

  void on_notice_timer(int tfd) {
    if (!fired(tfd)) return;
    for (auto& [id, sv] : served) {
      if (sv.notice_timer.get() != tfd) continue;
      log->warn("pid {}: did not answer its failure notice within {} ms; poisoning its failed pages", sv.pid,
                opt.failure_notice.count());
      release_failures(sv);
      return;
    }
  }

  // The failed pages of a session holding them are poisoned now: its client has said why (or
  // had its time to, or has gone).
  void release_failures(Served& sv) {
    if (!sv.hold_failures) return;
    sv.hold_failures = false;
    engine->release_failures(sv.session);
    if (sv.notice_timer.valid()) {
      del(sv.notice_timer.get());
      sv.notice_timer = sys::UniqueFd();
    }
  }

  void on_request(Conn& c, net::Header& h) {
    ControlRequest rq = decode_control_request(h);
    const uint64_t id = rq.id;
    // Descriptors only ever come with a restore: the first is its uffd, anything else sent
    // along is dropped, as are any that came with another request (or a refused one).
    std::deque<sys::UniqueFd> fds = std::move(c.fds);
    c.fds.clear();
    if (!rq.body.ok()) {
      log->warn("pid {}: request refused: {}", c.pid, rq.body.error().message());
      const std::string msg = rq.body.error().message();
      reply(c, id, [&](auto b) { b.setError(msg); });
      return;
    }
    std::visit(
        [&](auto&& body) {
          using T = std::decay_t<decltype(body)>;
          if constexpr (std::is_same_v<T, RestoreRequest>) {
            if (fds.empty()) {
              reply(c, id, [](auto b) { b.setError("restore needs the process's userfaultfd sent with it (SCM_RIGHTS)"); });
              return;
            }
            // Anything else would reach the engine as a uffd: a pipe full of fake events was
            // adopted once, and its fake fork event handed the peer another session's uffd.
            if (Status is_uffd = sys::check_userfaultfd(fds.front().get()); !is_uffd.ok()) {
              return refuse(c.fd.get(), c.pid, id, "restore", is_uffd.error());
            }
            Status st = start_restore(c, id, std::move(body), std::move(fds.front()));
            if (!st.ok()) refuse(c.fd.get(), c.pid, id, "restore", st.error());
          } else if constexpr (std::is_same_v<T, ServeFirecrackerRequest>) {
            Status st = start_fc_listener(c, id, std::move(body));
            if (!st.ok()) refuse(c.fd.get(), c.pid, id, "serve-firecracker", st.error());
          } else if constexpr (std::is_same_v<T, FailureSeenRequest>) {  // no reply: the client goes on waiting for complete
            auto it = served.find(body.session);
            if (it != served.end() && it->second.conn_fd == c.fd.get()) release_failures(it->second);
          } else if constexpr (std::is_same_v<T, FetchRestRequest>) {  // no reply: complete follows
            auto it = served.find(body.session);
            if (it != served.end() && it->second.conn_fd == c.fd.get()) engine->set_prefetch(it->second.session, true);
          } else if constexpr (std::is_same_v<T, StatusRequest>) {
            std::string js = report(c.uid, body.with_stats).dump();
            reply(c, id, [&](auto b) { b.setJson(js); });
          } else if constexpr (std::is_same_v<T, WaitChangeRequest>) {
            const auto mine = std::count_if(waiters.begin(), waiters.end(), [&](const Waiter& w) { return w.uid == c.uid; });
            if (static_cast<size_t>(mine) >= kMaxWaitersPerUser || (c.uid != 0 && waiters.size() >= kMaxWaiters)) {
              reply(c, id, [](auto b) { b.setError("too many waiting status requests; try again"); });
              return;
            }
            waiters.push_back(Waiter{c.fd.get(), id, c.uid, body.after_generation});
            answer_waiters();
          } else {
            static_assert(std::is_same_v<T, UnknownRequest>);
            reply(c, id, [](auto b) { b.setError("unknown request (a newer client than this agent?)"); });
          }
        },
        *rq.body);
  }

  // The snapshot a handshake socket is to serve is opened when the socket is asked for: a wrong
  // location is told to whoever asked (the operator), not found by the VM later.
  static Status check_raw_image(const std::string& snap, const snapshot::ChunkSource& src) {
    for (const auto& reg : src.manifest().regions) {
      if (reg.kind != RegionKind::kRawFile) {
        return Error(Errc::kInvalidArgument, fmt::format("{}: region '{}' is not a raw memory image (make the snapshot "
                                                         "with `lazymem-agent snapshot --raw` or `lazymem-pageserver import --raw`)",
                                                         snap, reg.name));
      }
    }
    return ok_status();
  }
  // The same, blocking: for the daemon's own --snapshot, at start.
  Status check_vm_snapshot(const std::string& snap, const std::string& token) {
    LAZYMEM_ASSIGN_OR_RETURN(Opened o, open_source(OpenSpec{snap, token, std::nullopt, {}, {}}));
    LAZYMEM_ASSIGN_OR_RETURN(auto src, adopt(snap, std::move(o), 0));
    return check_raw_image(snap, *src);
  }

  // `lazymem-agent restore --firecracker-socket PATH --snapshot URI`: a per-VM handshake socket,
  // made once the snapshot is open.
  Status start_fc_listener(Conn& c, uint64_t id, ServeFirecrackerRequest r) {
    FcListener l;
    l.path = std::move(r.socket_path);
    l.snapshot = std::move(r.snapshot);
    l.token_file = std::move(r.token_file);
    l.prefetch = r.prefetch;
    l.once = true;
    l.notify_id = id;
    l.cancel_on_close = r.cancel_on_close;
    l.uid = c.uid;
    l.pid = c.pid;
    l.reader = Requester{c.pid, c.uid, c.gid, c.groups};
    OpenSpec spec{l.snapshot, l.token_file, l.reader, {}, {}};
    auto pending = std::make_shared<FcListener>(std::move(l));
    return open_then(std::move(spec), 0, c.fd.get(), c.pid, c.uid, [this, pending](auto src, int conn_fd) {
      const pid_t pid = pending->pid;
      const uint64_t id = pending->notify_id;
      pending->notify_conn = conn_fd;
      Status st = src.ok() ? open_fc_listener(std::move(*pending), **src) : Status(std::move(src).error());
      if (!st.ok()) return refuse(conn_fd, pid, id, "serve-firecracker", st.error());
      reply_on(conn_fd, id, [](auto b) { b.setAccepted(0); });
    }, false);
  }

  Status open_fc_listener(FcListener l, const snapshot::ChunkSource& src) {
    LAZYMEM_TRY(check_raw_image(l.snapshot, src));
    // A user other than root gets the socket only in a directory of its own, owned by it.
    uid_t owner = l.uid == ::geteuid() ? static_cast<uid_t>(-1) : l.uid;
    uid_t dir_owner = l.uid == 0 ? static_cast<uid_t>(-1) : l.uid;
    LAZYMEM_ASSIGN_OR_RETURN(l.fd, listen_unix(l.path, static_cast<gid_t>(-1), &l.file, owner, dir_owner));
    int f = l.fd.get();
    add(f, tag(kFcListen, f));
    log->info("pid {}: accepting a Firecracker handshake on {} for {}", l.pid, l.path, l.snapshot);
    fc_listeners[f] = std::move(l);
    changed();  // status shows it waiting
    return ok_status();
  }

  // A handshake socket is done with (its one handshake came, or whoever waited on it left).
  void close_fc_listener(std::map<int, FcListener>::iterator it) {
    del(it->first);
    it->second.file.remove();
    fc_listeners.erase(it);
    changed();
  }

  static nlohmann::json entry(const fault::SessionInfo& info, const char* state) {
    return {{"id", info.id},
            {"name", info.name},
            {"pid", info.pid},
            {"source", info.stats.source},
            {"chunks_present", info.chunks_present},
            {"chunks_total", info.chunks_total},
            {"page_size", info.page_size},
            {"complete", info.complete},
            {"failed", info.failed},
            {"failure", info.failure},
            {"state", state},
            {"stats", nlohmann::json::parse(format_stats_json(info.stats))}};
  }

  // A session that ends: "exited" (its process went), or "complete" (every page in), which a
  // session that failed is not: every page is in or poisoned then, and it is kept as "failed".
  void remember(fault::SessionId id, uid_t uid, const char* ended) {
    auto info = engine->session_info(id);
    if (!info) return;
    finished.emplace_back(uid, entry(*info, info->failed && std::strcmp(ended, "complete") == 0 ? "failed" : ended));
    if (finished.size() > kFinishedKept) finished.pop_front();
  }

  // A forked child's session was made by the engine ("<parent>/fork"); it is the parent's
  // owner's, remembered while the parent is known. One we cannot attribute is root's.
  uid_t owner_of(const fault::SessionInfo& info) {
    if (auto it = served.find(info.id); it != served.end()) return it->second.uid;
    if (auto it = child_owner.find(info.id); it != child_owner.end()) return it->second;
    for (const auto& [sid, sv] : served) {
      if (info.name.rfind(sv.name + "/fork", 0) == 0) {
        child_owner[info.id] = sv.uid;
        return sv.uid;
      }
    }
    return 0;
  }

  // Something a status shows has changed: answer the long polls waiting for it.
  void changed() {
    ++generation;
    answer_waiters();
  }
  void answer_waiters() {
    std::unordered_map<uid_t, std::string> by_uid;  // one report per user, however many wait
    std::erase_if(waiters, [&](const Waiter& w) {
      if (generation <= w.after) return false;
      auto [it, fresh] = by_uid.try_emplace(w.uid);
      if (fresh) it->second = report(w.uid, false).dump();
      const std::string& json = it->second;  // a named reference: clang cannot capture a binding
      reply_on(w.conn_fd, w.id, [&](auto b) { b.setJson(json); });
      return true;
    });
  }

  // Sessions a peer may see: its own user's, or all for root.
  nlohmann::json report(uid_t uid, bool with_stats) {
    nlohmann::json j;
    j["sessions"] = nlohmann::json::array();
    for (const auto& [owner, e] : finished) {
      if (uid != 0 && owner != uid) continue;
      j["sessions"].push_back(e);
    }
    for (const auto& info : engine->sessions()) {
      uid_t owner = owner_of(info);
      if (uid != 0 && owner != uid) continue;
      j["sessions"].push_back(entry(info, info.failed ? "failed" : "restoring"));
    }
    if (!with_stats)
      for (auto& e : j["sessions"]) e.erase("stats");
    j["handshakes"] = nlohmann::json::array();  // sockets waiting for Firecracker to connect
    for (const auto& [lfd, l] : fc_listeners) {
      if (uid != 0 && l.uid != uid) continue;
      j["handshakes"].push_back({{"socket", l.path}, {"snapshot", l.snapshot}, {"pid", l.pid}});
    }
    j["opening"] = nlohmann::json::array();  // requests whose snapshot is being opened
    for (const auto& [job, o] : opening) {
      if (uid != 0 && o.uid != uid) continue;
      j["opening"].push_back({{"snapshot", o.location}, {"pid", o.pid}});
    }
    j["pid"] = ::getpid();
    j["generation"] = generation;
    return j;
  }

  void on_engine_change() {
    uint64_t v;
    (void)!::read(engine->changes_fd(), &v, sizeof v);
    std::vector<fault::SessionId> done;
    for (auto& [id, s] : served) {
      auto info = engine->session_info(id);
      if (!info) continue;
      int to = s.conn_fd >= 0 && conns.count(s.conn_fd) ? s.conn_fd : -1;
      if (info->failed && !s.reported) {
        s.reported = true;
        if (to >= 0) reply_on(to, s.reply_id, [&](auto b) { b.setFailed(info->failure); });
        if (s.hold_failures && (to < 0 || !arm_notice_timer(s))) release_failures(s);  // nobody to wait for
      }
      if (info->complete) {
        // Every page is present: the process no longer needs us. Tell it, and let go of our
        // copy of its uffd (it closes its own on the message).
        if (to >= 0) reply_on(to, s.reply_id, [&, sid = id](auto b) { b.setComplete(sid); });
        if (info->failed) {
          log->warn("pid {}: restore ended failed; the pages that could not be had were poisoned ({})", s.pid, info->failure);
        } else {
          log->info("pid {}: restore complete", s.pid);
        }
        done.push_back(id);
      }
    }
    for (auto id : done) {
      auto it = served.find(id);
      remember(id, it->second.uid, "complete");
      del(it->second.pidfd.get());
      engine->remove_session(id);
      served.erase(it);
    }
    // Forked children's sessions: the engine made them and tells us when their process has
    // gone (they have no pidfd) or every page is there; either way their uffd is let go now.
    for (const auto& info : engine->sessions()) {
      if (served.count(info.id)) continue;
      uid_t owner = owner_of(info);  // asked now, while the parent is still known
      if (!info.exited && !info.complete) continue;
      log->info("{}: {}", info.name, info.exited   ? "its process exited; dropping the session"
                                     : info.failed ? "restore ended failed; the pages that could not be had were poisoned"
                                                   : "restore complete");
      remember(info.id, owner, info.exited ? "exited" : "complete");
      engine->remove_session(info.id);
      child_owner.erase(info.id);
    }
    changed();
  }

  void on_pid_exit(int pidfd) {
    pollfd exited{pidfd, POLLIN, 0};  // a pidfd is readable once its process has exited
    if (::poll(&exited, 1, 0) != 1) return;  // an event of a descriptor closed in this batch and reused
    for (auto it = served.begin(); it != served.end(); ++it) {
      if (it->second.pidfd.get() != pidfd) continue;
      log->info("pid {} exited; dropping its session", it->second.pid);
      remember(it->first, it->second.uid, "exited");
      // The CLI serving a Firecracker VM waits on it: it learns it is over. (A process restoring
      // through its own connection is the one that exited: nobody to tell.)
      if (int to = it->second.conn_fd; it->second.peer_sock.valid() && to >= 0 && conns.count(to)) {
        reply_on(to, it->second.reply_id, [&](auto b) { b.setExited(it->first); });
      }
      del(pidfd);
      engine->remove_session(it->first);
      served.erase(it);
      changed();
      return;
    }
  }

  void on_conn(int fd, uint32_t events) {
    auto it = conns.find(fd);
    if (it == conns.end()) return;
    Conn& c = *it->second;
    if (events & (EPOLLOUT | EPOLLHUP | EPOLLERR)) flush(c);
    // Hung up with replies still waiting: nobody will read them (and the hangup, reported
    // whatever the mask, would wake the loop for good).
    if ((events & (EPOLLHUP | EPOLLERR)) && c.events != EPOLLIN) break_conn(c);
    // Requests are read only while no reply waits (see Conn); ones already buffered are
    // handled once the replies before them have gone. They are handled before reading more, so
    // that what is read next starts a frame or continues the one partial frame buffered: how
    // receive() tells where descriptors came.
    Status s = ok_status();
    for (bool read = false; c.events == EPOLLIN && !c.broken;) {
      auto f = c.buf.next();
      if (!f.ok()) {
        log->warn("pid {}: {}; closing its connection", c.pid, f.error().message());
        s = f.error();
        break;
      }
      if (!f->has_value()) {
        if (read) break;
        read = true;
        s = receive(c);
        if (!s.ok()) break;
        continue;
      }
      auto h = net::Header::parse((*f)->header);
      if (!h.ok()) {
        log->warn("pid {}: {}; closing its connection", c.pid, h.error().message());
        s = h.error();
        break;
      }
      on_request(c, **h);
      c.buf.consume();
    }
    // Descriptors that came without a restore request are not kept (a peer could pile them up).
    if (c.buf.buffered() == 0) c.fds.clear();
    if (!s.ok() || c.broken) close_conn(fd);
  }

  // Reads what the peer sent, keeping the descriptors only as a request may carry them: one, with
  // the first bytes of its frame. A peer that sends more (or sends them inside a frame, where no
  // request would take them) has its connection closed, said once, as it closes: kept, they
  // piled up (a frame's 8-byte prefix announcing a 64 KiB header, then 5100 one-byte sends of
  // four descriptors each, took the agent to its descriptor limit).
  Status receive(Conn& c) {
    const bool mid_frame = c.buf.buffered() > 0;  // every whole frame was handled: a partial one
    const size_t held = c.fds.size();
    Status s = recv_some(c.fd.get(), c.buf, c.fds, 0);
    if (!s.ok() && s.error().code() != Errc::kProtocol) return s;  // gone: nothing to say
    if (s.ok() && c.fds.size() == held) return s;
    if (s.ok() && !mid_frame && c.fds.size() <= kMaxFdsPerRequest) return s;
    const std::string why = !s.ok() ? s.error().message()
                            : mid_frame
                                ? fmt::format("{} descriptor(s) sent inside a request", c.fds.size() - held)
                                : fmt::format("{} descriptors sent with one request", c.fds.size());
    log->warn("pid {}: {} (a restore carries one uffd, with its request's first bytes); closing its connection", c.pid,
              why);
    return Error(Errc::kProtocol, why);
  }

  void close_conn(int fd) {
    auto it = conns.find(fd);
    if (it == conns.end()) return;
    Conn& c = *it->second;
    // The client's sessions go on (its process may still run); only the notifications stop.
    for (auto& [id, sv] : served) {
      if (sv.conn_fd != fd) continue;
      sv.conn_fd = -1;
      release_failures(sv);  // nobody left to say why first
    }
    std::erase_if(waiters, [&](const Waiter& w) { return w.conn_fd == fd; });
    // A per-VM socket still waiting for Firecracker, asked for by a `restore` that was
    // interrupted: nobody would follow that VM's restore, and the path would stay taken.
    for (auto lit = fc_listeners.begin(); lit != fc_listeners.end();) {
      auto at = lit++;
      if (at->second.notify_conn != fd) continue;
      if (!at->second.cancel_on_close) {
        at->second.notify_conn = -1;
        continue;
      }
      log->info("pid {}: went away before Firecracker connected; closing {}", c.pid, at->second.path);
      close_fc_listener(at);
    }
    for (auto& [hfd, hs] : handshakes)
      if (hs->notify_conn == fd) hs->notify_conn = -1;
    for (auto oit = opening.begin(); oit != opening.end();) {
      auto at = oit++;
      if (at->second.conn_fd != fd) continue;
      if (!at->second.needs_conn) {
        at->second.conn_fd = -1;
        continue;
      }
      log->info("pid {}: closed its connection while {} was opening; dropped", c.pid, at->second.location);
      opener.cancel(at->first);
      opening.erase(at);  // a restore's uffd with it (Opening::needs_conn)
    }
    del(fd);
    conns.erase(it);
  }

  // The next connection on `lfd`, or invalid when none waits. Out of descriptors, waiting peers
  // are closed (they learn at once, rather than wait on an unanswered connection), said once a
  // second at most.
  sys::UniqueFd next_conn(int lfd) {
    for (;;) {
      auto next = acceptor.accept(lfd);
      if (!next.shed) return std::move(next.fd);
      const auto now = std::chrono::steady_clock::now();
      if (now >= next_shed_log) {
        next_shed_log = now + std::chrono::seconds(1);
        log->warn("out of file descriptors: connections closed unanswered; raise the open-file limit (ulimit -n)");
      }
    }
  }

  void accept_conn() {
    for (;;) {
      sys::UniqueFd cfd = next_conn(listen_fd.get());
      if (!cfd.valid()) return;
      const int fd = cfd.get();
      auto c = std::make_unique<Conn>();
      c->fd = std::move(cfd);
      // Who it is, once and now: a peer gone already is not served (its pid may be another's).
      auto cred = sys::peer_cred(fd);
      if (!cred.ok()) {
        log->debug("connection refused: {}", cred.error().message());
        continue;
      }
      c->pid = cred->pid;
      c->uid = cred->uid;
      c->gid = cred->gid;
      c->groups = std::move(cred->groups);
      c->pidfd = std::move(cred->pidfd);
      add(fd, tag(kConn, fd));
      conns[fd] = std::move(c);
    }
  }

  // Firecracker: one message holding a JSON array of GuestRegionUffdMapping and the uffd. The
  // connection joins the event loop; a peer that stays silent or sends half a message holds an
  // fd until its deadline, never the loop.
  void accept_firecracker(int lfd) {
    auto lit = fc_listeners.find(lfd);
    if (lit == fc_listeners.end()) return;
    for (;;) {
      sys::UniqueFd cfd = next_conn(lfd);
      if (!cfd.valid()) return;
      const int fd = cfd.get();
      auto hs = std::make_unique<FcHandshake>();
      hs->fd = std::move(cfd);
      hs->opened = std::chrono::steady_clock::now();
      auto cred = sys::peer_cred(fd);
      if (!cred.ok() && cred.error().code() == Errc::kPeerGone) {
        log->warn("firecracker handshake: {}; refused", cred.error().message());
        continue;
      }
      // A live peer we cannot identify is still read to the end: its uffd, once here, is
      // failed with the VM's memory; closed unread, it would leave the vCPUs waiting.
      if (cred.ok()) {
        hs->cred = std::move(*cred);
      } else {
        hs->refusal = cred.error().message();
        ucred who{};
        socklen_t len = sizeof who;
        if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &who, &len) == 0) hs->cred.pid = who.pid;  // for messages
      }
      if (handshakes.size() >= kMaxPendingHandshakes) make_room();
      hs->timer.reset(::timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK));
      itimerspec its{};
      its.it_value.tv_sec = kHandshakeSeconds;
      ::timerfd_settime(hs->timer.get(), 0, &its, nullptr);
      FcListener& l = lit->second;
      hs->snapshot = l.snapshot;
      hs->token_file = l.token_file;
      hs->reader = l.reader;
      hs->prefetch = l.prefetch;
      hs->notify_conn = l.notify_conn;
      hs->notify_id = l.notify_id;
      add(fd, tag(kFcConn, fd));
      add(hs->timer.get(), tag(kFcTimer, hs->timer.get()));
      handshake_timers[hs->timer.get()] = fd;
      handshakes[fd] = std::move(hs);
      if (l.once) {  // a per-VM socket: its one handshake has come
        close_fc_listener(lit);
        return;
      }
    }
  }

  // The handshake table is full; refusing the newcomer would hang a VM for the sake of peers
  // that may never send. Firecracker sends its message as it connects, and a burst of
  // connections is accepted before any of them is read: what is queued on each pending one is
  // read first, and whole messages are served, freeing their places. If none is, the oldest
  // pending peer, the likeliest never to send, is refused (and its VM failed, if it sent a uffd).
  void make_room() {
    std::vector<int> pending;
    for (const auto& [fd, hs] : handshakes) pending.push_back(fd);
    for (int fd : pending) on_handshake_data(fd);  // ends handshakes: by fd, not by iterator
    if (handshakes.size() < kMaxPendingHandshakes) return;
    auto oldest = std::min_element(handshakes.begin(), handshakes.end(),
                                   [](const auto& a, const auto& b) { return a.second->opened < b.second->opened; });
    refuse_handshake(*oldest->second, "refused to make room: too many handshakes pending");
  }

  void end_handshake(int fd) {
    auto it = handshakes.find(fd);
    if (it == handshakes.end()) return;
    del(fd);
    del(it->second->timer.get());
    handshake_timers.erase(it->second->timer.get());
    handshakes.erase(it);
  }

  // A VM whose memory cannot be served: every access fails visibly (SIGBUS from its guest
  // memory), or, without UFFDIO_POISON or guest ranges to poison (its message never parsed),
  // the VM is killed with the reason logged, through the pidfd taken when it connected: its pid
  // may be another process's by now. Poisoning fills the guest's page tables with markers,
  // ~25 ms per GiB here: it runs on a thread of its own, not on the loop that answers every
  // other client.
  void fail_vm(int pidfd, pid_t pid, sys::UniqueFd uffd_fd, const std::vector<fault::MappedRange>& guest,
               const std::string& why) {
    if (kf.has_uffd_poison() && uffd_fd.valid() && !guest.empty()) {
      log->error("firecracker pid {}: its memory cannot be served ({}); its accesses fail", pid, why);
      // Where a range cannot be poisoned whole (ranges off the memory's huge page boundaries, a
      // page present already, a mapping change under way), the VM is killed instead: it was
      // refused, and must not wait on that memory for good.
      auto vm = std::make_shared<sys::UniqueFd>(pidfd >= 0 ? ::fcntl(pidfd, F_DUPFD_CLOEXEC, 0) : -1);
      auto poison = [guest, vm, pid, log = log](sys::UniqueFd fd) {
        sys::Uffd uffd = sys::Uffd::adopt(std::move(fd), 0);
        for (const auto& r : guest) {
          const sys::InstallResult res = uffd.poison(r.start, r.length);
          if (res.outcome == sys::InstallOutcome::kDone || res.outcome == sys::InstallOutcome::kExited) continue;
          const std::string what = fmt::format("firecracker pid {}: poisoning {:#x}+{:#x} failed ({})", pid,
                                               r.start + res.bytes, r.length - res.bytes, std::strerror(res.err));
          if (!vm->valid()) {
            log->error("{}, and it cannot be killed (no pidfd of it): it may wait on its memory for good; kill it", what);
            return;
          }
          log->error("{}; killing it rather than leave it hanging", what);
          if (Status st = sys::pidfd_signal(vm->get(), SIGKILL); !st.ok() && st.error().sys_errno() != ESRCH) {
            log->error("firecracker pid {}: could not kill it: {}", pid, st.error().message());
          }
          return;
        }
      };
      auto held = std::make_shared<sys::UniqueFd>(std::move(uffd_fd));
      try {
        std::thread([poison, held] { poison(std::move(*held)); }).detach();
      } catch (const std::system_error&) {
        poison(std::move(*held));  // no thread to be had: here, then
      }
    } else if (pidfd >= 0) {
      log->error("firecracker pid {}: its memory cannot be served ({}); killing it rather than leave it hanging", pid, why);
      if (Status st = sys::pidfd_signal(pidfd, SIGKILL); !st.ok() && st.error().sys_errno() != ESRCH) {
        log->error("firecracker pid {}: could not kill it: {}", pid, st.error().message());
      }
    } else if (uffd_fd.valid()) {
      log->error("firecracker pid {}: its memory cannot be served ({}), and it can be neither poisoned (no UFFDIO_POISON "
                 "or no guest ranges) nor killed (no pidfd of it): it may wait on its memory for good; kill it",
                 pid, why);
    }
  }

  // Every refusal of a handshake that brought a uffd fails the VM: Firecracker has registered its
  // guest memory on it and does not notice the socket close, so its vCPUs would wait for good.
  void refuse_handshake(FcHandshake& hs, const std::string& why) {
    handshake_refused(hs.cred.pid, hs.notify_conn, hs.notify_id, why);
    for (auto& f : hs.fds) {
      if (!sys::check_userfaultfd(f.get()).ok()) continue;
      fail_vm(hs.cred.pidfd.get(), hs.cred.pid, std::move(f), hs.ranges, "handshake refused: " + why);
      break;
    }
    end_handshake(hs.fd.get());
  }
  void handshake_refused(pid_t pid, int conn_fd, uint64_t id, const std::string& why) {
    log->warn("firecracker handshake from pid {}: {}", pid, why);
    reply_on(conn_fd, id, [&](auto b) { b.setFailed("Firecracker handshake refused: " + why); });
  }

  void on_handshake_timer(int tfd) {
    if (!fired(tfd)) return;
    auto it = handshake_timers.find(tfd);
    if (it == handshake_timers.end()) return;
    auto h = handshakes.find(it->second);
    if (h != handshakes.end()) {
      refuse_handshake(*h->second, fmt::format("no complete handshake within {} s", kHandshakeSeconds));
    }
  }

  void on_handshake_data(int fd) {
    auto it = handshakes.find(fd);
    if (it == handshakes.end()) return;
    FcHandshake& hs = *it->second;
    std::vector<char> chunk(64 * 1024);
    iovec iov{chunk.data(), chunk.size()};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 4)];
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    ssize_t n;
    do n = ::recvmsg(fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    if (n < 0 && errno == EAGAIN) return;
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); n >= 0 && c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
        for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); ++i) {
          int f;
          std::memcpy(&f, CMSG_DATA(c) + i * sizeof(int), sizeof f);
          hs.fds.emplace_back(f);
        }
      }
    }
    if (n < 0) return refuse_handshake(hs, fmt::format("receive failed: {}", std::strerror(errno)));
    if (msg.msg_flags & MSG_CTRUNC) return refuse_handshake(hs, "too many descriptors sent (expected one uffd)");
    if (n == 0) return refuse_handshake(hs, "disconnected before the handshake was complete");
    hs.body.append(chunk.data(), static_cast<size_t>(n));
    if (hs.body.size() > kMaxHandshake) return refuse_handshake(hs, fmt::format("message over {} bytes", kMaxHandshake));
    auto parsed = parse_guest_regions(hs.body);
    if (!parsed.ok()) return refuse_handshake(hs, parsed.error().message());
    if (!parsed->has_value()) return;  // the rest of the message is on its way
    hs.ranges = (*parsed)->ranges;
    if (!hs.refusal.empty()) return refuse_handshake(hs, hs.refusal);
    if (hs.fds.size() != 1) return refuse_handshake(hs, fmt::format("expected one uffd with the message, got {}", hs.fds.size()));
    if (Status is_uffd = sys::check_userfaultfd(hs.fds[0].get()); !is_uffd.ok()) {
      return refuse_handshake(hs, is_uffd.error().message());
    }
    // The uffd was created by Firecracker; the events it asked for are its business. We use
    // the ioctls only, which every uffd supports, and handle whatever events it delivers.
    auto rq = std::make_shared<ServeRequest>();
    rq->name = fmt::format("firecracker pid {}", hs.cred.pid);
    rq->uffd = std::move(hs.fds[0]);
    rq->location = hs.snapshot;
    rq->token_file = hs.token_file;
    rq->ranges = std::move((*parsed)->ranges);
    rq->page_size = (*parsed)->page_size;
    rq->pid = hs.cred.pid;
    rq->pidfd.reset(::fcntl(hs.cred.pidfd.get(), F_DUPFD_CLOEXEC, 0));
    rq->uid = hs.cred.uid;
    rq->prefetch = hs.prefetch;
    rq->reply_id = hs.notify_id;
    // Refused from here on, the VM would wait on its uffd forever (it does not notice the socket
    // close): its memory is failed first, as a failed restore's pages are.
    auto keep = std::make_shared<sys::UniqueFd>(::fcntl(rq->uffd.get(), F_DUPFD_CLOEXEC, 0));
    auto vm_pidfd = std::make_shared<sys::UniqueFd>(std::move(hs.cred.pidfd));
    // Firecracker keeps its end open while the VM runs; so do we, while we serve it.
    auto peer = std::make_shared<sys::UniqueFd>(std::move(hs.fd));
    const int notify = hs.notify_conn;
    OpenSpec spec{rq->location, rq->token_file, hs.reader, {}, {}};  // as whoever asked for the socket
    end_handshake(fd);  // the message is whole: the handshake deadline is done with
    auto go_on = [this, rq, keep, peer, vm_pidfd](Result<std::shared_ptr<snapshot::ChunkSource>> src, int conn_fd) {
      rq->conn_fd = conn_fd;
      const pid_t pid = rq->pid;
      const uint64_t id = rq->reply_id;
      const std::vector<fault::MappedRange> guest = rq->ranges;
      auto sid = src.ok() ? serve(std::move(*rq), std::move(*src)) : Result<fault::SessionId>(std::move(src).error());
      if (!sid.ok()) {
        fail_vm(vm_pidfd->get(), pid, std::move(*keep), guest, sid.error().message());
        return handshake_refused(pid, conn_fd, id, sid.error().message());
      }
      reply_on(conn_fd, id, [&](auto b) { b.setAccepted(*sid); });  // the VM's session
      served[*sid].peer_sock = std::move(*peer);
    };
    Status st = open_then(std::move(spec), 0, notify, rq->pid, rq->uid, go_on, true);
    if (!st.ok()) go_on(st.error(), notify);
  }

  // ---- Prometheus text exposition on --metrics HOST:PORT ----

  std::string metrics_text() {
    nlohmann::json j = report(0, true);
    net::MetricsText out;
    auto each_region = [&](const std::function<void(const std::string& labels, const nlohmann::json& r)>& fn) {
      for (const auto& s : j["sessions"]) {
        for (const auto& r : s["stats"]["regions"]) {
          // No state label: a series whose labels change with the session's state would end and
          // start again (a counter reset to the server); the state has its own state set below.
          std::string labels = fmt::format("session=\"{}\",pid=\"{}\",region=\"{}\"", s["id"].get<uint64_t>(),
                                           s["pid"].get<int>(), r["name"].get<std::string>());
          fn(labels, r);
        }
      }
    };
    auto counter = [&](const char* name, const char* help, const char* key) {
      out.family(name, "counter", help);
      each_region([&](const std::string& l, const nlohmann::json& r) { out.sample(name, l, r[key].get<uint64_t>()); });
    };
    out.family("lazymem_sessions", "gauge", "Sessions being served.");
    uint64_t active = 0;
    for (const auto& s : j["sessions"]) active += s["state"] == "restoring";
    out.sample("lazymem_sessions", "", active);
    out.family("lazymem_session_state", "gauge", "Each session's state: 1 for the one it is in (a state set).");
    for (const auto& s : j["sessions"]) {
      for (const char* st : {"restoring", "failed", "complete", "exited"}) {
        out.sample("lazymem_session_state",
                   fmt::format("session=\"{}\",pid=\"{}\",state=\"{}\"", s["id"].get<uint64_t>(), s["pid"].get<int>(), st),
                   uint64_t{s["state"] == st});
      }
    }
    counter("lazymem_faults_total", "Fault messages read from the userfaultfds.", "faults");
    out.family("lazymem_pages_total", "counter", "Pages installed, by how: fault, prefetch, zero.");
    each_region([&](const std::string& l, const nlohmann::json& r) {
      for (const char* k : {"fault", "prefetch", "zero"})
        out.sample("lazymem_pages_total", fmt::format("{},how=\"{}\"", l, k), r[std::string("pages_") + k].get<uint64_t>());
    });
    counter("lazymem_bytes_fetched_total", "Stored (compressed) bytes read from the snapshot source.", "bytes_fetched");
    counter("lazymem_bytes_decompressed_total", "Bytes after decoding.", "bytes_decompressed");
    counter("lazymem_errors_total", "Chunks that could not be had (poisoned, or the process killed).", "errors");
    out.family("lazymem_blocked_seconds_total", "counter", "Time faulting threads spent waiting.");
    each_region([&](const std::string& l, const nlohmann::json& r) {
      out.sample("lazymem_blocked_seconds_total", l, double(r["blocked_us"].get<uint64_t>()) / 1e6);
    });
    out.family("lazymem_fault_latency_seconds", "summary", "Fault latency (upper bounds of power-of-two microsecond buckets).");
    each_region([&](const std::string& l, const nlohmann::json& r) {
      for (const auto& [q, k] : {std::pair{"0.5", "p50"}, std::pair{"0.99", "p99"}, std::pair{"1", "max"}})
        out.sample("lazymem_fault_latency_seconds", fmt::format("{},quantile=\"{}\"", l, q),
                   double(r["latency_us"][k].get<uint64_t>()) / 1e6);
    });
    return out.take();
  }
};

Result<std::unique_ptr<Daemon>> Daemon::start(const DaemonOptions& options, const KernelFeatures& features) {
  if (!features.uffd_usable) return Error(Errc::kUnsupported, features.uffd_error);
  std::unique_ptr<Daemon> d(new Daemon());
  d->impl_ = std::make_unique<Impl>();
  Impl& im = *d->impl_;
  im.opt = options;
  im.kf = features;
  im.epoll_fd.reset(::epoll_create1(EPOLL_CLOEXEC));
  im.stop_fd.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!im.epoll_fd.valid() || !im.stop_fd.valid()) return sys_error("epoll/eventfd for the agent", errno);
  // What the daemon was given is checked before it listens: a wrong file is said at start, not
  // at the first VM's handshake, and nothing is left at the socket paths.
  if (!options.token_file.empty()) {
    auto token = net::read_token_file(options.token_file);
    if (!token.ok()) return std::move(token).error().wrap("--token-file");
  }
  if (!options.firecracker_socket.empty()) {
    if (options.firecracker_snapshot.empty()) {
      return Error(Errc::kInvalidArgument, "--firecracker-socket needs --snapshot (the VM memory snapshot to serve)");
    }
    Status snap = im.check_vm_snapshot(options.firecracker_snapshot, options.token_file);
    if (!snap.ok()) return std::move(snap).error().wrap("--snapshot");
  }
  LAZYMEM_ASSIGN_OR_RETURN(im.listen_fd, listen_unix(options.socket_path, options.socket_group, &im.listen_file));
  if (!options.firecracker_socket.empty()) {
    SocketFile file;
    LAZYMEM_ASSIGN_OR_RETURN(sys::UniqueFd fc, listen_unix(options.firecracker_socket, options.socket_group, &file));
    int f = fc.get();
    im.add(f, tag(kFcListen, f));
    im.fc_listeners[f] = FcListener{std::move(fc), options.firecracker_socket, options.firecracker_snapshot,
                                    options.token_file, true, false, -1, 0, false, ::geteuid(), 0, std::nullopt, std::move(file)};
  }
  if (!options.metrics_address.empty()) {
    LAZYMEM_ASSIGN_OR_RETURN(im.metrics, net::MetricsEndpoint::listen(options.metrics_address));
    im.add(im.metrics->fd(), kMetricsTag);
  }
  im.engine = std::make_unique<fault::FaultEngine>(features, options.engine);
  LAZYMEM_TRY(im.engine->start());
  im.add(im.listen_fd.get(), kListenTag);
  im.add(im.stop_fd.get(), kStopTag);
  im.add(im.engine->changes_fd(), kEngineTag);
  im.add(im.opener.fd(), kOpenedTag);
  im.add(im.opener.timer_fd(), kOpenedTag);
  return d;
}

Daemon::~Daemon() {
  // Also reached when start() failed part way: only what was made is undone, so a path another
  // daemon owns is never removed.
  if (!impl_) return;
  if (impl_->engine) impl_->engine->stop();
  impl_->listen_file.remove();
  for (const auto& [fd, l] : impl_->fc_listeners) l.file.remove();
}

Status Daemon::run() {
  Impl& im = *impl_;
  std::vector<epoll_event> events(64);
  for (;;) {
    int n = ::epoll_wait(im.epoll_fd.get(), events.data(), static_cast<int>(events.size()), -1);
    if (n < 0 && errno != EINTR) return sys_error("epoll_wait", errno);
    for (int i = 0; i < n; ++i) {
      uint64_t t = events[static_cast<size_t>(i)].data.u64;
      int fd = static_cast<int>(t & 0xffffffffu);
      switch (static_cast<Kind>(t >> 32)) {
        case kSingle:
          if (t == kStopTag) return ok_status();
          if (t == kListenTag) im.accept_conn();
          else if (t == kEngineTag) im.on_engine_change();
          else if (t == kMetricsTag) im.metrics->serve([&] { return im.metrics_text(); });
          else if (t == kOpenedTag) im.on_opened();
          break;
        case kConn: im.on_conn(fd, events[static_cast<size_t>(i)].events); break;
        case kPidfd: im.on_pid_exit(fd); break;
        case kFcListen: im.accept_firecracker(fd); break;
        case kFcConn: im.on_handshake_data(fd); break;
        case kFcTimer: im.on_handshake_timer(fd); break;
        case kNoticeTimer: im.on_notice_timer(fd); break;
      }
      im.resume_buffered();
      im.close_broken();
    }
  }
}

void Daemon::stop() {
  uint64_t one = 1;
  (void)!::write(impl_->stop_fd.get(), &one, sizeof one);
}

}  // namespace lazymem::agent
