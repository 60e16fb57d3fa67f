// Page-server client.
#include "net/client.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <cstring>
#include <optional>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "net/auth.h"
#include "net/dialer.h"
#include "net/page_fetcher.h"
#include "snapshot/manifest.h"
#include "sys/syscall_result.h"

namespace lazymem::net {
namespace wire = proto::wire;
namespace {

int ms_left(Deadline d) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(d - std::chrono::steady_clock::now()).count();
  return left <= 0 ? 0 : static_cast<int>(std::min<long>(left, 1 << 30));
}

Status wait_fd(int fd, short events, Deadline d, const char* what) {
  for (;;) {
    pollfd p{fd, events, 0};
    int r = ::poll(&p, 1, ms_left(d));
    if (r > 0) return ok_status();
    if (r == 0) return Error(Errc::kTimeout, fmt::format("page server: timed out {}", what));
    if (errno != EINTR) return sys_error("poll", errno);
  }
}

}  // namespace

Result<sys::UniqueFd> dial(const std::string& host, uint16_t port, Deadline deadline) {
  LAZYMEM_ASSIGN_OR_RETURN(auto addrs, resolve(host, port));
  Error last(Errc::kPeerGone, fmt::format("page server {}:{}: no address", host, port));
  for (const SocketAddress& a : addrs) {
    auto fd = start_connect(a);
    if (!fd.ok()) {
      last = std::move(fd).error();
      continue;
    }
    Status w = wait_fd(fd->get(), POLLOUT, deadline, "connecting");
    if (!w.ok()) {
      last = w.error();
      continue;
    }
    int err = 0;
    socklen_t len = sizeof err;
    ::getsockopt(fd->get(), SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0) {
      last = sys_error(fmt::format("connect to page server {}:{} (is it running?)", host, port), err);
      continue;
    }
    return std::move(*fd);
  }
  return last;
}

Status send_frame(int fd, capnp::MessageBuilder& header, std::span<const std::byte> payload, Deadline deadline) {
  std::vector<std::byte> head = encode_frame(header, static_cast<uint32_t>(payload.size()));
  for (std::span<const std::byte> part : {std::span<const std::byte>(head), payload}) {
    size_t done = 0;
    while (done < part.size()) {
      ssize_t n = ::send(fd, part.data() + done, part.size() - done, MSG_NOSIGNAL);
      if (n > 0) {
        done += static_cast<size_t>(n);
      } else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
        LAZYMEM_TRY(wait_fd(fd, POLLOUT, deadline, "sending"));
      } else {
        return sys_error("send to page server", n < 0 ? errno : EPIPE);
      }
    }
  }
  return ok_status();
}

Result<OwnedFrame> recv_frame(int fd, FrameBuffer& buf, Deadline deadline) {
  for (;;) {
    auto f = buf.next();
    if (!f.ok()) return std::move(f).error();
    if (f->has_value()) {
      OwnedFrame out;
      LAZYMEM_ASSIGN_OR_RETURN(out.header, Header::parse((*f)->header));
      out.payload.assign((*f)->payload.begin(), (*f)->payload.end());
      buf.consume();
      return out;
    }
    auto space = buf.writable();
    ssize_t n = ::recv(fd, space.data(), space.size(), 0);
    if (n > 0) {
      buf.commit(static_cast<size_t>(n));
    } else if (n == 0) {
      return Error(Errc::kPeerGone, "page server closed the connection");
    } else if (errno == EAGAIN || errno == EINTR) {
      LAZYMEM_TRY(wait_fd(fd, POLLIN, deadline, "waiting for a reply"));
    } else {
      return sys_error("receive from page server", errno);
    }
  }
}

std::string peer(const SnapshotLocation& loc) { return "page server " + loc.to_string(); }

Error reply_error(const SnapshotLocation& loc, wire::ErrorReply::Reader e) {
  Errc code = Errc::kIo;
  switch (e.getCode()) {
    case wire::ErrorCode::NOT_FOUND: code = Errc::kNotFound; break;
    case wire::ErrorCode::CORRUPT: code = Errc::kCorrupt; break;
    case wire::ErrorCode::AUTH_REQUIRED:
    case wire::ErrorCode::AUTH_FAILED: code = Errc::kPermission; break;
    case wire::ErrorCode::OUT_OF_RANGE:
    case wire::ErrorCode::BAD_REQUEST: code = Errc::kProtocol; break;
    case wire::ErrorCode::UNSUPPORTED_VERSION: code = Errc::kUnsupported; break;
    default: break;
  }
  return Error(code, fmt::format("page server {}: {}", loc.to_string(), e.getMessage().cStr()));
}

namespace {

Result<sys::UniqueFd> dial(const SnapshotLocation& loc, const std::string& token, Deadline deadline, uint64_t reads,
                           size_t first_server, size_t* connected) {
  LAZYMEM_ASSIGN_OR_RETURN(Dialer d, Dialer::start(loc, token, reads, first_server));
  for (;;) {
    LAZYMEM_ASSIGN_OR_RETURN(bool done, d.step());
    if (done) {
      if (connected != nullptr) *connected = d.server();
      return d.take();
    }
    Status w = wait_fd(d.fd(), d.events(), deadline, d.doing());
    if (!w.ok() && w.error().code() == Errc::kTimeout) return d.timed_out();
    LAZYMEM_TRY(w);
  }
}

}  // namespace

// Where there are several servers, each gets a share of the time left in turn: one that accepts
// and then says nothing (hung, stopped) must not use it all.
Result<sys::UniqueFd> open_connection(const SnapshotLocation& loc, const std::string& token, Deadline deadline,
                                      uint64_t reads, size_t first_server, size_t* connected) {
  const size_t n = loc.servers().size();
  for (size_t k = 0;; ++k) {
    const auto now = std::chrono::steady_clock::now();
    const Deadline mine = k + 1 >= n ? deadline : now + (deadline - now) / static_cast<long>(n - k);
    auto fd = dial(loc, token, mine, reads, first_server + k, connected);
    if (fd.ok() || k + 1 >= n) return fd;
  }
}

namespace {

// One request to `loc`'s server on a connection of its own: `fill` sets it, `take` reads its
// reply (an error reply becomes the error it names, a reply `take` cannot read a protocol error
// naming the server). `what` names the request in "unexpected reply to ...".
template <typename T, typename Fill, typename Take>
Result<T> ask_server(const SnapshotLocation& loc, const std::string& token, Deadline deadline, const char* what,
                     Fill&& fill, Take&& take) {
  size_t at = 0;
  LAZYMEM_ASSIGN_OR_RETURN(sys::UniqueFd fd, open_connection(loc, token, deadline, 0, 0, &at));
  capnp::MallocMessageBuilder m;
  fill(m.initRoot<wire::Request>());
  LAZYMEM_TRY(send_frame(fd.get(), m, {}, deadline));
  FrameBuffer buf;
  LAZYMEM_ASSIGN_OR_RETURN(OwnedFrame f, recv_frame(fd.get(), buf, deadline));
  return f.header->read(peer(loc.at(at)), [&]() -> Result<T> {
    auto reply = f.header->root<wire::Reply>();
    if (reply.isError()) return reply_error(loc.at(at), reply.getError());
    std::optional<Result<T>> out = take(reply);
    if (!out) return Error(Errc::kProtocol, fmt::format("page server: unexpected reply to {}", what));
    return std::move(*out);
  });
}

}  // namespace

Result<std::vector<snapshot::SnapshotSummary>> list_remote(const SnapshotLocation& server, const std::string& token,
                                                           Deadline deadline) {
  using Summaries = std::vector<snapshot::SnapshotSummary>;
  return ask_server<Summaries>(
      server, token, deadline, "list",
      [](wire::Request::Builder rq) {
        rq.setId(4);
        rq.setList();
      },
      [](wire::Reply::Reader reply) -> std::optional<Result<Summaries>> {
        if (!reply.isSnapshots()) return std::nullopt;
        Summaries out;
        for (auto s : reply.getSnapshots()) {
          out.push_back(snapshot::SnapshotSummary{s.getName(), s.getTotalBytes(), s.getStoredBytes(), s.getRegions(),
                                                  s.getCreatedUnixNs(), std::max<uint32_t>(1, s.getFormatVersion()), ""});
        }
        return out;
      });
}

Status remove_remote(const SnapshotLocation& loc, const std::string& token, Deadline deadline) {
  auto done = ask_server<bool>(
      loc, token, deadline, "remove",
      [&](wire::Request::Builder rq) {
        rq.setId(6);
        rq.setRemove(loc.name);
      },
      [](wire::Reply::Reader reply) -> std::optional<Result<bool>> {
        if (!reply.isOk()) return std::nullopt;
        return true;
      });
  if (!done.ok()) return std::move(done).error();
  return ok_status();
}

Result<std::string> server_stats_json(const SnapshotLocation& server, const std::string& token, Deadline deadline) {
  return ask_server<std::string>(
      server, token, deadline, "stats",
      [](wire::Request::Builder rq) {
        rq.setId(5);
        rq.setStats();
      },
      [](wire::Reply::Reader reply) -> std::optional<Result<std::string>> {
        if (!reply.isStats()) return std::nullopt;
        auto st = reply.getStats();
        nlohmann::json j = {{"connections", st.getConnections()},       {"open_connections", st.getOpenConnections()},
                            {"requests", st.getRequests()},             {"chunks", st.getChunks()},
                            {"bytes", st.getBytes()},                   {"errors_protocol", st.getErrorsProtocol()},
                            {"errors_auth", st.getErrorsAuth()},        {"errors_not_found", st.getErrorsNotFound()},
                            {"errors_range", st.getErrorsRange()},      {"errors_io", st.getErrorsIo()},
                            {"handshake_timeouts", st.getHandshakeTimeouts()}, {"uploads", st.getUploads()},
                            {"disk_read_bytes", st.getDiskReadBytes()},     {"cache_hits", st.getCacheHits()},
                            {"cache_misses", st.getCacheMisses()},          {"zerocopy_sends", st.getZerocopySends()},
                            {"zerocopy_bytes", st.getZerocopyBytes()},      {"zerocopy_copied_sends", st.getZerocopyCopiedSends()},
                            {"zerocopy_fallbacks", st.getZerocopyFallbacks()}, {"plain_sends", st.getPlainSends()},
                            {"plain_bytes", st.getPlainBytes()},            {"pages", st.getPages()},
                            {"errors_corrupt", st.getErrorsCorrupt()},      {"datagram_requests", st.getDatagramRequests()},
                            {"datagrams_dropped", st.getDatagramsDropped()}, {"datagrams_unsent", st.getDatagramsUnsent()},
                            {"connections_refused", st.getConnectionsRefused()}, {"datagrams_over_mtu", st.getDatagramsOverMtu()},
                            {"datagrams_on_stream", st.getDatagramsOnStream()},
                            {"snapshots_retired", st.getSnapshotsRetired()},
                            {"snapshots_retired_bytes", st.getSnapshotsRetiredBytes()},
                            {"connections_stalled", st.getConnectionsStalled()},
                            {"listings", st.getListings()}, {"listing_manifest_reads", st.getListingManifestReads()},
                            {"restores_completed", st.getRestoresCompleted()}};
        return j.dump();
      });
}

namespace {

class RemoteSink final : public snapshot::SnapshotSink {
 public:
  RemoteSink(SnapshotLocation loc, sys::UniqueFd fd, std::chrono::milliseconds timeout)
      : loc_(std::move(loc)), fd_(std::move(fd)), timeout_(timeout) {}

  Status append(std::span<const std::byte> data) override {
    LAZYMEM_TRY(check_no_error());
    constexpr size_t kPiece = 4 << 20;
    for (size_t off = 0; off < data.size(); off += kPiece) {
      capnp::MallocMessageBuilder m;
      auto rq = m.initRoot<wire::Request>();
      rq.setId(++id_);
      rq.setPutData();
      if (Status s = send_frame(fd_.get(), m, data.subspan(off, std::min(kPiece, data.size() - off)), deadline()); !s.ok()) {
        return lost(s.error());
      }
    }
    return ok_status();
  }

  Status commit(std::span<const std::byte> manifest) override {
    capnp::MallocMessageBuilder m;
    auto rq = m.initRoot<wire::Request>();
    rq.setId(++id_);
    rq.setPutCommit();
    if (Status s = send_frame(fd_.get(), m, manifest, deadline()); !s.ok()) return lost(s.error());
    auto f = recv_frame(fd_.get(), buf_, deadline());
    if (!f.ok()) return lost(f.error());
    LAZYMEM_TRY(f->header->read(peer(loc_), [&]() -> Status {
      auto reply = f->header->root<wire::Reply>();
      if (reply.isError()) return reply_error(loc_, reply.getError());
      if (!reply.isOk()) return Error(Errc::kProtocol, "page server: unexpected reply to putCommit");
      return ok_status();
    }));
    fd_.reset();
    return ok_status();
  }

  void abort() override { fd_.reset(); }  // the server drops an upload whose connection ends
  std::string describe() const override { return loc_.to_string(); }

 private:
  Deadline deadline() const { return std::chrono::steady_clock::now() + timeout_; }

  // The connection failed under the upload: the server keeps nothing of it (an upload is stored
  // only whole), which is what the person capturing needs to know, with where it was going.
  Error lost(const Error& e) const {
    return Error(e.code(), fmt::format("upload to {} failed: {}; nothing is stored under that name: capture it again",
                                       loc_.to_string(), e.message()), e.sys_errno());
  }

  // The server answers putData only to refuse it (disk full...): look before sending more.
  Status check_no_error() {
    auto space = buf_.writable();
    ssize_t n = ::recv(fd_.get(), space.data(), space.size(), MSG_DONTWAIT);
    if (n == 0) return lost(Error(Errc::kPeerGone, "the page server closed the connection"));
    if (n > 0) {
      buf_.commit(static_cast<size_t>(n));
      auto f = recv_frame(fd_.get(), buf_, deadline());
      if (!f.ok()) return lost(f.error());
      return f->header->read(peer(loc_), [&]() -> Status {
        auto reply = f->header->root<wire::Reply>();
        if (reply.isError()) return reply_error(loc_, reply.getError());
        return ok_status();
      });
    }
    return ok_status();
  }

  SnapshotLocation loc_;
  sys::UniqueFd fd_;
  std::chrono::milliseconds timeout_;
  FrameBuffer buf_;
  uint64_t id_ = 10;
};

}  // namespace

Result<std::unique_ptr<snapshot::SnapshotSink>> open_upload(const SnapshotLocation& loc, const std::string& token,
                                                            bool replace, std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  size_t at = 0;
  LAZYMEM_ASSIGN_OR_RETURN(sys::UniqueFd fd, open_connection(loc, token, deadline, 0, 0, &at));
  const SnapshotLocation to = loc.at(at);  // the server the upload goes to (they share a store)
  capnp::MallocMessageBuilder m;
  auto rq = m.initRoot<wire::Request>();
  rq.setId(6);
  auto pb = rq.initPutBegin();
  pb.setName(loc.name);
  pb.setReplace(replace);
  LAZYMEM_TRY(send_frame(fd.get(), m, {}, deadline));
  FrameBuffer buf;
  LAZYMEM_ASSIGN_OR_RETURN(OwnedFrame f, recv_frame(fd.get(), buf, deadline));
  LAZYMEM_TRY(f.header->read(peer(to), [&]() -> Status {
    auto reply = f.header->root<wire::Reply>();
    if (reply.isError()) return reply_error(to, reply.getError());
    if (!reply.isOk()) return Error(Errc::kProtocol, "page server: unexpected reply to putBegin");
    return ok_status();
  }));
  return std::unique_ptr<snapshot::SnapshotSink>(new RemoteSink(to, std::move(fd), timeout));
}

// ---- remote source ----

namespace {

class RemoteReader final : public snapshot::ChunkReader {
 public:
  RemoteReader(const RemoteSource& src, const SnapshotLocation& loc, std::string token, const RemoteOptions& opts)
      : src_(src), loc_(loc), token_(std::move(token)), opts_(opts), epoll_(::epoll_create1(EPOLL_CLOEXEC)),
        timer_(::timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK)) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = timer_.get();
    ::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, timer_.get(), &ev);
  }

  // Starts the first connection and returns without waiting for it. The engine's thread opens
  // the reader of every session it serves (an agent's: every process on the host), so a server
  // that accepts and then says nothing (a stopped process) must not hold up the others' faults
  // for an attempt's time: poll() moves the connection on as it does a reconnect, requests
  // submitted meanwhile go out once it is made, and fail when the attempts are spent.
  Status start() { return start_attempt(); }

  Status submit(std::span<const snapshot::ChunkRequest> requests) override {
    if (in_flight_.empty()) heard_ = std::chrono::steady_clock::now();  // silence counts from the first request
    for (const auto& rq : requests) in_flight_[rq.tag] = rq;
    if (gave_up_) {  // new requests after giving up: a fresh round of attempts
      gave_up_ = false;
      attempts_ = 0;
      return next_attempt();
    }
    if (link_ != Link::kReady) return ok_status();  // sent once the connection is back
    Status s = send_requests(requests);
    if (!s.ok()) return recover(s.error());
    watch_silence();
    return ok_status();
  }

  Result<size_t> poll(snapshot::ChunkSink& sink, bool block, size_t max) override {
    size_t delivered = 0;
    for (;;) {
      if (link_ != Link::kReady) {
        LAZYMEM_TRY(advance_reconnect());
        if (link_ != Link::kReady) {
          // Only for requests (ChunkReader::poll): a first connection is under way before any.
          if (block && delivered == 0 && !in_flight_.empty()) {
            pollfd p{epoll_.get(), POLLIN, 0};
            ::poll(&p, 1, static_cast<int>(opts_.deadline.count()));
            block = false;
            continue;
          }
          return delivered;
        }
      }
      while (delivered < max) {
        auto f = buf_.next();
        if (!f.ok()) {
          LAZYMEM_TRY(recover(f.error()));
          break;
        }
        if (!f->has_value()) break;
        auto h = Header::parse((*f)->header);
        if (!h.ok()) {
          LAZYMEM_TRY(recover(h.error()));
          break;
        }
        Status read = (*h)->read(peer(loc_.at(server_)), [&] { return deliver(**h, (*f)->payload, sink, delivered); });
        if (!read.ok()) {
          LAZYMEM_TRY(recover(read.error()));
          break;
        }
        // A reply read whole resets the attempts, not bytes alone: a server that answers every
        // connection with garbage must use them up like one that says nothing.
        attempts_ = 0;
        buf_.consume();
      }
      if (pass_over_) {  // after the frames read: a reconnect may reset buf_
        pass_over_ = false;
        LAZYMEM_TRY(recover(Error(Errc::kNotFound, fmt::format("page server {} cannot serve some of the snapshot",
                                                               loc_.at(server_).to_string()))));
        continue;
      }
      if (delivered >= max) return delivered;
      if (link_ != Link::kReady) continue;
      auto space = buf_.writable();
      ssize_t n = ::recv(sock_.get(), space.data(), space.size(), MSG_DONTWAIT);
      if (n > 0) {
        buf_.commit(static_cast<size_t>(n));
        heard_ = std::chrono::steady_clock::now();
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno == EAGAIN) {
        // All that came is read: only now may quiet mean silence (an engine thread that did not
        // run for a while finds replies waiting, not a dead server).
        LAZYMEM_TRY(check_silence());
        if (link_ != Link::kReady) continue;
        if (block && delivered == 0 && !in_flight_.empty()) {
          pollfd p{epoll_.get(), POLLIN, 0};  // the socket, or the silence timer
          ::poll(&p, 1, static_cast<int>(opts_.deadline.count()));
          block = false;
          continue;
        }
        return delivered;
      }
      LAZYMEM_TRY(recover(n == 0 ? Error(Errc::kPeerGone, "page server closed the connection")
                                 : sys_error("receive from page server", errno)));
    }
  }

  int wait_fd() const override { return epoll_.get(); }
  size_t in_flight() const override { return in_flight_.size(); }
  size_t capacity() const override { return opts_.reads_in_flight; }

  // On the connection as it is: one small frame into a send buffer that holds nothing else
  // (nothing is in flight), so it never waits. Without a connection, or to a server that does
  // not read it, nothing is said (a migration source then lingers, as for a restore that died).
  void finished() noexcept override {
    if (link_ != Link::kReady || !takes_complete_) return;
    takes_complete_ = false;  // said once
    try {
      capnp::MallocMessageBuilder m(64);
      auto rq = m.initRoot<wire::Request>();
      rq.setId(++next_id_);
      rq.setComplete(loc_.name);
      (void)send_frame(sock_.get(), m, {}, std::chrono::steady_clock::now());
    } catch (...) {  // (allocation) nothing to tell then
    }
  }

 private:
  // kReady: requests flow. kDialing: a connection (the first, or a reconnect) is under way (its
  // socket and a deadline timer are in our epoll set, so the engine calls poll() as it moves).
  // kBackoff: waiting a moment before the next attempt.
  enum class Link { kReady, kDialing, kBackoff };

  // Each attempt gets a slice of the fault deadline, so all of them together stay within it.
  std::chrono::milliseconds attempt_limit() const { return snapshot::attempt_slice(opts_.deadline, opts_.fetch_attempts); }

  void use_socket(sys::UniqueFd fd) {
    drop_socket();
    sock_ = std::move(fd);
    buf_ = FrameBuffer();
    watch(sock_.get(), EPOLLIN, EPOLL_CTL_ADD);
    link_ = Link::kReady;
    heard_ = std::chrono::steady_clock::now();
    silence_due_.reset();
  }

  // Silence: requests waiting and not a byte from the server for an attempt's time. A server
  // that stopped (hung, or a stopped process: its kernel still accepts and acknowledges) or a
  // path that died without a reset gives TCP nothing to notice for minutes: the connection is
  // dropped and made again, to the next server where there are several, and the requests asked
  // again. Checked when the timer set for it fires (the timer is the reconnect's otherwise).
  void watch_silence() {
    if (silence_due_ || in_flight_.empty()) return;
    const auto now = std::chrono::steady_clock::now();
    const auto in = std::max(attempt_limit() - std::chrono::duration_cast<std::chrono::milliseconds>(now - heard_),
                             std::chrono::milliseconds(1));
    silence_due_ = now + in;
    arm_timer(in);
  }
  Status check_silence() {
    const auto now = std::chrono::steady_clock::now();
    if (!silence_due_ || now < *silence_due_) return ok_status();
    (void)timer_fired();
    silence_due_.reset();
    if (in_flight_.empty()) return ok_status();
    if (now - heard_ >= attempt_limit()) {
      return recover(Error(Errc::kTimeout, fmt::format("page server sent nothing for {} ms while {} requests waited",
                                                       attempt_limit().count(), in_flight_.size())));
    }
    watch_silence();
    return ok_status();
  }
  void drop_socket() {
    if (sock_.valid()) ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, sock_.get(), nullptr);
    sock_.reset();
    silence_due_.reset();  // the timer is the reconnect's now
    pass_over_ = false;    // done with that server already
  }
  void watch(int fd, uint32_t events, int op) {
    epoll_event ev{};
    ev.events = events;
    ev.data.fd = fd;
    ::epoll_ctl(epoll_.get(), op, fd, &ev);
  }
  void arm_timer(std::chrono::milliseconds in) {
    itimerspec t{};
    t.it_value.tv_sec = in.count() / 1000;
    t.it_value.tv_nsec = (in.count() % 1000) * 1000000 + 1;  // never all zero (that disarms)
    ::timerfd_settime(timer_.get(), 0, &t, nullptr);
  }
  bool timer_fired() {
    uint64_t n;
    return ::read(timer_.get(), &n, sizeof n) == sizeof n;
  }

  // The connection broke: start reconnecting in the background, or give up.
  Status recover(const Error& why) {
    drop_socket();
    drop_dialer();
    last_error_ = why;
    return next_attempt();
  }

  Status next_attempt() {
    if (++attempts_ > opts_.fetch_attempts) {
      in_flight_.clear();
      link_ = Link::kBackoff;
      gave_up_ = true;
      disarm_timer();  // nothing to wake for until new requests come
      (void)timer_fired();
      return last_error_.wrap(fmt::format("page server {} (gave up after {} reconnects)", loc_.to_string(),
                                          opts_.fetch_attempts));
    }
    return start_attempt();
  }

  // One attempt at a connection, from the server after the one the last attempt reached; moved
  // on by advance_reconnect() as its socket allows, within an attempt's slice of the deadline.
  Status start_attempt() {
    auto d = Dialer::start(loc_, token_, src_.manifest().checksum, next_first_);
    if (!d.ok()) {  // nothing to wait for: try again after a pause
      last_error_ = std::move(d).error();
      ++next_first_;
      link_ = Link::kBackoff;
      arm_timer(backoff());
      return ok_status();
    }
    dialer_.emplace(std::move(*d));
    watch_dialer();
    link_ = Link::kDialing;
    arm_timer(attempt_limit());
    return advance_reconnect();
  }

  std::chrono::milliseconds backoff() const { return std::chrono::milliseconds(50) * attempts_; }

  // Moves a connection (the first, or a reconnect) on as far as it goes without blocking.
  Status advance_reconnect() {
    if (link_ == Link::kBackoff) {
      if (gave_up_ || !timer_fired()) return ok_status();
      return next_attempt();
    }
    if (link_ != Link::kDialing) return ok_status();
    auto done = dialer_->step();
    // The next attempt starts after the server this one reached, whether it works or fails:
    // rotation that never resets (a server that accepts and then fails is not the only one
    // ever tried, nor one that refuses a request).
    next_first_ = dialer_->server() + 1;
    if (done.ok() && *done) {
      server_ = dialer_->server();
      takes_complete_ = dialer_->takes_complete();
      sys::UniqueFd fd = dialer_->take();
      drop_dialer();
      disarm_timer();
      (void)timer_fired();
      use_socket(std::move(fd));  // attempts_ is reset by the first reply read: a server that accepts and
                                  // then says nothing must not keep the restore trying it forever
      std::vector<snapshot::ChunkRequest> again;
      for (const auto& [tag, rq] : in_flight_) again.push_back(rq);
      Status s = send_requests(again);
      if (!s.ok()) return recover(s.error());
      watch_silence();
      return ok_status();
    }
    bool expired = timer_fired();
    if (done.ok() && expired && dialer_->resolving() && loc_.servers().size() == 1 &&
        attempts_ < opts_.fetch_attempts) {
      // A slow resolver (its first nameserver down: 5 s a lookup) outlasts the slice. A fresh
      // lookup would start over and time out just the same, every attempt: this one goes on,
      // the slice spent as an attempt (all of them together stay within the deadline). Where
      // the location names other servers, the next attempt goes to the next one instead, as
      // after a silent server (found by review: waiting here stopped the failover).
      ++attempts_;
      arm_timer(attempt_limit());
      expired = false;
    }
    if (done.ok() && !expired) {  // waiting for the socket, or the name
      watch_dialer();
      return ok_status();
    }
    last_error_ = done.ok() ? dialer_->timed_out() : std::move(done).error();
    drop_dialer();
    link_ = Link::kBackoff;
    arm_timer(backoff());
    return ok_status();
  }
  // What a dialer waits on changes as it goes (a name lookup's descriptor, then a socket per
  // address tried): watched afresh after each step, the one before taken out of the set (a
  // finished lookup's descriptor stays readable, and may stay open, shared with other readers;
  // the dialer keeps it open until then, so that its number is still the lookup's).
  void watch_dialer() {
    const int fd = dialer_->fd();
    if (fd != dialer_fd_ && dialer_fd_ >= 0) ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, dialer_fd_, nullptr);
    epoll_event ev{};
    ev.events = dialer_->events() == POLLIN ? EPOLLIN : EPOLLOUT;
    ev.data.fd = fd;
    // MOD fails for a number closed and given to the new descriptor since (the kernel dropped it).
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, fd, &ev) != 0) ::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev);
    dialer_fd_ = fd;
  }
  void drop_dialer() {
    if (dialer_fd_ >= 0) ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, dialer_fd_, nullptr);
    dialer_fd_ = -1;
    dialer_.reset();
  }
  void disarm_timer() {
    itimerspec t{};
    ::timerfd_settime(timer_.get(), 0, &t, nullptr);
  }

  Status send_requests(std::span<const snapshot::ChunkRequest> requests) {
    // One frame per lane: demand requests travel in their own frame so the server can put them
    // ahead of the prefetch it has queued.
    for (bool demand : {true, false}) {
      capnp::MallocMessageBuilder m;
      auto rq = m.initRoot<wire::Request>();
      rq.setId(++next_id_);
      auto gc = rq.initGetChunks();
      gc.setSnapshot(loc_.name);
      gc.setDemand(demand);
      unsigned n = 0;
      for (const auto& r : requests) n += r.demand == demand;
      if (n == 0) continue;
      auto list = gc.initChunks(n);
      unsigned i = 0;
      for (const auto& r : requests) {
        if (r.demand != demand) continue;
        list[i].setRegion(r.ref.region);
        list[i].setChunk(r.ref.chunk);
        list[i].setTag(r.tag);
        ++i;
      }
      LAZYMEM_TRY(send_frame(sock_.get(), m, {}, std::chrono::steady_clock::now() + opts_.deadline));
    }
    return ok_status();
  }

  // Reads one reply. Everything that can throw (what Header::read turns into an error) is read
  // before a request leaves in_flight_, so a malformed reply loses none: the reconnect that
  // follows asks for them all again.
  Status deliver(Header& h, std::span<const std::byte> payload, snapshot::ChunkSink& sink, size_t& delivered) {
    auto reply = h.root<wire::Reply>();
    if (reply.isChunk()) {
      auto c = reply.getChunk();
      auto it = in_flight_.find(c.getTag());
      if (it == in_flight_.end()) return ok_status();  // a reply to a request re-sent after a reconnect
      snapshot::ChunkRequest rq = it->second;
      in_flight_.erase(it);
      ++delivered;
      const Manifest& m = src_.manifest();
      if (c.getRegion() != rq.ref.region || c.getChunk() != rq.ref.chunk ||
          payload.size() != m.regions[rq.ref.region].chunks[rq.ref.chunk].stored_length) {
        sink.on_chunk_error(rq.tag, Error(Errc::kProtocol, fmt::format("page server {}: reply does not match the "
                                                                       "request for chunk {}", loc_.at(server_).to_string(), rq.ref.chunk)));
        return ok_status();
      }
      sink.on_chunk(rq.tag, payload);
    } else if (reply.isError()) {
      auto e = reply.getError();
      auto it = in_flight_.find(e.getTag());
      if (it == in_flight_.end()) return ok_status();
      Error why = reply_error(loc_.at(server_), e);
      uint64_t tag = it->first;
      in_flight_.erase(it);
      ++delivered;
      sink.on_chunk_error(tag, std::move(why));
      // Where there are several servers, one that cannot serve a chunk is passed over: the
      // engine's retry goes to the next.
      pass_over_ |= !loc_.more_servers.empty() && another_server_may_serve(e.getCode());
    }
    return ok_status();
  }

  const RemoteSource& src_;
  SnapshotLocation loc_;
  std::string token_;
  RemoteOptions opts_;
  sys::UniqueFd epoll_;  // stable fd for the engine, whatever socket is current
  sys::UniqueFd timer_;  // an attempt's deadline, or the pause before the next one
  sys::UniqueFd sock_;
  Link link_ = Link::kReady;
  std::optional<Dialer> dialer_;
  int dialer_fd_ = -1;     // what of the dialer's is in epoll_ (watch_dialer)
  unsigned attempts_ = 0;  // reconnects since the server last sent a reply (the first try is none)
  size_t server_ = 0;      // the connected server's index in loc_.servers()
  size_t next_first_ = 0;  // where the next reconnect starts (Dialer::start)
  bool pass_over_ = false; // the connected server refused a chunk: reconnect to the next
  bool gave_up_ = false;   // the last round of attempts failed: the engine has been told
  bool takes_complete_ = false;  // the connected server reads Request.complete
  Error last_error_{Errc::kPeerGone, "page server connection lost"};
  FrameBuffer buf_;
  std::unordered_map<uint64_t, snapshot::ChunkRequest> in_flight_;
  std::chrono::steady_clock::time_point heard_;  // the last bytes from the server (or the connection, or the wait, began)
  std::optional<std::chrono::steady_clock::time_point> silence_due_;  // the timer is set for watch_silence
  uint64_t next_id_ = 100;
};

}  // namespace

Result<std::unique_ptr<RemoteSource>> RemoteSource::open(const SnapshotLocation& loc, const RemoteOptions& options) {
  std::unique_ptr<RemoteSource> src(new RemoteSource());
  src->loc_ = loc;
  src->options_ = options;
  src->token_ = options.token;
  auto deadline = std::chrono::steady_clock::now() + options.deadline;
  size_t at = 0;
  LAZYMEM_ASSIGN_OR_RETURN(sys::UniqueFd fd, open_connection(loc, src->token_, deadline, 0, 0, &at));
  capnp::MallocMessageBuilder m;
  auto rq = m.initRoot<wire::Request>();
  rq.setId(3);
  rq.setGetManifest(loc.name);
  LAZYMEM_TRY(send_frame(fd.get(), m, {}, deadline));
  FrameBuffer buf;
  LAZYMEM_ASSIGN_OR_RETURN(OwnedFrame f, recv_frame(fd.get(), buf, deadline));
  LAZYMEM_TRY(f.header->read(peer(loc.at(at)), [&]() -> Status {
    auto reply = f.header->root<wire::Reply>();
    if (reply.isError()) return reply_error(loc.at(at), reply.getError());
    if (!reply.isManifest()) return Error(Errc::kProtocol, "page server: unexpected reply to getManifest");
    return ok_status();
  }));
  LAZYMEM_ASSIGN_OR_RETURN(src->manifest_, snapshot::decode_manifest(f.payload, loc.to_string()));
  return src;
}

Result<std::unique_ptr<snapshot::ChunkReader>> RemoteSource::open_reader() {
  auto r = std::make_unique<RemoteReader>(*this, loc_, token_, options_);
  LAZYMEM_TRY(r->start());
  return std::unique_ptr<snapshot::ChunkReader>(std::move(r));
}

Result<std::unique_ptr<snapshot::PageFetcher>> RemoteSource::open_page_fetcher() {
  LAZYMEM_ASSIGN_OR_RETURN(auto dict, dictionary());
  LAZYMEM_ASSIGN_OR_RETURN(auto f, RemotePageFetcher::open(loc_, token_, manifest_, std::move(dict), options_.deadline));
  return std::unique_ptr<snapshot::PageFetcher>(std::move(f));
}

}  // namespace lazymem::net
