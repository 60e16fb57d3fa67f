// Dialer: non-blocking connect + hello + challenge-response to a page server.
#include "net/dialer.h"

#include <fmt/format.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>

#include <cerrno>
#include <cstring>

#include "net/client.h"
#include "sys/syscall_result.h"
#include "wire.capnp.h"

namespace lazymem::net {
namespace wire = proto::wire;

Result<sys::UniqueFd> start_connect(const SocketAddress& a) {
  sys::UniqueFd fd(::socket(a.addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd.valid()) return sys_error("socket", errno);
  int one = 1;
  ::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&a.addr), a.len) != 0 && errno != EINPROGRESS) {
    return sys_error("connect to page server", errno);
  }
  return fd;
}

Result<Dialer> Dialer::start(const SnapshotLocation& loc, const std::string& token, uint64_t reads,
                             size_t first_server) {
  Dialer d;
  d.loc_ = loc;
  d.token_ = token;
  d.reads_ = reads;
  const auto servers = loc.servers();
  d.first_server_ = first_server % servers.size();
  for (size_t k = 0; k < servers.size(); ++k) d.order_.push_back(servers[(first_server + k) % servers.size()]);
  LAZYMEM_TRY(d.connect_next());
  return d;
}

// The next address to connect to: the current server's next, or the next server's first. Each
// server's name is looked up when its turn comes (a slow name further down the list must not hold
// up the first server), in the background (kResolving) unless it is a numeric address.
Status Dialer::connect_next() {
  for (;;) {
    while (next_addr_ < addrs_.size()) {
      auto fd = start_connect(addrs_[next_addr_++]);
      if (fd.ok()) {
        fd_ = std::move(*fd);
        phase_ = Phase::kConnecting;
        return ok_status();
      }
      last_ = std::move(fd).error().wrap(fmt::format("page server {}", server_));
    }
    if (next_server_ >= order_.size()) break;
    const SnapshotLocation::Server& s = order_[next_server_++];
    server_ = s.to_string();
    addrs_.clear();
    next_addr_ = 0;
    if (lookup_) retired_lookups_.push_back(std::move(lookup_));  // see take_lookup
    lookup_ = Lookup::start(s.host, s.port);
    if (!lookup_->done()) {
      fd_.reset();
      phase_ = Phase::kResolving;
      return ok_status();
    }
    take_lookup();
  }
  return last_ ? *last_ : Error(Errc::kPeerGone, fmt::format("page server {}: no address", server_));
}

// The lookup itself is kept until the step after the next server's lookup starts, or the dialer's
// end: a caller that watched its descriptor takes it out of its set after this step, and the
// descriptor must still be the lookup's then (closed, its number could be another file's).
void Dialer::take_lookup() {
  const auto& r = lookup_->result();
  if (r.ok()) {
    addrs_ = *r;
  } else {
    last_ = r.error();
  }
}

Error Dialer::timed_out() const {
  return Error(Errc::kTimeout, fmt::format("page server {}: timed out {}", server_, doing()));
}

short Dialer::events() const { return phase_ == Phase::kConnecting || phase_ == Phase::kSending ? POLLOUT : POLLIN; }

const char* Dialer::doing() const {
  switch (phase_) {
    case Phase::kResolving: return "looking up the server's name";
    case Phase::kConnecting: return "connecting";
    case Phase::kSending: return "sending the handshake";
    case Phase::kAwaitHello: return "waiting for the server's hello";
    case Phase::kAwaitAuth: return "waiting for the token check";
    case Phase::kDone: break;
  }
  return "connected";
}

void Dialer::send_next(capnp::MessageBuilder& m, Phase after) {
  out_ = encode_frame(m, 0);
  out_off_ = 0;
  phase_ = Phase::kSending;
  after_send_ = after;
}

Result<bool> Dialer::on_reply(Header& h) {
  auto reply = h.root<wire::Reply>();
  if (reply.isError()) return reply_error(loc_.at(server()), reply.getError());
  if (phase_ == Phase::kAwaitAuth) {
    // It must prove it holds the token too: whoever answers at the address supplies the
    // manifest, and with it every page.
    if (reply.isOk()) {
      return Error(Errc::kPermission, fmt::format("page server {} accepted the token without proving it holds it "
                                                  "(a lazymem older than this client): upgrade it",
                                                  server_));
    }
    if (!reply.isAuthenticated()) return Error(Errc::kProtocol, "page server: unexpected reply to authenticate");
    auto proof = reply.getAuthenticated();
    const Mac want = server_proof(token_, server_nonce_, client_nonce_);
    if (!mac_equal(std::span(reinterpret_cast<const std::byte*>(proof.begin()), proof.size()), want)) {
      return Error(Errc::kPermission, fmt::format("page server {} does not hold the token: it is not the server the "
                                                  "token is for (a port taken over, a name pointed elsewhere?)",
                                                  server_));
    }
    phase_ = Phase::kDone;
    return true;
  }
  if (!reply.isHello()) return Error(Errc::kProtocol, "page server: unexpected reply to hello");
  auto hr = reply.getHello();
  takes_complete_ = hr.getTakesComplete();
  if (!hr.getAuthRequired()) {
    if (!token_.empty()) {
      return Error(Errc::kPermission,
                   fmt::format("page server {} does not ask for a token, so it cannot prove it is the server the "
                               "token is for: give it the same --token-file, or restore without one",
                               server_));
    }
    phase_ = Phase::kDone;
    return true;
  }
  if (token_.empty()) {
    return Error(Errc::kPermission,
                 fmt::format("page server {} requires a token; pass --token-file", server_));
  }
  auto sn = hr.getServerNonce();
  if (sn.size() != server_nonce_.size()) return Error(Errc::kProtocol, "page server: its nonce is not 32 bytes");
  std::memcpy(server_nonce_.data(), sn.begin(), sn.size());
  Mac mac = auth_mac(token_, server_nonce_, client_nonce_);
  capnp::MallocMessageBuilder m;
  auto rq = m.initRoot<wire::Request>();
  rq.setId(2);
  rq.setAuthenticate(capnp::Data::Reader(reinterpret_cast<const kj::byte*>(mac.data()), mac.size()));
  send_next(m, Phase::kAwaitAuth);
  return false;
}

Result<bool> Dialer::step() {
  retired_lookups_.clear();  // the caller has watched what the last step left since
  for (;;) {
    switch (phase_) {
      case Phase::kDone:
        return true;
      case Phase::kResolving:
        if (!lookup_->done()) return false;
        take_lookup();
        LAZYMEM_TRY(connect_next());
        continue;
      case Phase::kConnecting: {
        pollfd p{fd_.get(), POLLOUT, 0};
        if (::poll(&p, 1, 0) == 0) return false;  // still connecting
        int err = 0;
        socklen_t len = sizeof err;
        ::getsockopt(fd_.get(), SOL_SOCKET, SO_ERROR, &err, &len);
        if (err != 0) {
          last_ = sys_error(fmt::format("connect to page server {} (is it running?)", server_), err);
          LAZYMEM_TRY(connect_next());  // nothing left to try: the last failure says most
          continue;
        }
        client_nonce_ = random_nonce();
        capnp::MallocMessageBuilder m;
        auto rq = m.initRoot<wire::Request>();
        rq.setId(1);
        auto h = rq.initHello();
        h.setVersion(wire::PROTOCOL_VERSION);
        h.setReadsCorrupt(true);
        h.setProveServer(!token_.empty());
        h.setClientNonce(capnp::Data::Reader(reinterpret_cast<const kj::byte*>(client_nonce_.data()), client_nonce_.size()));
        if (reads_ != 0) {
          h.setSnapshot(loc_.name);
          h.setManifestChecksum(reads_);
        }
        send_next(m, Phase::kAwaitHello);
        continue;
      }
      case Phase::kSending: {
        ssize_t n = ::send(fd_.get(), out_.data() + out_off_, out_.size() - out_off_, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
          if (errno == EAGAIN || errno == EINTR) return false;
          return sys_error(fmt::format("send to page server {}", server_), errno);
        }
        out_off_ += static_cast<size_t>(n);
        if (out_off_ == out_.size()) phase_ = after_send_;
        continue;
      }
      case Phase::kAwaitHello:
      case Phase::kAwaitAuth: {
        auto f = in_.next();
        if (!f.ok()) return std::move(f).error();
        if (f->has_value()) {
          LAZYMEM_ASSIGN_OR_RETURN(auto h, Header::parse((*f)->header));
          in_.consume();
          LAZYMEM_ASSIGN_OR_RETURN(bool done, h->read(peer(loc_.at(server())), [&] { return on_reply(*h); }));
          if (done) return true;
          continue;
        }
        auto space = in_.writable(4096);
        ssize_t n = ::recv(fd_.get(), space.data(), space.size(), MSG_DONTWAIT);
        if (n == 0) {
          return Error(Errc::kPeerGone,
                       fmt::format("page server {} closed the connection during the handshake", server_));
        }
        if (n < 0) {
          if (errno == EAGAIN || errno == EINTR) return false;
          return sys_error(fmt::format("receive from page server {}", server_), errno);
        }
        in_.commit(static_cast<size_t>(n));
        continue;
      }
    }
  }
}

}  // namespace lazymem::net
