// The agent daemon: accepts uffds and serves their faults with one FaultEngine.
#include "daemon.h"

#include <fmt/format.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "agent.capnp.h"
#include "agent_client/unix_channel.h"
#include "core/log.h"
#include "source.h"

namespace lazymem::agent {
namespace pa = proto::agent;
namespace {

constexpr uint64_t kListenTag = 1, kFirecrackerTag = 2, kStopTag = 3, kEngineTag = 4;
constexpr uint64_t kConnBase = 1ULL << 32;   // + fd
constexpr uint64_t kPidfdBase = 2ULL << 32;  // + fd
constexpr size_t kMaxHandshake = 1 << 20;    // Firecracker's region JSON, at most

struct Conn {
  sys::UniqueFd fd;
  pid_t pid = 0;
  uid_t uid = 0;
  net::FrameBuffer buf;
  std::deque<sys::UniqueFd> fds;
};

struct Served {
  fault::SessionId session;
  pid_t pid;
  uid_t uid;
  int conn_fd;  // -1: none (Firecracker, or the client went away)
  sys::UniqueFd pidfd;
  bool reported = false;
};

Result<sys::UniqueFd> listen_unix(const std::string& path, mode_t mode, gid_t group) {
  sys::UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd.valid()) return sys_error("socket", errno);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path) return Error(Errc::kInvalidArgument, "socket path too long: " + path);
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  ::unlink(path.c_str());  // a stale socket from a previous run
  mode_t old = ::umask(0177);
  int r = ::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  ::umask(old);
  if (r != 0) return sys_error("bind " + path + " (does its directory exist?)", errno);
  if (group != static_cast<gid_t>(-1) && ::chown(path.c_str(), static_cast<uid_t>(-1), group) != 0) {
    return sys_error("chown " + path, errno);
  }
  if (::chmod(path.c_str(), mode) != 0) return sys_error("chmod " + path, errno);
  if (::listen(fd.get(), 128) != 0) return sys_error("listen " + path, errno);
  return fd;
}

// Every range must lie inside the peer's own mappings: a client cannot point the agent at
// memory it does not have (the uffd would refuse anyway; this gives a clear reason).
Status check_ranges_mapped(pid_t pid, const std::vector<fault::MappedRange>& ranges) {
  std::ifstream maps(fmt::format("/proc/{}/maps", pid));
  if (!maps) return Error(Errc::kNotFound, fmt::format("cannot read /proc/{}/maps", pid));
  std::vector<std::pair<uint64_t, uint64_t>> vmas;
  std::string line;
  while (std::getline(maps, line)) {
    uint64_t a = 0, b = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx", &a, &b) == 2) vmas.push_back({a, b});
  }
  for (const auto& r : ranges) {
    uint64_t at = r.start, end = r.start + r.length;
    for (const auto& [a, b] : vmas) {
      if (a <= at && at < b) at = b;
      if (at >= end) break;
    }
    if (at < end) {
      return Error(Errc::kInvalidArgument, fmt::format("range {:#x}-{:#x} is not mapped in process {}", r.start, end, pid));
    }
  }
  return ok_status();
}

}  // namespace

struct Daemon::Impl {
  DaemonOptions opt;
  KernelFeatures kf;
  std::unique_ptr<fault::FaultEngine> engine;
  sys::UniqueFd listen_fd, fc_fd, epoll_fd, stop_fd;
  std::map<int, std::unique_ptr<Conn>> conns;
  std::map<fault::SessionId, Served> served;
  std::map<std::string, std::shared_ptr<snapshot::ChunkSource>> sources;  // one per snapshot, shared
  // Sessions that ended (complete, or their process exited), newest last, so `stats` still
  // shows them: (owner uid, report entry).
  std::deque<std::pair<uid_t, nlohmann::json>> finished;
  static constexpr size_t kFinishedKept = 64;
  std::shared_ptr<spdlog::logger> log = log::get("agent");

  void add(int fd, uint64_t tag) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = tag;
    ::epoll_ctl(epoll_fd.get(), EPOLL_CTL_ADD, fd, &ev);
  }

  void reply(Conn& c, uint64_t id, const std::function<void(pa::Reply::Builder)>& fill) {
    capnp::MallocMessageBuilder b;
    auto r = b.initRoot<pa::Reply>();
    r.setId(id);
    fill(r);
    Status st = send_frame_fd(c.fd.get(), b, {}, -1);
    if (!st.ok()) log->warn("pid {}: reply not delivered: {}", c.pid, st.error().message());
  }

  Result<std::shared_ptr<snapshot::ChunkSource>> source_for(const std::string& location, const std::string& token_file) {
    auto it = sources.find(location);
    if (it != sources.end()) return it->second;
    RestoreOptions ro;
    ro.token_file = token_file.empty() ? opt.token_file : token_file;
    LAZYMEM_ASSIGN_OR_RETURN(auto src, open_chunk_source(location, ro));
    sources[location] = src;
    return src;
  }

  Result<fault::SessionId> serve(const std::string& name, sys::UniqueFd uffd, uint64_t features,
                                 const std::string& location, const std::string& token_file,
                                 std::vector<fault::MappedRange> ranges, pid_t pid, uid_t uid, bool prefetch, int conn_fd) {
    LAZYMEM_TRY(check_ranges_mapped(pid, ranges));
    LAZYMEM_ASSIGN_OR_RETURN(auto src, source_for(location, token_file));
    sys::UniqueFd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
    if (!pidfd.valid()) return sys_error(fmt::format("pidfd_open({})", pid), errno);
    fault::SessionSpec spec;
    spec.name = name;
    spec.uffd = sys::Uffd::adopt(std::move(uffd), features);
    spec.source = src;
    spec.ranges = std::move(ranges);
    spec.pid = pid;
    spec.prefetch = prefetch;
    LAZYMEM_ASSIGN_OR_RETURN(fault::SessionId id, engine->add_session(std::move(spec)));
    add(pidfd.get(), kPidfdBase + static_cast<uint64_t>(pidfd.get()));
    served[id] = Served{id, pid, uid, conn_fd, std::move(pidfd)};
    log->info("serving pid {} ({}) from {}", pid, name, location);
    return id;
  }

  void on_request(Conn& c, net::Header& h) {
    pa::Request::Reader rq;
    uint64_t id = 0;
    try {
      rq = h.root<pa::Request>();
      id = rq.getId();
      if (rq.isRestore()) {
        auto r = rq.getRestore();
        if (c.fds.empty()) {
          reply(c, id, [](auto b) { b.setError("restore needs the process's userfaultfd sent with it (SCM_RIGHTS)"); });
          return;
        }
        sys::UniqueFd uffd = std::move(c.fds.front());
        c.fds.clear();  // anything else sent along is dropped
        std::vector<fault::MappedRange> ranges;
        for (auto m : r.getRanges()) ranges.push_back({m.getStart(), m.getLength(), m.getRegion(), m.getRegionOffset()});
        auto sid = serve(fmt::format("pid {}", c.pid), std::move(uffd), r.getUffdFeatures(), r.getSnapshot().cStr(),
                         r.getTokenFile().cStr(), std::move(ranges), c.pid, c.uid, r.getPrefetch(), c.fd.get());
        if (!sid.ok()) {
          log->warn("pid {}: restore refused: {}", c.pid, sid.error().message());
          std::string msg = sid.error().message();
          reply(c, id, [&](auto b) { b.setError(msg); });
          return;
        }
        reply(c, id, [&](auto b) { b.setAccepted(*sid); });
        return;
      }
      if (rq.isStatus() || rq.isStats()) {
        std::string js = report(c.uid, rq.isStats());
        reply(c, id, [&](auto b) { b.setJson(js); });
        return;
      }
      reply(c, id, [](auto b) { b.setError("unknown request"); });
    } catch (const kj::Exception& e) {
      std::string msg = fmt::format("malformed request: {}", e.getDescription().cStr());
      reply(c, id, [&](auto b) { b.setError(msg); });
    }
  }

  static nlohmann::json entry(const fault::SessionInfo& info, const char* state) {
    return {{"id", info.id},
            {"name", info.name},
            {"pid", info.pid},
            {"source", info.stats.source},
            {"chunks_present", info.chunks_present},
            {"chunks_total", info.chunks_total},
            {"complete", info.complete},
            {"failed", info.failed},
            {"failure", info.failure},
            {"state", state},
            {"stats", nlohmann::json::parse(format_stats_json(info.stats))}};
  }

  void remember(fault::SessionId id, uid_t uid, const char* state) {
    auto info = engine->session_info(id);
    if (!info) return;
    finished.emplace_back(uid, entry(*info, state));
    if (finished.size() > kFinishedKept) finished.pop_front();
  }

  // Sessions a peer may see: its own user's, or all for root.
  std::string report(uid_t uid, bool with_stats) {
    nlohmann::json j;
    j["sessions"] = nlohmann::json::array();
    for (const auto& [owner, e] : finished) {
      if (uid != 0 && owner != uid) continue;
      j["sessions"].push_back(e);
    }
    for (const auto& info : engine->sessions()) {
      auto it = served.find(info.id);
      uid_t owner = it != served.end() ? it->second.uid : 0;
      if (uid != 0 && owner != uid) continue;
      j["sessions"].push_back(entry(info, info.failed ? "failed" : "restoring"));
    }
    if (!with_stats)
      for (auto& e : j["sessions"]) e.erase("stats");
    j["pid"] = ::getpid();
    return j.dump();
  }

  void on_engine_change() {
    uint64_t v;
    (void)!::read(engine->changes_fd(), &v, sizeof v);
    std::vector<fault::SessionId> done;
    for (auto& [id, s] : served) {
      auto info = engine->session_info(id);
      if (!info) continue;
      auto cit = s.conn_fd >= 0 ? conns.find(s.conn_fd) : conns.end();
      if (info->failed && !s.reported) {
        s.reported = true;
        if (cit != conns.end()) reply(*cit->second, 0, [&](auto b) { b.setFailed(info->failure); });
      }
      if (info->complete) {
        // Every page is present: the process no longer needs us. Tell it, and let go of our
        // copy of its uffd (it closes its own on the message).
        if (cit != conns.end()) reply(*cit->second, 0, [&](auto b) { b.setComplete(id); });
        log->info("pid {}: restore complete", s.pid);
        done.push_back(id);
      }
    }
    for (auto id : done) {
      auto it = served.find(id);
      remember(id, it->second.uid, "complete");
      ::epoll_ctl(epoll_fd.get(), EPOLL_CTL_DEL, it->second.pidfd.get(), nullptr);
      engine->remove_session(id);
      served.erase(it);
    }
  }

  void on_pid_exit(int pidfd) {
    for (auto it = served.begin(); it != served.end(); ++it) {
      if (it->second.pidfd.get() != pidfd) continue;
      log->info("pid {} exited; dropping its session", it->second.pid);
      remember(it->first, it->second.uid, "exited");
      ::epoll_ctl(epoll_fd.get(), EPOLL_CTL_DEL, pidfd, nullptr);
      engine->remove_session(it->first);
      served.erase(it);
      return;
    }
  }

  void on_conn(int fd) {
    auto it = conns.find(fd);
    if (it == conns.end()) return;
    Conn& c = *it->second;
    Status s = recv_some(fd, c.buf, c.fds, 0);
    for (;;) {
      auto f = c.buf.next();
      if (!f.ok()) {
        log->warn("pid {}: {}; closing its connection", c.pid, f.error().message());
        s = f.error();
        break;
      }
      if (!f->has_value()) break;
      auto h = net::Header::parse((*f)->header);
      if (!h.ok()) {
        log->warn("pid {}: {}; closing its connection", c.pid, h.error().message());
        s = h.error();
        break;
      }
      on_request(c, **h);
      c.buf.consume();
    }
    if (!s.ok()) {
      // The client's sessions go on (its process may still run); only the notifications stop.
      for (auto& [id, sv] : served)
        if (sv.conn_fd == fd) sv.conn_fd = -1;
      ::epoll_ctl(epoll_fd.get(), EPOLL_CTL_DEL, fd, nullptr);
      conns.erase(it);
    }
  }

  void accept_conn() {
    for (;;) {
      int fd = ::accept4(listen_fd.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (fd < 0) return;
      auto c = std::make_unique<Conn>();
      c->fd.reset(fd);
      ucred cred{};
      socklen_t len = sizeof cred;
      if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) continue;
      c->pid = cred.pid;
      c->uid = cred.uid;
      add(fd, kConnBase + static_cast<uint64_t>(fd));
      conns[fd] = std::move(c);
    }
  }

  // Firecracker: one message holding a JSON array of GuestRegionUffdMapping and the uffd.
  void accept_firecracker() {
    int fd = ::accept4(fc_fd.get(), nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) return;
    sys::UniqueFd conn(fd);
    ucred cred{};
    socklen_t len = sizeof cred;
    ::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len);
    timeval tv{5, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    std::vector<char> body(kMaxHandshake);
    net::FrameBuffer unused;
    iovec iov{body.data(), body.size()};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 4)];
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    ssize_t n = ::recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);
    std::vector<sys::UniqueFd> fds;
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); n >= 0 && c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
        for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); ++i) {
          int f;
          std::memcpy(&f, CMSG_DATA(c) + i * sizeof(int), sizeof f);
          fds.emplace_back(f);
        }
      }
    }
    auto refuse = [&](const std::string& why) { log->warn("firecracker handshake from pid {}: {}", cred.pid, why); };
    if (n <= 0) return refuse("no message");
    if (fds.size() != 1) return refuse(fmt::format("expected one uffd, got {}", fds.size()));
    std::vector<fault::MappedRange> ranges;
    try {
      auto j = nlohmann::json::parse(std::string(body.data(), static_cast<size_t>(n)));
      if (!j.is_array() || j.empty()) return refuse("expected a non-empty JSON array of GuestRegionUffdMapping");
      for (const auto& r : j) {
        uint64_t page = r.contains("page_size") ? r["page_size"].get<uint64_t>()
                                                : r.value("page_size_kib", uint64_t{4}) * 1024;  // deprecated field
        if (page != 4096) return refuse(fmt::format("page size {} is not supported (4 KiB only)", page));
        ranges.push_back(fault::MappedRange{r.at("base_host_virt_addr").get<uint64_t>(), r.at("size").get<uint64_t>(), 0,
                                            r.at("offset").get<uint64_t>()});
      }
    } catch (const std::exception& e) {
      return refuse(std::string("bad JSON: ") + e.what());
    }
    // The uffd was created by Firecracker; the events it asked for are its business. We use
    // the ioctls only, which every uffd supports.
    auto sid = serve(fmt::format("firecracker pid {}", cred.pid), std::move(fds[0]), 0, opt.firecracker_snapshot, "",
                     std::move(ranges), cred.pid, cred.uid, true, -1);
    if (!sid.ok()) return refuse(sid.error().message());
  }
};

Result<std::unique_ptr<Daemon>> Daemon::start(const DaemonOptions& options, const KernelFeatures& features) {
  if (!features.uffd_usable) return Error(Errc::kUnsupported, features.uffd_error);
  std::unique_ptr<Daemon> d(new Daemon());
  d->impl_ = std::make_unique<Impl>();
  Impl& im = *d->impl_;
  im.opt = options;
  im.kf = features;
  mode_t mode = options.socket_group != static_cast<gid_t>(-1) ? 0660 : 0600;
  LAZYMEM_ASSIGN_OR_RETURN(im.listen_fd, listen_unix(options.socket_path, mode, options.socket_group));
  if (!options.firecracker_socket.empty()) {
    if (options.firecracker_snapshot.empty()) {
      return Error(Errc::kInvalidArgument, "--firecracker-socket needs --snapshot (the VM memory snapshot to serve)");
    }
    LAZYMEM_ASSIGN_OR_RETURN(im.fc_fd, listen_unix(options.firecracker_socket, mode, options.socket_group));
  }
  im.engine = std::make_unique<fault::FaultEngine>(features, options.engine);
  LAZYMEM_TRY(im.engine->start());
  im.epoll_fd.reset(::epoll_create1(EPOLL_CLOEXEC));
  im.stop_fd.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  im.add(im.listen_fd.get(), kListenTag);
  if (im.fc_fd.valid()) im.add(im.fc_fd.get(), kFirecrackerTag);
  im.add(im.stop_fd.get(), kStopTag);
  im.add(im.engine->changes_fd(), kEngineTag);
  return d;
}

Daemon::~Daemon() {
  if (impl_) {
    impl_->engine->stop();
    ::unlink(impl_->opt.socket_path.c_str());
    if (!impl_->opt.firecracker_socket.empty()) ::unlink(impl_->opt.firecracker_socket.c_str());
  }
}

Status Daemon::run() {
  Impl& im = *impl_;
  std::vector<epoll_event> events(64);
  for (;;) {
    int n = ::epoll_wait(im.epoll_fd.get(), events.data(), static_cast<int>(events.size()), -1);
    if (n < 0 && errno != EINTR) return sys_error("epoll_wait", errno);
    for (int i = 0; i < n; ++i) {
      uint64_t tag = events[static_cast<size_t>(i)].data.u64;
      if (tag == kStopTag) return ok_status();
      if (tag == kListenTag) im.accept_conn();
      else if (tag == kFirecrackerTag) im.accept_firecracker();
      else if (tag == kEngineTag) im.on_engine_change();
      else if (tag >= kPidfdBase) im.on_pid_exit(static_cast<int>(tag - kPidfdBase));
      else if (tag >= kConnBase) im.on_conn(static_cast<int>(tag - kConnBase));
    }
  }
}

void Daemon::stop() {
  uint64_t one = 1;
  (void)!::write(impl_->stop_fd.get(), &one, sizeof one);
}

}  // namespace lazymem::agent
