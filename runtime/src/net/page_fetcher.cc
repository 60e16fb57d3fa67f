// RemotePageFetcher: getPage on the faulting thread (see page_fetcher.h).
#include "net/page_fetcher.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "net/client.h"
#include "net/frame.h"
#include "sys/clock.h"
#include "wire.capnp.h"

namespace lazymem::net {
namespace wire = proto::wire;
namespace {

constexpr uint32_t kMaxReplyHeader = 4096;
constexpr long kRecvSliceMs = 50;
constexpr int64_t kSpinNs = 50'000;  // a page reply header is ~64 bytes; an error's text more
// After an onStream notice, how many datagram waits (2-20 ms each) the fetcher gives the reply
// to start on its connection before asking there (a chunk may be being read from disk).
constexpr int64_t kAnnouncedWaits = 4;

void put_le32(std::byte* p, uint32_t v) noexcept {
  for (int i = 0; i < 4; ++i) p[i] = std::byte((v >> (8 * i)) & 0xff);
}
uint32_t get_le32(const std::byte* p) noexcept {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(p[i]) << (8 * i);
  return v;
}

// Waits for `events` on fd until the deadline; false on timeout or error.
bool wait_until(int fd, short events, int64_t deadline_ns) noexcept {
  for (;;) {
    int64_t left = deadline_ns - sys::monotonic_ns();
    if (left <= 0) return false;
    timespec ts{static_cast<time_t>(left / 1000000000), static_cast<long>(left % 1000000000)};
    pollfd p{fd, events, 0};
    int r = ::ppoll(&p, 1, &ts, nullptr);
    if (r > 0) return (p.revents & (POLLERR | POLLNVAL)) == 0 || (p.revents & events) != 0;
    if (r < 0 && errno != EINTR) return false;
  }
}

}  // namespace

RemotePageFetcher::RemotePageFetcher(const SnapshotLocation& loc, std::string token, const Manifest& manifest,
                                     std::shared_ptr<const snapshot::DecodeDictionary> dict)
    : loc_(loc), token_(std::move(token)), manifest_(manifest), dict_(std::move(dict)) {}

Result<std::unique_ptr<RemotePageFetcher>> RemotePageFetcher::open(const SnapshotLocation& loc, std::string token,
                                                                   const Manifest& manifest,
                                                                   std::shared_ptr<const snapshot::DecodeDictionary> dict,
                                                                   std::chrono::milliseconds timeout) {
  std::unique_ptr<RemotePageFetcher> f(new RemotePageFetcher(loc, std::move(token), manifest, std::move(dict)));
  if (::getrandom(&f->next_id_, sizeof f->next_id_, 0) != static_cast<ssize_t>(sizeof f->next_id_)) {
    return Error(Errc::kIo, fmt::format("page fetcher: no randomness for request ids: {}", std::strerror(errno)));
  }
  f->next_id_ >>= 1;  // never wraps to 0 in a lifetime
  if (loc.name.size() > 8 * (f->request_words_.size() - 16)) {
    return Error(Errc::kInvalidArgument, "snapshot name too long for a page request");
  }
  f->request_ = std::make_unique<capnp::MallocMessageBuilder>(kj::arrayPtr(f->request_words_.data(), f->request_words_.size()));
  auto rq = f->request_->initRoot<wire::Request>();
  auto gp = rq.initGetPage();
  gp.setSnapshot(loc.name);
  f->session_ = gp.initSession(16).begin();  // laid out now: a new session is copied in, not re-set
  gp.setReplyOnStream(true);
  auto segments = f->request_->getSegmentsForOutput();
  if (segments.size() != 1 || segments[0].begin() != f->request_words_.data()) {
    return Error(Errc::kInvalidArgument, "page request does not fit its buffer");
  }
  uint32_t seg_words = static_cast<uint32_t>(segments[0].size());
  put_le32(f->request_prefix_.data(), 8 + seg_words * 8);  // header: segment table + segment
  put_le32(f->request_prefix_.data() + 4, 0);              // no payload
  put_le32(f->request_prefix_.data() + 8, 0);              // one segment
  put_le32(f->request_prefix_.data() + 12, seg_words);

  uint64_t max_stored = 0;
  for (const RegionInfo& r : manifest.regions)
    for (const ChunkInfo& c : r.chunks) max_stored = std::max<uint64_t>(max_stored, c.stored_length);
  f->in_ = kj::heapArray<capnp::word>((kFramePrefix + kMaxReplyHeader + max_stored) / sizeof(capnp::word) + 1);
  f->chunk_.resize(manifest.chunk_size);
  LAZYMEM_TRY(f->reopen(timeout));
  return f;
}

Status RemotePageFetcher::reopen(std::chrono::milliseconds timeout) {
  fd_.reset();
  udp_.reset();
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  // Each reopen starts after the server last reached (SnapshotLocation::servers): one that
  // accepts and then fails, or refuses a page, is not the only one tried.
  auto fd = open_connection(loc_, token_, deadline, manifest_.checksum, next_first_, &server_);
  if (!fd.ok()) {
    ++next_first_;
    return std::move(fd).error();
  }
  fd_ = std::move(*fd);
  next_first_ = server_ + 1;
  if (Status s = open_datagrams(deadline); !s.ok()) {
    fd_.reset();  // an answer may still be on its way: start clean next time
    return s;
  }
  // Replies are waited for in a blocking recv() (one syscall, where poll() then recv() is two on
  // every fault), woken every kRecvSliceMs to check the deadline. Sends stay non-blocking.
  int flags = ::fcntl(fd_.get(), F_GETFL);
  timeval slice{0, kRecvSliceMs * 1000};
  if (flags < 0 || ::fcntl(fd_.get(), F_SETFL, flags & ~O_NONBLOCK) != 0 ||
      ::setsockopt(fd_.get(), SOL_SOCKET, SO_RCVTIMEO, &slice, sizeof slice) != 0) {
    const int e = errno;
    fd_.reset();
    return Error(Errc::kIo, fmt::format("page-server connection: socket options: {}", std::strerror(e)));
  }
  connection_first_id_ = next_id_;
  failure_ = "";
  return ok_status();
}

Status RemotePageFetcher::open_datagrams(std::chrono::steady_clock::time_point deadline) {
  capnp::MallocMessageBuilder m;
  auto rq = m.initRoot<wire::Request>();
  const uint64_t id = next_id_++;
  rq.setId(id);
  rq.setOpenDatagrams();
  const int64_t start = sys::monotonic_ns();
  FrameBuffer buf;
  LAZYMEM_TRY(send_frame(fd_.get(), m, {}, deadline));
  LAZYMEM_ASSIGN_OR_RETURN(OwnedFrame f, recv_frame(fd_.get(), buf, deadline));
  std::array<std::byte, 16> session;
  try {
    auto reply = f.header->root<wire::Reply>();
    if (reply.getId() != id) return Error(Errc::kProtocol, "page server answered another request than openDatagrams");
    if (!reply.isDatagrams() || reply.getDatagrams().getSession().size() != session.size()) {
      return ok_status();  // no datagrams here (an older server, or one without them): the connection alone
    }
    std::memcpy(session.data(), reply.getDatagrams().getSession().begin(), session.size());
    datagram_max_payload_ = reply.getDatagrams().getMaxPayload();
  } catch (const kj::Exception& e) {
    return Error(Errc::kProtocol, fmt::format("page server sent a malformed openDatagrams reply: {}", e.getDescription().cStr()));
  }
  // Wait for a datagram reply a few of this exchange's round trips (which includes the server's
  // turn), 2 to 20 ms: a lost one is asked for on the connection long before TCP would
  // retransmit (200 ms at least), and a network that loses them all costs little.
  datagram_wait_ns_ = std::clamp<int64_t>(4 * (sys::monotonic_ns() - start), 2'000'000, 20'000'000);
  sockaddr_storage peer{};
  socklen_t len = sizeof peer;
  if (::getpeername(fd_.get(), reinterpret_cast<sockaddr*>(&peer), &len) != 0) return ok_status();
  sys::UniqueFd udp(::socket(peer.ss_family, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  // Connected: the kernel passes us only datagrams from the server's address and port.
  if (!udp.valid() || ::connect(udp.get(), reinterpret_cast<sockaddr*>(&peer), len) != 0) return ok_status();
  std::memcpy(session_, session.data(), session.size());
  udp_ = std::move(udp);
  lost_in_row_ = 0;
  datagrams_off_until_ns_ = 0;
  datagrams_off_ns_ = 1'000'000'000;
  return ok_status();
}

snapshot::PageFetcher::Outcome RemotePageFetcher::broken(const char* why) noexcept {
  failure_ = why;
  fd_.reset();  // whatever is still on the wire belongs to no one: start clean
  return Outcome::kBroken;
}

snapshot::PageFetcher::Outcome RemotePageFetcher::bad(const char* why) noexcept {
  failure_ = why;
  return Outcome::kBad;
}

// Where there are several servers, one that cannot serve a page (another_server_may_serve, or
// it holds another version) is passed over: the connection is reopened to the next.
snapshot::PageFetcher::Outcome RemotePageFetcher::refused(const char* why) noexcept {
  if (loc_.more_servers.empty()) return bad(why);
  failure_ = why;
  fd_.reset();
  return Outcome::kRefused;
}

bool RemotePageFetcher::send_request(int64_t deadline_ns) noexcept {
  auto words = request_->getSegmentsForOutput()[0].asBytes();
  iovec iov[2] = {{request_prefix_.data(), request_prefix_.size()},
                  {const_cast<kj::byte*>(words.begin()), words.size()}};
  size_t total = request_prefix_.size() + words.size(), done = 0;
  while (done < total) {
    msghdr mh{};
    // Skip what was sent already (a partial send of a ~100-byte request is rare but legal).
    iovec rest[2];
    int n_iov = 0;
    size_t skip = done;
    for (const iovec& v : iov) {
      if (skip >= v.iov_len) {
        skip -= v.iov_len;
        continue;
      }
      rest[n_iov++] = {static_cast<char*>(v.iov_base) + skip, v.iov_len - skip};
      skip = 0;
    }
    mh.msg_iov = rest;
    mh.msg_iovlen = static_cast<size_t>(n_iov);
    ssize_t n = ::sendmsg(fd_.get(), &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      done += static_cast<size_t>(n);
    } else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
      if (!wait_until(fd_.get(), POLLOUT, deadline_ns)) return false;
    } else {
      return false;
    }
  }
  return true;
}

bool RemotePageFetcher::read_exactly(std::byte* to, size_t n, int64_t spin_until, int64_t deadline_ns) noexcept {
  size_t got = 0;
  while (got < n) {
    const bool spin = sys::monotonic_ns() < spin_until;
    ssize_t r = ::recv(fd_.get(), to + got, n - got, spin ? MSG_DONTWAIT : 0);
    if (r > 0) {
      got += static_cast<size_t>(r);
    } else if (r == 0) {
      failure_ = "page server closed the connection";
      return false;
    } else if (errno == EAGAIN || errno == EINTR) {
      if (!spin && sys::monotonic_ns() >= deadline_ns) {
        failure_ = "page server did not answer in time";
        return false;
      }
    } else {
      failure_ = "receive from page server failed";
      return false;
    }
  }
  return true;
}

bool RemotePageFetcher::reply_starts(int64_t until_ns) noexcept {
  const int64_t spin_until = sys::monotonic_ns() + kSpinNs;
  for (;;) {
    const int64_t now = sys::monotonic_ns();
    if (now >= until_ns) return false;
    if (now >= spin_until) return wait_until(fd_.get(), POLLIN, until_ns);
    std::byte b;
    ssize_t r = ::recv(fd_.get(), &b, 1, MSG_PEEK | MSG_DONTWAIT);
    if (r >= 0 || (errno != EAGAIN && errno != EINTR)) return true;  // bytes, the end, or an error: receive() tells
  }
}

bool RemotePageFetcher::receive(uint32_t& header_len, uint32_t& payload_len, int64_t deadline_ns) noexcept {
  auto* buf = reinterpret_cast<std::byte*>(in_.begin());
  const size_t cap = in_.size() * sizeof(capnp::word);
  // Spin first: the reply usually comes within a round trip, and a thread found running needs
  // no cross-CPU wake-up (~5-10 us here). The thread waits for its page either way; after
  // kSpinNs it sleeps in recv(), woken every kRecvSliceMs to check the deadline. The prefix is
  // read alone, then exactly the rest: another reply may follow this one on the connection.
  const int64_t spin_until = sys::monotonic_ns() + kSpinNs;
  if (!read_exactly(buf, kFramePrefix, spin_until, deadline_ns)) return false;
  header_len = get_le32(buf);
  payload_len = get_le32(buf + 4);
  if (header_len == 0 || header_len > kMaxReplyHeader || header_len % sizeof(capnp::word) != 0 ||
      kFramePrefix + size_t{header_len} + payload_len > cap) {
    failure_ = "page server sent a frame over the limits";
    return false;
  }
  return read_exactly(buf + kFramePrefix, size_t{header_len} + payload_len, spin_until, deadline_ns);
}

snapshot::PageFetcher::Outcome RemotePageFetcher::fetch(snapshot::ChunkRef ref, uint32_t page, std::span<std::byte> out,
                                                        int64_t deadline_ns) noexcept {
  if (fd_.get() < 0) return broken("not connected to the page server");
  const uint64_t id = next_id_++;
  auto rq = request_->getRoot<wire::Request>();
  rq.setId(id);
  auto gp = rq.getGetPage();
  gp.setRegion(ref.region);
  gp.setChunk(ref.chunk);
  gp.setPage(page);
  gp.setTag(id);
  datagrams_ = {};
  // Datagrams carry page frames only: a page that goes as its whole chunk is asked on the connection.
  const RegionInfo& region = manifest_.regions[ref.region];
  ByDatagram by = ByDatagram::kAsk;
  if (udp_.valid() && region.chunks[ref.chunk].codec == Codec::kZstdPages && region.page_size <= datagram_max_payload_ &&
      sys::monotonic_ns() >= datagrams_off_until_ns_) {
    Outcome done = Outcome::kOk;
    by = fetch_by_datagram(ref, page, out, deadline_ns, done);
    if (by == ByDatagram::kDone) return done;
  }
  // Announced but not coming (a forged notice: it needs only the id; a server that dropped the
  // job): asked after a while after all. Both answers are then safe: the second is skipped.
  if (by == ByDatagram::kComing &&
      !reply_starts(std::min(deadline_ns, sys::monotonic_ns() + kAnnouncedWaits * datagram_wait_ns_))) {
    by = ByDatagram::kAsk;
  }
  if (by == ByDatagram::kAsk && !send_request(deadline_ns)) return broken("send to page server failed");
  uint32_t header_len = 0, payload_len = 0;
  for (int skipped = 0;; ++skipped) {
    if (!receive(header_len, payload_len, deadline_ns)) return broken(failure_);
    // Checked before Cap'n Proto reads it: a malformed header would make it throw, and throwing
    // allocates (the thread may have faulted inside malloc).
    if (!shallow_structs_in_bounds(kj::arrayPtr(in_.begin() + 1, header_len / sizeof(capnp::word)))) {
      return broken("page server sent a malformed reply");
    }
    // An answer to an earlier request of this connection: a datagram's that the server sent
    // here (replyOnStream) while its onStream notice was lost or late and the fetcher, given
    // up waiting, asked again. Skipped; the answer to this request follows.
    capnp::FlatArrayMessageReader reader(kj::arrayPtr(in_.begin() + 1, header_len / sizeof(capnp::word)));
    const uint64_t answered = reader.getRoot<wire::Reply>().getId();
    if (answered < connection_first_id_ || answered >= id) break;
    if (skipped == 64) return broken("page server sent too many answers to earlier requests");
  }
  return use_reply(ref, page, out, header_len, payload_len);
}

RemotePageFetcher::ByDatagram RemotePageFetcher::fetch_by_datagram(snapshot::ChunkRef ref, uint32_t page,
                                                                   std::span<std::byte> out, int64_t deadline_ns,
                                                                   Outcome& done) noexcept {
  auto words = request_->getSegmentsForOutput()[0].asBytes();
  iovec iov[2] = {{request_prefix_.data(), request_prefix_.size()}, {const_cast<kj::byte*>(words.begin()), words.size()}};
  msghdr mh{};
  mh.msg_iov = iov;
  mh.msg_iovlen = 2;
  if (::sendmsg(udp_.get(), &mh, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) return ByDatagram::kAsk;
  const int64_t start = sys::monotonic_ns();
  const int64_t spin_until = start + kSpinNs, give_up = std::min(deadline_ns, start + datagram_wait_ns_);
  auto* buf = reinterpret_cast<std::byte*>(in_.begin());
  const size_t cap = in_.size() * sizeof(capnp::word);
  const uint64_t id = next_id_ - 1;
  int reads_past = 64;  // a bound: datagrams that keep coming cannot hold the fault past its wait
  for (;;) {
    // Spin first, as on the connection (receive()), then sleep in ppoll() until give_up. Past
    // it, what the socket holds is still read before the datagram counts as lost: a thread
    // that was not running when its reply came finds it there.
    const int64_t now = sys::monotonic_ns();
    const bool past = now >= give_up;
    if (past && reads_past-- == 0) break;
    if (!past && now >= spin_until) {
      timespec ts{0, static_cast<long>(std::min<int64_t>(give_up - now, 999'999'999))};
      pollfd p{udp_.get(), POLLIN, 0};
      if (::ppoll(&p, 1, &ts, nullptr) == 0) continue;
    }
    ssize_t n = ::recv(udp_.get(), buf, cap, MSG_DONTWAIT | MSG_TRUNC);
    if (n < 0) {
      if ((errno == EAGAIN || errno == EINTR) && !past) continue;
      break;  // nothing came in time; or ECONNREFUSED: the server's UDP port answered with an ICMP error
    }
    // Anything not a whole, well-formed reply to this request is skipped: a late reply to an
    // earlier one (asked again on the connection meanwhile), or junk.
    if (static_cast<size_t>(n) < kFramePrefix || static_cast<size_t>(n) > cap) continue;
    const uint32_t header_len = get_le32(buf), payload_len = get_le32(buf + 4);
    if (header_len == 0 || header_len > kMaxReplyHeader || header_len % sizeof(capnp::word) != 0 ||
        kFramePrefix + size_t{header_len} + payload_len != static_cast<size_t>(n) ||
        !shallow_structs_in_bounds(kj::arrayPtr(in_.begin() + 1, header_len / sizeof(capnp::word)))) {
      continue;
    }
    capnp::FlatArrayMessageReader reader(kj::arrayPtr(in_.begin() + 1, header_len / sizeof(capnp::word)));
    auto reply = reader.getRoot<wire::Reply>();
    // Not the answer to this request (late, or forged): skipped, the connection left alone. A
    // late one says the datagram given up on was slow, not lost (a server descheduled for a
    // time slice, say): the path works, so it does not count towards turning datagrams off.
    if (reply.getId() != id) {
      if (reply.getId() < id && reply.getId() + 64 >= id) lost_in_row_ = 0;
      continue;
    }
    if (reply.isError()) {
      if (reply.getError().getTag() != id) continue;
    } else if (!reply.isPage() || reply.getPage().getTag() != id || reply.getPage().getRegion() != ref.region ||
               reply.getPage().getChunk() != ref.chunk || reply.getPage().getPage() != page) {
      continue;
    }
    lost_in_row_ = 0;
    datagrams_off_ns_ = 1'000'000'000;
    if (reply.isError() && reply.getError().getCode() == wire::ErrorCode::USE_STREAM) return ByDatagram::kAsk;
    if (reply.isError() && reply.getError().getCode() == wire::ErrorCode::ON_STREAM) {
      datagrams_.on_connection = true;
      return ByDatagram::kComing;
    }
    datagrams_.answered = true;
    done = use_reply(ref, page, out, header_len, payload_len);
    return ByDatagram::kDone;
  }
  // Lost (the request or the reply), or late: asked again on the connection.
  datagrams_.lost = true;
  if (++lost_in_row_ >= 3) {
    lost_in_row_ = 0;
    datagrams_off_until_ns_ = sys::monotonic_ns() + datagrams_off_ns_;
    datagrams_off_ns_ = std::min<int64_t>(datagrams_off_ns_ * 2, 64'000'000'000);
  }
  return ByDatagram::kAsk;
}

snapshot::PageFetcher::Outcome RemotePageFetcher::use_reply(snapshot::ChunkRef ref, uint32_t page,
                                                            std::span<std::byte> out, uint32_t header_len,
                                                            uint32_t payload_len) noexcept {
  capnp::ReaderOptions opts;
  opts.traversalLimitInWords = header_len / sizeof(capnp::word) * 4 + 64;
  opts.nestingLimit = 8;
  capnp::FlatArrayMessageReader reader(kj::arrayPtr(in_.begin() + 1, header_len / sizeof(capnp::word)), opts);
  auto reply = reader.getRoot<wire::Reply>();
  if (reply.getId() != next_id_ - 1) return broken("page server answered another request");
  if (reply.isError()) {
    const auto code = reply.getError().getCode();
    const char* why = "the page server refused the page request";
    switch (code) {
      case wire::ErrorCode::NOT_FOUND: why = "the page server no longer has the snapshot"; break;
      case wire::ErrorCode::OUT_OF_RANGE: why = "the page server says the page is outside the snapshot"; break;
      case wire::ErrorCode::IO_ERROR: why = "the page server could not read the page"; break;
      case wire::ErrorCode::CORRUPT: why = "the page server holds the page corrupt"; break;
      case wire::ErrorCode::BUSY: why = "the page server is busy"; break;
      default: break;
    }
    return another_server_may_serve(code) ? refused(why) : bad(why);
  }
  if (!reply.isPage()) return broken("page server sent an unexpected reply");
  auto pr = reply.getPage();
  if (pr.getRegion() != ref.region || pr.getChunk() != ref.chunk || pr.getPage() != page || pr.getTag() != next_id_ - 1) {
    return broken("page server answered for another page");
  }
  const RegionInfo& region = manifest_.regions[ref.region];
  const ChunkInfo& info = region.chunks[ref.chunk];
  const uint32_t length = manifest_.chunk_length(ref.region, ref.chunk);
  std::span<const std::byte> payload(reinterpret_cast<const std::byte*>(in_.begin()) + kFramePrefix + header_len, payload_len);
  snapshot::ChunkLayout layout{region.page_size, dict_ ? dict_->get() : nullptr};
  received_ = kFramePrefix + header_len + payload_len;
  if (!pr.getWhole()) {
    if (info.codec != Codec::kZstdPages) return bad("page server sent a page frame of a chunk without page frames");
    // The frame's own checksum says it decodes to what the server holds; this says the server
    // holds what our manifest describes (a snapshot replaced under the same name would not).
    if (pr.getStoredChecksum() != info.stored_checksum) return refused("the page server holds another version of the snapshot");
    if (decoder_.decode_frame(payload, out, layout, snapshot::kFaultOnly)) return bad("a page frame failed its checksum");
    return Outcome::kOk;
  }
  if (info.codec == Codec::kZstdPages) {
    if (decoder_.verify_stored(info, payload, length, region.page_size, snapshot::kFaultOnly)) {
      return bad("a chunk failed its checksum");
    }
    if (decoder_.decode_page(payload, length, page, out, layout, snapshot::kFaultOnly)) return bad("a page failed to decode");
    return Outcome::kOk;
  }
  std::span<std::byte> whole(chunk_.data(), length);
  if (decoder_.decode(info, payload, whole, layout, snapshot::kFaultOnly)) return bad("a chunk failed its checksum");
  std::memcpy(out.data(), whole.data() + size_t{page} * region.page_size, out.size());
  return Outcome::kOk;
}

}  // namespace lazymem::net
