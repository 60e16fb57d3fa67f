// MemoryServer (the migration source) against the real page-server client: a snapshot whose
// chunks are this process's memory restored lazily through it, every byte compared; tokens;
// wait_drained; the protocol's replies one by one; backpressure and demand order; hostile peers.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "../common/test_data.h"
#include "lazymem/kernel_features.h"
#include "lazymem/restore.h"
#include "lazymem/snapshot.h"
#include "net/client.h"
#include "net/frame.h"
#include "net/memory_server.h"
#include "snapshot/chunk_codec.h"
#include "snapshot/manifest.h"
#include "sys/unique_fd.h"
#include "wire.capnp.h"

namespace lazymem {
namespace {

namespace wire = proto::wire;
using namespace std::chrono_literals;
using testing::ScratchDir;
constexpr size_t kPage = 4096;
constexpr uint32_t kChunk = 64 * 1024;
constexpr const char* kName = "live";

// A connection speaking the wire protocol by hand: what a hostile or a curious peer sends.
struct RawPeer {
  sys::UniqueFd fd;
  net::FrameBuffer buf;
  uint64_t next_id = 1;

  // `rcvbuf` (non-zero): a small receive buffer, so that the server's replies back up sooner.
  static RawPeer connect(uint16_t port, int rcvbuf = 0) {
    RawPeer p;
    p.fd.reset(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (rcvbuf != 0) ::setsockopt(p.fd.get(), SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(::connect(p.fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a), 0) << std::strerror(errno);
    ::fcntl(p.fd.get(), F_SETFL, ::fcntl(p.fd.get(), F_GETFL) | O_NONBLOCK);
    return p;
  }
  static net::Deadline deadline() { return std::chrono::steady_clock::now() + 10s; }
  void send_bytes(const void* data, size_t n) { ASSERT_EQ(::send(fd.get(), data, n, MSG_NOSIGNAL), static_cast<ssize_t>(n)); }
  Status send(capnp::MessageBuilder& m) { return net::send_frame(fd.get(), m, {}, deadline()); }
  Result<net::OwnedFrame> recv() { return net::recv_frame(fd.get(), buf, deadline()); }

  Status hello(uint32_t version = wire::PROTOCOL_VERSION, const std::string& snapshot = "", uint64_t checksum = 0) {
    capnp::MallocMessageBuilder m;
    auto rq = m.initRoot<wire::Request>();
    rq.setId(next_id++);
    auto h = rq.initHello();
    h.setVersion(version);
    std::vector<kj::byte> nonce(32, 7);
    h.setClientNonce(kj::arrayPtr(nonce.data(), nonce.size()));
    if (!snapshot.empty()) {
      h.setSnapshot(snapshot);
      h.setManifestChecksum(checksum);
    }
    return send(m);
  }
  // Sends hello and reads the server's answer.
  void greet() {
    ASSERT_TRUE(hello().ok());
    auto f = recv();
    ASSERT_TRUE(f.ok()) << f.error().message();
    ASSERT_TRUE(f->header->root<wire::Reply>().isHello());
  }

  // Whether the server closes the connection (whatever it sent first is read and dropped).
  bool closed_by_server() {
    const auto until = std::chrono::steady_clock::now() + 10s;
    char junk[65536];
    while (std::chrono::steady_clock::now() < until) {
      pollfd p{fd.get(), POLLIN, 0};
      if (::poll(&p, 1, 100) <= 0) continue;
      const ssize_t n = ::recv(fd.get(), junk, sizeof junk, 0);
      if (n == 0 || (n < 0 && errno == ECONNRESET)) return true;
    }
    return false;
  }
};

// The source: two regions of this process's memory (one with a short last chunk), patterned
// bytes with all-zero chunks among them, and a manifest written by hand that places them at
// other addresses (free ones: the restore maps them there, in this same process).
class MemoryServerTest : public ::testing::Test {
 protected:
  struct Source {
    std::string name;
    size_t length;
    std::byte* memory = nullptr;  // where its bytes are (the "paused process")
    uint64_t restore_at = 0;      // where the manifest says it was
  };

  void SetUp() override {
    kf_ = probe_kernel();
    sources_ = {{"heap", 4 << 20}, {"stack", 200 << 10}};  // 64 chunks; 3 whole and one of 8 KiB
    uint64_t data_at = 0;
    manifest_.chunk_size = kChunk;
    manifest_.created_unix_ns = 1'700'000'000'000'000'000ULL;
    for (size_t i = 0; i < sources_.size(); ++i) {
      Source& s = sources_[i];
      void* p = ::mmap(nullptr, s.length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      ASSERT_NE(p, MAP_FAILED);
      s.memory = static_cast<std::byte*>(p);
      std::mt19937_64 rng(60 + i);
      for (size_t off = 0; off < s.length; off += 8) {
        const uint64_t chunk = off / kChunk;
        const uint64_t v = chunk % 5 == 2 ? 0 : rng();  // every fifth chunk all zero
        std::memcpy(s.memory + off, &v, 8);
      }
      // A free range far from malloc's (see map_for_capture), left free for the restore.
      void* at = testing::map_for_capture(s.length, 50 + i);
      ASSERT_NE(at, nullptr);
      ::munmap(at, s.length);
      s.restore_at = reinterpret_cast<uint64_t>(at);

      RegionInfo r;
      r.name = s.name;
      r.start_address = s.restore_at;
      r.length = s.length;
      for (size_t off = 0, k = 0; off < s.length; off += kChunk, ++k) {
        auto bytes = chunk(i, k, std::min<size_t>(kChunk, s.length - off));
        ChunkInfo c;
        if (!snapshot::is_all_zero(bytes)) {
          c.codec = Codec::kRaw;
          c.offset = data_at + off;
          c.stored_length = static_cast<uint32_t>(bytes.size());
          c.checksum = snapshot::chunk_checksum(bytes);
        }
        r.chunks.push_back(c);
      }
      data_at += s.length;
      manifest_.regions.push_back(std::move(r));
    }
    manifest_.data_length = data_at;
    manifest_file_ = snapshot::encode_manifest(manifest_);
    auto back = snapshot::decode_manifest(manifest_file_, "test");
    ASSERT_TRUE(back.ok()) << back.error().message();
    checksum_ = back->checksum;
  }
  void TearDown() override {
    server_.reset();
    for (Source& s : sources_)
      if (s.memory) ::munmap(s.memory, s.length);
  }

  std::span<const std::byte> chunk(size_t region, size_t k, size_t len) const {
    return {sources_[region].memory + k * kChunk, len};
  }
  uint64_t raw_chunks() const {
    uint64_t n = 0;
    for (const RegionInfo& r : manifest_.regions)
      for (const ChunkInfo& c : r.chunks) n += c.codec != Codec::kZero;
    return n;
  }

  // `hold_back`: a chunk (region, chunk) whose bytes are not given: not served.
  void start_server(net::MemoryServerOptions o = {}, std::optional<std::pair<uint32_t, uint32_t>> hold_back = {}) {
    o.listen = "127.0.0.1:0";
    auto s = net::MemoryServer::start(
        kName, manifest_file_,
        [this, hold_back](uint32_t region, uint32_t k) -> std::span<const std::byte> {
          if (hold_back && hold_back->first == region && hold_back->second == k) return {};
          return chunk(region, k, manifest_.chunk_length(region, k));
        },
        o);
    ASSERT_TRUE(s.ok()) << s.error().message();
    server_ = std::move(*s);
  }
  std::string uri() const { return fmt::format("lazymem://127.0.0.1:{}/{}", server_->port(), kName); }

  // Restores through the server, touches every page, compares it with the source memory, then
  // finishes the restore and lets it go (its connections close).
  void restore_and_compare(const RestoreOptions& o) {
    auto r = LazyRestore::start(uri(), kf_, o);
    ASSERT_TRUE(r.ok()) << r.error().message();
    for (const Source& s : sources_) {
      const RestoredRegion* got = (*r)->region(s.name);
      ASSERT_NE(got, nullptr) << s.name;
      ASSERT_EQ(reinterpret_cast<uint64_t>(got->address), s.restore_at) << s.name;
      ASSERT_EQ(got->length, s.length);
      const auto* p = static_cast<const std::byte*>(got->address);
      for (size_t off = 0; off < s.length; off += kPage) {
        ASSERT_EQ(std::memcmp(p + off, s.memory + off, kPage), 0) << s.name << " page at " << off;
      }
    }
    ASSERT_TRUE((*r)->finish().ok());
    std::vector<RestoredRegion> regions = (*r)->regions();
    r->reset();
    for (const RestoredRegion& g : regions) ::munmap(g.address, g.length);
  }

  // A token file in the scratch directory.
  std::string token_file(const std::string& token) {
    std::string path = dir_.path() + "/token-" + std::to_string(tokens_++);
    std::ofstream(path) << token << "\n";
    return path;
  }

  KernelFeatures kf_;
  ScratchDir dir_;
  std::vector<Source> sources_;
  Manifest manifest_;
  std::vector<std::byte> manifest_file_;
  uint64_t checksum_ = 0;
  int tokens_ = 0;
  std::unique_ptr<net::MemoryServer> server_;
};

#define SKIP_WITHOUT_UFFD() \
  if (!kf_.uffd_usable) GTEST_SKIP() << "userfaultfd unusable: " << kf_.uffd_error

// The destination's ordinary restore, demand faults only and with prefetch: every byte is the
// source memory's, and once the restore is done and gone the server is drained.
TEST_F(MemoryServerTest, RestoresEveryByteOfTheProcessMemory) {
  SKIP_WITHOUT_UFFD();
  start_server();
  EXPECT_EQ(server_->stats().chunks_to_serve, raw_chunks());
  for (bool prefetch : {false, true}) {
    SCOPED_TRACE(prefetch ? "prefetch" : "demand only");
    RestoreOptions o;
    o.prefetch = prefetch;
    restore_and_compare(o);
    Status drained = server_->wait_drained(10s);
    EXPECT_TRUE(drained.ok()) << drained.error().message();
  }
  auto st = server_->stats();
  EXPECT_EQ(st.distinct_chunks_sent, raw_chunks());
  EXPECT_GE(st.chunks_sent, 2 * raw_chunks());  // both restores fetched everything
  EXPECT_EQ(st.open_connections, 0u);
  EXPECT_EQ(st.errors_protocol + st.errors_auth + st.errors_range + st.errors_not_found, 0u);
}

// Faults served on the faulting thread: getPage on the connection (openDatagrams is refused).
TEST_F(MemoryServerTest, RestoresWithFaultsOnTheFaultingThread) {
  SKIP_WITHOUT_UFFD();
  if (!kf_.has_uffd_feature(UFFD_FEATURE_SIGBUS)) GTEST_SKIP() << "userfaultfd lacks UFFD_FEATURE_SIGBUS";
  start_server();
  RestoreOptions o;
  o.fault_on_thread = true;
  o.prefetch = false;
  restore_and_compare(o);
  Status drained = server_->wait_drained(10s);
  EXPECT_TRUE(drained.ok()) << drained.error().message();
  auto st = server_->stats();
  EXPECT_EQ(st.distinct_chunks_sent, raw_chunks());
  // Each fault asked for its page (a thread installs that page alone); finish() then fetches
  // the chunks still partly missing with getChunks.
  EXPECT_GE(st.pages_sent, raw_chunks()) << "the faulting threads asked for their pages";
  EXPECT_EQ(st.errors_protocol + st.errors_auth + st.errors_range + st.errors_not_found, 0u);
}

TEST_F(MemoryServerTest, TokenIsRequiredAndAWrongOneRefused) {
  SKIP_WITHOUT_UFFD();
  net::MemoryServerOptions o;
  o.token = "0123456789abcdef-migration";
  start_server(o);
  RestoreOptions wrong;
  wrong.token_file = token_file("0123456789abcdef-something-else");
  auto r = LazyRestore::start(uri(), kf_, wrong);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::kPermission) << r.error().message();
  EXPECT_NE(r.error().message().find("wrong token"), std::string::npos) << r.error().message();
  EXPECT_GE(server_->stats().errors_auth, 1u);

  auto none = LazyRestore::start(uri(), kf_, RestoreOptions{});
  ASSERT_FALSE(none.ok());
  EXPECT_NE(none.error().message().find("requires a token"), std::string::npos) << none.error().message();

  RestoreOptions right;
  right.token_file = token_file(o.token);
  restore_and_compare(right);
  Status drained = server_->wait_drained(10s);
  EXPECT_TRUE(drained.ok()) << drained.error().message();
}

// A request from a peer that said hello but did not authenticate is refused, and it is closed.
TEST_F(MemoryServerTest, RequestBeforeAuthenticatingIsRefused) {
  net::MemoryServerOptions o;
  o.token = "0123456789abcdef-migration";
  start_server(o);
  RawPeer p = RawPeer::connect(server_->port());
  ASSERT_TRUE(p.hello().ok());
  auto h = p.recv();
  ASSERT_TRUE(h.ok()) << h.error().message();
  EXPECT_TRUE(h->header->root<wire::Reply>().getHello().getAuthRequired());
  capnp::MallocMessageBuilder m;
  m.initRoot<wire::Request>().setId(9);
  m.getRoot<wire::Request>().initGetChunks().setSnapshot(kName);
  ASSERT_TRUE(p.send(m).ok());
  auto f = p.recv();
  ASSERT_TRUE(f.ok()) << f.error().message();
  auto reply = f->header->root<wire::Reply>();
  ASSERT_TRUE(reply.isError());
  EXPECT_EQ(reply.getError().getCode(), wire::ErrorCode::AUTH_REQUIRED);
  EXPECT_TRUE(p.closed_by_server());
  EXPECT_EQ(server_->stats().errors_auth, 1u);
  EXPECT_EQ(server_->stats().chunks_sent, 0u);
}

TEST_F(MemoryServerTest, WaitDrainedTimesOutSayingWhatWasNeverSent) {
  start_server();
  RawPeer idle = RawPeer::connect(server_->port());
  idle.greet();
  Status s = server_->wait_drained(50ms);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.error().code(), Errc::kTimeout);
  const std::string want = fmt::format("{} of its {} chunks were never sent", raw_chunks(), raw_chunks());
  EXPECT_NE(s.error().message().find(want), std::string::npos) << s.error().message();
  EXPECT_NE(s.error().message().find("1 connections are open"), std::string::npos) << s.error().message();
}

// Every chunk sent is not enough: the destination must also have read the manifest and hung up.
TEST_F(MemoryServerTest, WaitDrainedWaitsForTheDestinationToHangUp) {
  start_server();
  std::optional<RawPeer> p = RawPeer::connect(server_->port());
  p->greet();
  {
    capnp::MallocMessageBuilder gm;
    auto rq = gm.initRoot<wire::Request>();
    rq.setId(7);
    rq.setGetManifest(kName);
    ASSERT_TRUE(p->send(gm).ok());
    ASSERT_TRUE(p->recv().ok());
  }
  capnp::MallocMessageBuilder m;
  auto gc = m.initRoot<wire::Request>().initGetChunks();
  gc.setSnapshot(kName);
  auto ids = gc.initChunks(static_cast<unsigned>(raw_chunks()));
  unsigned n = 0;
  for (uint32_t r = 0; r < manifest_.regions.size(); ++r) {
    for (uint32_t k = 0; k < manifest_.regions[r].chunks.size(); ++k) {
      if (manifest_.regions[r].chunks[k].codec == Codec::kZero) continue;
      ids[n].setRegion(r);
      ids[n].setChunk(k);
      ids[n].setTag(n);
      ++n;
    }
  }
  ASSERT_TRUE(p->send(m).ok());
  for (unsigned i = 0; i < n; ++i) ASSERT_TRUE(p->recv().ok());
  Status open = server_->wait_drained(50ms);
  ASSERT_FALSE(open.ok());
  EXPECT_NE(open.error().message().find("0 of its"), std::string::npos) << open.error().message();
  EXPECT_NE(open.error().message().find("1 connections are open"), std::string::npos) << open.error().message();
  p.reset();
  Status drained = server_->wait_drained(10s);
  EXPECT_TRUE(drained.ok()) << drained.error().message();
  EXPECT_EQ(server_->stats().distinct_chunks_sent, raw_chunks());
}

// A restore whose every page is present says so as it closes (Request.complete), and the source
// is drained at once: with a linger no test outlasts, only that ends the wait in time. For each
// way a restore can fetch.
TEST_F(MemoryServerTest, ACompleteRestoreSaysSoAndTheSourceIsDrainedAtOnce) {
  SKIP_WITHOUT_UFFD();
  struct Way {
    const char* name;
    bool prefetch, fault_on_thread;
  };
  for (const Way& w : {Way{"prefetch", true, false}, Way{"demand only", false, false},
                       Way{"faults on the faulting thread", false, true}}) {
    SCOPED_TRACE(w.name);
    if (w.fault_on_thread && !kf_.has_uffd_feature(UFFD_FEATURE_SIGBUS)) continue;
    net::MemoryServerOptions so;
    so.linger = std::chrono::hours(1);
    start_server(so);
    RestoreOptions o;
    o.prefetch = w.prefetch;
    o.fault_on_thread = w.fault_on_thread;
    restore_and_compare(o);
    Status drained = server_->wait_drained(20s);
    EXPECT_TRUE(drained.ok()) << drained.error().message();
    auto st = server_->stats();
    EXPECT_EQ(st.restores_completed, 1u);
    EXPECT_EQ(st.distinct_chunks_sent, raw_chunks());
    EXPECT_EQ(st.errors_protocol + st.errors_auth + st.errors_range + st.errors_not_found, 0u);
  }
}

// A restore that could not have every page (a chunk the source does not serve: poisoned) says
// nothing: the pages it lacks may be the source's to give, and a source that waits is left
// paused for whoever decides which copy runs, where one told "complete" would be let go.
TEST_F(MemoryServerTest, ARestoreWithFailedPagesDoesNotSayComplete) {
  SKIP_WITHOUT_UFFD();
  if (!kf_.has_uffd_poison()) GTEST_SKIP() << "kernel lacks UFFDIO_POISON (Linux 6.6): the failure would kill the test";
  net::MemoryServerOptions so;
  so.linger = std::chrono::hours(1);
  start_server(so, std::make_pair(0u, 1u));  // chunk 0/1 not served
  auto r = LazyRestore::start(uri(), kf_, RestoreOptions{});
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_FALSE((*r)->finish().ok()) << "the chunk not served went unreported";
  std::vector<RestoredRegion> regions = (*r)->regions();
  r->reset();
  for (const RestoredRegion& g : regions) ::munmap(g.address, g.length);
  Status s = server_->wait_drained(300ms);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.error().code(), Errc::kTimeout) << s.error().message();
  EXPECT_EQ(server_->stats().restores_completed, 0u);
}

// `complete` counts only from a peer that read this snapshot's manifest, and needs no reply.
TEST_F(MemoryServerTest, CompleteIsTakenOnlyAfterTheManifestWasRead) {
  net::MemoryServerOptions so;
  so.linger = std::chrono::hours(1);
  start_server(so);
  RawPeer p = RawPeer::connect(server_->port());
  ASSERT_TRUE(p.hello().ok());
  auto h = p.recv();
  ASSERT_TRUE(h.ok()) << h.error().message();
  EXPECT_TRUE(h->header->root<wire::Reply>().getHello().getTakesComplete());
  auto say = [&](const char* name) {
    capnp::MallocMessageBuilder m;
    auto rq = m.initRoot<wire::Request>();
    rq.setId(p.next_id++);
    rq.setComplete(name);
    ASSERT_TRUE(p.send(m).ok());
  };
  auto refused = [&](wire::ErrorCode code) {
    auto f = p.recv();
    ASSERT_TRUE(f.ok()) << f.error().message();
    auto r = f->header->root<wire::Reply>();
    ASSERT_TRUE(r.isError());
    EXPECT_EQ(r.getError().getCode(), code) << r.getError().getMessage().cStr();
  };
  // Another connection reading (a restore's page fetchers, a second destination): the first's
  // word does not end post-copy under it; its hanging up does, with no linger.
  RawPeer other = RawPeer::connect(server_->port());
  other.greet();
  {
    capnp::MallocMessageBuilder m;
    auto gp = m.initRoot<wire::Request>();
    gp.setId(other.next_id++);
    auto g = gp.initGetPage();
    g.setSnapshot(kName);
    g.setRegion(0);
    g.setChunk(0);
    g.setTag(1);
    ASSERT_TRUE(other.send(m).ok());
    ASSERT_TRUE(other.recv().ok());
  }
  say("another");
  refused(wire::ErrorCode::NOT_FOUND);
  say(kName);  // before any destination read the manifest
  refused(wire::ErrorCode::BAD_REQUEST);
  Status early = server_->wait_drained(50ms);
  ASSERT_FALSE(early.ok());
  EXPECT_EQ(early.error().code(), Errc::kTimeout);

  capnp::MallocMessageBuilder gm;
  auto rq = gm.initRoot<wire::Request>();
  rq.setId(p.next_id++);
  rq.setGetManifest(kName);
  ASSERT_TRUE(p.send(gm).ok());
  ASSERT_TRUE(p.recv().ok());
  say(kName);
  Status reading = server_->wait_drained(50ms);
  ASSERT_FALSE(reading.ok()) << "drained while another connection was reading";
  ::shutdown(other.fd.get(), SHUT_RDWR);
  Status drained = server_->wait_drained(10s);  // this connection still open, one chunk sent
  EXPECT_TRUE(drained.ok()) << drained.error().message();
  auto st = server_->stats();
  EXPECT_EQ(st.restores_completed, 1u);
  EXPECT_EQ(st.errors_not_found, 1u);
  EXPECT_EQ(st.errors_protocol, 1u);
  EXPECT_EQ(st.open_connections, 1u);
  pollfd pfd{p.fd.get(), POLLIN, 0};
  EXPECT_EQ(::poll(&pfd, 1, 0), 0) << "complete is not answered";
}

// Every kind of request, read back by hand: what the client relies on, field by field.
TEST_F(MemoryServerTest, AnswersEachRequestAsThePageServerDoes) {
  start_server({}, std::make_pair(0u, 1u));  // chunk 0/1 not served
  EXPECT_EQ(server_->stats().chunks_to_serve, raw_chunks() - 1);
  RawPeer p = RawPeer::connect(server_->port());
  ASSERT_TRUE(p.hello().ok());
  auto h = p.recv();
  ASSERT_TRUE(h.ok()) << h.error().message();
  auto hello = h->header->root<wire::Reply>().getHello();
  EXPECT_EQ(hello.getVersion(), wire::PROTOCOL_VERSION);
  EXPECT_EQ(hello.getServerNonce().size(), 32u);
  EXPECT_FALSE(hello.getAuthRequired());
  auto ask = [&](auto&& fill) -> net::OwnedFrame {
    capnp::MallocMessageBuilder m;
    auto rq = m.initRoot<wire::Request>();
    rq.setId(p.next_id++);
    fill(rq);
    EXPECT_TRUE(p.send(m).ok());
    auto f = p.recv();
    EXPECT_TRUE(f.ok()) << f.error().message();
    EXPECT_EQ(f->header->root<wire::Reply>().getId(), p.next_id - 1);
    return std::move(*f);
  };

  {
    auto f = ask([](wire::Request::Builder rq) { rq.setList(); });
    auto list = f.header->root<wire::Reply>().getSnapshots();
    ASSERT_EQ(list.size(), 1u);
    EXPECT_EQ(std::string(list[0].getName().cStr()), kName);
    EXPECT_EQ(list[0].getRegions(), 2u);
    EXPECT_EQ(list[0].getTotalBytes(), manifest_.total_bytes());
    EXPECT_EQ(list[0].getStoredBytes(), manifest_.stored_bytes());
    EXPECT_EQ(list[0].getCreatedUnixNs(), manifest_.created_unix_ns);
    EXPECT_EQ(list[0].getFormatVersion(), snapshot::kFormatVersion);
  }
  {
    auto f = ask([](wire::Request::Builder rq) { rq.setGetManifest(kName); });
    EXPECT_TRUE(f.header->root<wire::Reply>().isManifest());
    EXPECT_EQ(f.payload, manifest_file_);
    auto other = ask([](wire::Request::Builder rq) { rq.setGetManifest("another"); });
    ASSERT_TRUE(other.header->root<wire::Reply>().isError());
    EXPECT_EQ(other.header->root<wire::Reply>().getError().getCode(), wire::ErrorCode::NOT_FOUND);
  }
  {
    // One served chunk, the short last one of region 1, a zero chunk, one outside, one held back.
    capnp::MallocMessageBuilder m;
    auto rq = m.initRoot<wire::Request>();
    rq.setId(100);
    auto gc = rq.initGetChunks();
    gc.setSnapshot(kName);
    gc.setDemand(true);
    auto ids = gc.initChunks(5);
    const uint32_t want[5][2] = {{0, 3}, {1, 3}, {0, 2}, {2, 0}, {0, 1}};
    for (unsigned i = 0; i < 5; ++i) {
      ids[i].setRegion(want[i][0]);
      ids[i].setChunk(want[i][1]);
      ids[i].setTag(500 + i);
    }
    ASSERT_TRUE(p.send(m).ok());
    for (unsigned i = 0; i < 5; ++i) {
      auto f = p.recv();
      ASSERT_TRUE(f.ok()) << f.error().message();
      auto r = f->header->root<wire::Reply>();
      EXPECT_EQ(r.getId(), 100u);
      if (i < 2) {
        ASSERT_TRUE(r.isChunk()) << i;
        EXPECT_EQ(r.getChunk().getTag(), 500 + i);
        EXPECT_EQ(r.getChunk().getRegion(), want[i][0]);
        EXPECT_EQ(r.getChunk().getChunk(), want[i][1]);
        auto expect = chunk(want[i][0], want[i][1], manifest_.chunk_length(want[i][0], want[i][1]));
        ASSERT_EQ(f->payload.size(), expect.size());
        EXPECT_EQ(std::memcmp(f->payload.data(), expect.data(), expect.size()), 0);
      } else {
        ASSERT_TRUE(r.isError()) << i;
        EXPECT_EQ(r.getError().getTag(), 500 + i);
        EXPECT_EQ(r.getError().getCode(), wire::ErrorCode::OUT_OF_RANGE) << r.getError().getMessage().cStr();
      }
    }
  }
  {
    auto f = ask([](wire::Request::Builder rq) {
      auto gp = rq.initGetPage();
      gp.setSnapshot(kName);
      gp.setRegion(1);
      gp.setChunk(0);
      gp.setPage(3);
      gp.setTag(77);
    });
    auto r = f.header->root<wire::Reply>();
    ASSERT_TRUE(r.isPage());
    EXPECT_TRUE(r.getPage().getWhole());
    EXPECT_EQ(r.getPage().getTag(), 77u);
    EXPECT_EQ(r.getPage().getPage(), 3u);
    ASSERT_EQ(f.payload.size(), kChunk);
    EXPECT_EQ(std::memcmp(f.payload.data(), sources_[1].memory, kChunk), 0);
    auto past = ask([](wire::Request::Builder rq) {
      auto gp = rq.initGetPage();
      gp.setSnapshot(kName);
      gp.setRegion(1);
      gp.setChunk(3);  // 8 KiB: two pages
      gp.setPage(2);
      gp.setTag(78);
    });
    ASSERT_TRUE(past.header->root<wire::Reply>().isError());
    EXPECT_EQ(past.header->root<wire::Reply>().getError().getCode(), wire::ErrorCode::OUT_OF_RANGE);
  }
  {
    auto f = ask([](wire::Request::Builder rq) { rq.setOpenDatagrams(); });
    EXPECT_TRUE(f.header->root<wire::Reply>().isError());
    auto put = ask([](wire::Request::Builder rq) { rq.initPutBegin().setName("x"); });
    ASSERT_TRUE(put.header->root<wire::Reply>().isError());
    EXPECT_EQ(put.header->root<wire::Reply>().getError().getCode(), wire::ErrorCode::BAD_REQUEST);
    EXPECT_NE(std::string(put.header->root<wire::Reply>().getError().getMessage().cStr()).find("read-only"),
              std::string::npos);
    auto st = ask([](wire::Request::Builder rq) { rq.setStats(); });
    ASSERT_TRUE(st.header->root<wire::Reply>().isStats());
    EXPECT_EQ(st.header->root<wire::Reply>().getStats().getChunks(), 3u);
    EXPECT_EQ(st.header->root<wire::Reply>().getStats().getErrorsRange(), 4u);
    // putData is answered only to refuse it: the connection is closed after.
    auto data = ask([](wire::Request::Builder rq) { rq.setPutData(); });
    EXPECT_TRUE(data.header->root<wire::Reply>().isError());
    EXPECT_TRUE(p.closed_by_server());
  }
  // A restore that read another version of the snapshot gets notFound, never these bytes.
  RawPeer old = RawPeer::connect(server_->port());
  ASSERT_TRUE(old.hello(wire::PROTOCOL_VERSION, kName, checksum_ ^ 1).ok());
  ASSERT_TRUE(old.recv().ok());
  capnp::MallocMessageBuilder m;
  auto rq = m.initRoot<wire::Request>();
  rq.setId(5);
  auto gc = rq.initGetChunks();
  gc.setSnapshot(kName);
  gc.initChunks(1)[0].setTag(9);
  ASSERT_TRUE(old.send(m).ok());
  auto f = old.recv();
  ASSERT_TRUE(f.ok()) << f.error().message();
  ASSERT_TRUE(f->header->root<wire::Reply>().isError());
  EXPECT_EQ(f->header->root<wire::Reply>().getError().getCode(), wire::ErrorCode::NOT_FOUND);
  EXPECT_EQ(f->header->root<wire::Reply>().getError().getTag(), 9u);
}

// A peer asks for far more than it reads: the server stops reading it at its bound (64
// replies), so a demand request sent after a large prefetch request is handled only when at
// most 64 replies are left, and its reply then goes ahead of them.
TEST_F(MemoryServerTest, DemandOvertakesQueuedPrefetchUnderBackpressure) {
  start_server();
  RawPeer p = RawPeer::connect(server_->port(), 64 << 10);
  p.greet();
  constexpr unsigned kPrefetch = 600;
  std::vector<std::pair<uint32_t, uint32_t>> served;
  for (uint32_t k = 0; k < manifest_.regions[0].chunks.size(); ++k)
    if (manifest_.regions[0].chunks[k].codec != Codec::kZero) served.emplace_back(0, k);
  std::vector<std::byte> both;
  for (bool demand : {false, true}) {
    capnp::MallocMessageBuilder m;
    auto rq = m.initRoot<wire::Request>();
    rq.setId(demand ? 2 : 1);
    auto gc = rq.initGetChunks();
    gc.setSnapshot(kName);
    gc.setDemand(demand);
    const unsigned n = demand ? 1 : kPrefetch;
    auto ids = gc.initChunks(n);
    for (unsigned i = 0; i < n; ++i) {
      ids[i].setRegion(served[i % served.size()].first);
      ids[i].setChunk(served[i % served.size()].second);
      ids[i].setTag(demand ? 99999 : i);
    }
    auto frame = net::encode_frame(m, 0);
    both.insert(both.end(), frame.begin(), frame.end());
  }
  p.send_bytes(both.data(), both.size());  // one write: the server has both before it replies
  std::optional<unsigned> demand_at;
  for (unsigned i = 0; i <= kPrefetch; ++i) {
    auto f = p.recv();
    ASSERT_TRUE(f.ok()) << f.error().message();
    auto c = f->header->root<wire::Reply>().getChunk();
    const uint64_t tag = c.getTag();
    if (tag == 99999) demand_at = i;
    const auto [region, k] = tag == 99999 ? served[0] : served[tag % served.size()];
    ASSERT_EQ(c.getChunk(), k);
    ASSERT_EQ(std::memcmp(f->payload.data(), chunk(region, k, kChunk).data(), kChunk), 0) << "reply " << i;
  }
  ASSERT_TRUE(demand_at.has_value());
  EXPECT_GE(*demand_at, kPrefetch - 64) << "the demand request was read before the bound let it";
  EXPECT_LT(*demand_at, kPrefetch) << "the demand reply came after every prefetch reply";
}

// Hostile peers are closed (garbage, an oversize length prefix, a malformed header, a request
// before hello, a wrong version, silence) while the server goes on serving a real client.
TEST_F(MemoryServerTest, HostilePeersAreClosedWhileOthersAreServed) {
  net::MemoryServerOptions o;
  o.handshake_timeout = 500ms;
  start_server(o);
  RawPeer silent = RawPeer::connect(server_->port());
  RawPeer stalled = RawPeer::connect(server_->port());  // half a frame, then nothing
  const uint32_t half[2] = {64, 0};
  stalled.send_bytes(half, sizeof half);

  RawPeer garbage = RawPeer::connect(server_->port());
  const char junk[] = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
  garbage.send_bytes(junk, sizeof junk);
  RawPeer huge = RawPeer::connect(server_->port());
  const uint32_t oversize[2] = {8, 1u << 30};
  huge.send_bytes(oversize, sizeof oversize);
  RawPeer big_payload = RawPeer::connect(server_->port());  // within the protocol's 16 MiB, not ours
  const uint32_t payload[2] = {8, 8u << 20};
  big_payload.send_bytes(payload, sizeof payload);
  RawPeer malformed = RawPeer::connect(server_->port());
  const uint32_t bad_header[6] = {16, 0, 0xffffffff, 0xffffffff, 0, 0};  // 2^32 segments
  malformed.send_bytes(bad_header, sizeof bad_header);
  for (RawPeer* p : {&garbage, &huge, &big_payload, &malformed}) EXPECT_TRUE(p->closed_by_server());
  EXPECT_EQ(server_->stats().errors_protocol, 4u);

  RawPeer early = RawPeer::connect(server_->port());
  {
    capnp::MallocMessageBuilder m;
    m.initRoot<wire::Request>().setId(1);
    m.getRoot<wire::Request>().setList();
    ASSERT_TRUE(early.send(m).ok());
    auto f = early.recv();
    ASSERT_TRUE(f.ok()) << f.error().message();
    ASSERT_TRUE(f->header->root<wire::Reply>().isError());
    EXPECT_EQ(f->header->root<wire::Reply>().getError().getCode(), wire::ErrorCode::BAD_REQUEST);
    EXPECT_TRUE(early.closed_by_server());
  }
  RawPeer future = RawPeer::connect(server_->port());
  {
    ASSERT_TRUE(future.hello(wire::PROTOCOL_VERSION + 1).ok());
    auto f = future.recv();
    ASSERT_TRUE(f.ok()) << f.error().message();
    EXPECT_EQ(f->header->root<wire::Reply>().getError().getCode(), wire::ErrorCode::UNSUPPORTED_VERSION);
    EXPECT_TRUE(future.closed_by_server());
  }

  // Meanwhile a real client is served in full (the silent ones still connected).
  auto loc = SnapshotLocation::parse(uri());
  ASSERT_TRUE(loc.ok());
  auto list = net::list_remote(*loc, "", RawPeer::deadline());
  ASSERT_TRUE(list.ok()) << list.error().message();
  ASSERT_EQ(list->size(), 1u);
  if (kf_.uffd_usable) {
    restore_and_compare(RestoreOptions{});
    Status drained = server_->wait_drained(10s);
    EXPECT_TRUE(drained.ok()) << drained.error().message();
  }

  EXPECT_TRUE(silent.closed_by_server());
  EXPECT_TRUE(stalled.closed_by_server());
  auto st = server_->stats();
  EXPECT_EQ(st.handshake_timeouts, 2u);
  EXPECT_EQ(st.errors_protocol, 5u);  // and the request before hello
  EXPECT_EQ(st.open_connections, 0u);
}

TEST_F(MemoryServerTest, ConnectionsOverTheLimitAreRefused) {
  net::MemoryServerOptions o;
  o.max_connections = 2;
  start_server(o);
  RawPeer a = RawPeer::connect(server_->port()), b = RawPeer::connect(server_->port());
  a.greet();
  b.greet();
  RawPeer c = RawPeer::connect(server_->port());
  EXPECT_TRUE(c.closed_by_server());
  EXPECT_EQ(server_->stats().connections_refused, 1u);
}

// Peers that never authenticate cannot keep the destination out by holding every slot: the
// oldest of them makes room; an authenticated connection is never dropped for a newcomer.
TEST_F(MemoryServerTest, UnauthenticatedPeersDoNotLockTheDestinationOut) {
  net::MemoryServerOptions o;
  o.max_connections = 3;
  o.token = "0123456789abcdef-migration";
  start_server(o);
  std::vector<RawPeer> squatters;
  for (int i = 0; i < 3; ++i) squatters.push_back(RawPeer::connect(server_->port()));
  RestoreOptions right;
  right.token_file = token_file(o.token);
  restore_and_compare(right);
  EXPECT_GE(server_->stats().handshake_timeouts, 1u);
  EXPECT_EQ(server_->stats().connections_refused, 0u);
}

TEST_F(MemoryServerTest, StartRefusesBytesThatDoNotMatchTheManifest) {
  auto s = net::MemoryServer::start(
      kName, manifest_file_, [](uint32_t, uint32_t) { return std::span<const std::byte>(); }, {});
  ASSERT_TRUE(s.ok()) << s.error().message();  // nothing served is allowed
  EXPECT_EQ((*s)->stats().chunks_to_serve, 0u);
  // Nothing to serve is not drained: the manifest (the state blob with it) is still to be read.
  Status nobody = (*s)->wait_drained(100ms);
  ASSERT_FALSE(nobody.ok());
  EXPECT_NE(nobody.error().message().find("no destination has read the manifest"), std::string::npos)
      << nobody.error().message();
  auto wrong = net::MemoryServer::start(
      kName, manifest_file_, [this](uint32_t r, uint32_t k) { return chunk(r, k, 4096); }, {});
  ASSERT_FALSE(wrong.ok());
  EXPECT_EQ(wrong.error().code(), Errc::kInvalidArgument);
  EXPECT_NE(wrong.error().message().find("was given 4096 bytes"), std::string::npos) << wrong.error().message();
  auto bad = net::MemoryServer::start(kName, std::vector<std::byte>(100), {}, {});
  ASSERT_FALSE(bad.ok());
  net::MemoryServerOptions taken;
  taken.listen = "127.0.0.1:0";
  auto first = net::MemoryServer::start(kName, manifest_file_, [](uint32_t, uint32_t) { return std::span<const std::byte>(); }, taken);
  ASSERT_TRUE(first.ok());
  taken.listen = fmt::format("127.0.0.1:{}", (*first)->port());
  auto second = net::MemoryServer::start(kName, manifest_file_, [](uint32_t, uint32_t) { return std::span<const std::byte>(); }, taken);
  ASSERT_FALSE(second.ok());
  EXPECT_NE(second.error().message().find("pick another"), std::string::npos) << second.error().message();
}

}  // namespace
}  // namespace lazymem
