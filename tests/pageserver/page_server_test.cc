// Restores through a real page server on loopback (and in another network namespace), with
// every byte compared; hostile peers; wrong tokens; a server that dies mid-restore.
#include <gtest/gtest.h>
#include <arpa/inet.h>
#include <linux/userfaultfd.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/fanotify.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <linux/fs.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <fcntl.h>
#include <sched.h>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <random>
#include <sstream>
#include <future>
#include <thread>
#include <array>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "../common/fake_dns.h"
#include "../common/test_data.h"
#include "../common/veth_host.h"
#include "agent_client/unix_channel.h"
#include "served_snapshot.h"
#include "fault/fault_engine.h"
#include "lazymem/kernel_features.h"
#include "lazymem/restore.h"
#include "lazymem/snapshot.h"
#include "net/client.h"
#include "net/frame.h"
#include "net/page_fetcher.h"
#include "net/resolver.h"
#include "sys/clock.h"
#include "page_server.h"
#include "snapshot/chunk_codec.h"
#include "snapshot/dictionary.h"
#include "snapshot/manifest.h"
#include "snapshot/read_chunks.h"
#include "snapshot/store.h"
#include "source.h"
#include "sys/mapping.h"
#include "sys/uffd.h"
#include "wire.capnp.h"

namespace lazymem {
namespace {

using testing::InNamespace;
using testing::ScratchDir;
using testing::VethHost;
constexpr size_t kMiB = 1 << 20;

class PageServerTest : public testing::ServedSnapshotTest {
 protected:
  using ServedSnapshotTest::start_server;
  void start_server(const std::string& token, std::chrono::milliseconds handshake = std::chrono::seconds(10)) {
    pageserver::ServerOptions o;
    o.token = token;
    o.handshake_timeout = handshake;
    start_server(o);
  }

  // Another page server, of `store`, in a thread of the test; stopped when it goes.
  struct OtherServer {
    std::unique_ptr<pageserver::PageServer> server;
    std::thread thread;
    ~OtherServer() {
      if (!thread.joinable()) return;
      server->stop();
      thread.join();
    }
  };
  void start_other(const std::string& store, OtherServer& out) {
    pageserver::ServerOptions o;
    o.store_dir = store;
    auto s = pageserver::PageServer::listen(o);
    ASSERT_TRUE(s.ok()) << s.error().message();
    out.server = std::move(*s);
    out.thread = std::thread([&out] { (void)out.server->run(); });
  }

  // Pages [from, to) of a restored region hold the captured bytes (touching them fetches them).
  void expect_pages(const std::byte* got, size_t from, size_t to) {
    for (size_t off = from; off < to; off += 4096) {
      ASSERT_EQ(std::memcmp(got + off, expected_.data() + off, 4096), 0) << "page at " << off;
    }
  }

  void restore_and_compare(const std::string& location, RestoreOptions opts) {
    auto r = LazyRestore::start(location, kf_, opts);
    ASSERT_TRUE(r.ok()) << r.error().message();
    const auto* got = static_cast<const std::byte*>((*r)->regions()[0].address);
    for (size_t off = 0; off < len_; off += 4096) {
      ASSERT_EQ(std::memcmp(got + off, expected_.data() + off, 4096), 0) << "page at " << off;
    }
    ASSERT_TRUE((*r)->finish().ok());
    ::munmap(const_cast<std::byte*>(got), len_);
  }
};

TEST_F(PageServerTest, RestoresEveryByteOverLoopback) {
  capture(256 * kMiB, 21);
  start_server();
  RestoreOptions prefetch;
  restore_and_compare(uri(), prefetch);
  RestoreOptions demand_only;
  demand_only.prefetch = false;
  restore_and_compare(uri(), demand_only);
  // Each said, as it closed, that it holds every page (read by the server after the close).
  for (auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10); server_->stats().restores_completed < 2 && std::chrono::steady_clock::now() < until;) {
    std::this_thread::yield();
  }
  auto st = server_->stats();
  EXPECT_EQ(st.restores_completed, 2u);
  EXPECT_GT(st.chunks, 0u);
  EXPECT_EQ(st.errors_protocol + st.errors_auth + st.errors_io, 0u);
}

// A cache far smaller than the snapshot: extents are evicted and read again, every byte still
// right. A cache that holds it all: a second restore reads nothing more from disk.
TEST_F(PageServerTest, CacheEvictsUnderASmallBudgetAndServesRepeatsFromMemory) {
  capture(64 * kMiB, 28);
  auto m = read_manifest(dir_.path() + "/snap");
  ASSERT_TRUE(m.ok());
  uint64_t stored = 0;
  for (const auto& c : m->regions[0].chunks) stored += c.stored_length;
  pageserver::ServerOptions small;
  small.cache_bytes = 4 * kMiB;
  start_server(small);
  RestoreOptions demand_only;
  demand_only.prefetch = false;
  restore_and_compare(uri(), {});
  restore_and_compare(uri(), demand_only);
  auto st = server_->stats();
  EXPECT_GE(st.disk_read_bytes, 2 * stored) << "both restores read from disk: 4 MiB holds little";
  EXPECT_EQ(st.errors_io, 0u);
  stop_server();

  start_server(pageserver::ServerOptions{});
  restore_and_compare(uri(), {});
  uint64_t after_first = server_->stats().disk_read_bytes;
  EXPECT_GE(after_first, stored);
  restore_and_compare(uri(), demand_only);
  st = server_->stats();
  EXPECT_EQ(st.disk_read_bytes, after_first) << "the second restore came from the cache";
  EXPECT_GT(st.cache_hits, st.cache_misses);
}

// Zero-copy sends where asked for; on loopback the kernel copies anyway and says so, and the
// connection goes back to plain sends (counted). Turned off: never.
TEST_F(PageServerTest, ZeroCopySendsFallBackWhereTheKernelCopies) {
  if (!kf_.msg_zerocopy) GTEST_SKIP() << "MSG_ZEROCOPY not available on this kernel";
  capture(32 * kMiB, 29);
  start_server(pageserver::ServerOptions{});
  restore_and_compare(uri(), {});
  auto st = server_->stats();
  EXPECT_GE(st.zerocopy_sends, 1u);
  EXPECT_GE(st.zerocopy_copied_sends, 1u) << "loopback copies zero-copy sends";
  EXPECT_GE(st.zerocopy_fallbacks, 1u);
  EXPECT_GT(st.plain_bytes, st.zerocopy_bytes) << "after the fallback, sends are plain";
  EXPECT_EQ(st.zerocopy_bytes + st.plain_bytes >= st.bytes, true);
  stop_server();
  pageserver::ServerOptions off;
  off.zerocopy = false;
  start_server(off);
  restore_and_compare(uri(), {});
  EXPECT_EQ(server_->stats().zerocopy_sends, 0u);
}

TEST_F(PageServerTest, ThirtyTwoClientsRestoreAtOnce) {
#if defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "the restoring children start threads, which TSan refuses after a multi-threaded fork";
#endif
  capture(32 * kMiB, 27);
  start_server();
  std::string u = uri();
  std::vector<pid_t> kids;
  // Every child is forked before any of them talks to the server: a fork while the server
  // thread is busy (in OpenSSL's RNG for a hello, say) would copy a held lock into the child.
  int go[2];
  ASSERT_EQ(::pipe(go), 0);
  for (int i = 0; i < 32; ++i) {
    pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      ::close(go[1]);
      char c;
      (void)!::read(go[0], &c, 1);  // EOF once the parent has forked everyone
      RestoreOptions o;
      o.prefetch = (i % 2) == 0;  // half demand-only, half with prefetch
      auto r = LazyRestore::start(u, kf_, o);
      if (!r.ok()) _exit(3);
      const auto* got = static_cast<const std::byte*>((*r)->regions()[0].address);
      for (size_t off = 0; off < len_; off += 4096) {
        size_t pg = (off / 4096 * 7919 + static_cast<size_t>(i) * 131) % (len_ / 4096) * 4096;  // scattered order
        if (std::memcmp(got + pg, expected_.data() + pg, 4096) != 0) _exit(4);
      }
      _exit((*r)->finish().ok() ? 0 : 5);
    }
    kids.push_back(pid);
  }
  ::close(go[0]);
  ::close(go[1]);
  int failed = 0;
  for (pid_t pid : kids) {
    int status = 0;
    ::waitpid(pid, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) ++failed;
  }
  EXPECT_EQ(failed, 0);
  EXPECT_GE(server_->stats().connections, 64u);  // a control and a data connection per client
}

TEST_F(PageServerTest, TokenIsRequiredAndChecked) {
  capture(8 * kMiB, 22);
  start_server("correct horse battery staple");
  std::string good = dir_.path() + "/good.token", bad = dir_.path() + "/bad.token";
  std::ofstream(good) << "correct horse battery staple\n";
  std::ofstream(bad) << "the wrong horse, long enough\n";
  RestoreOptions o;
  auto none = LazyRestore::start(uri(), kf_, o);
  ASSERT_FALSE(none.ok());
  EXPECT_NE(none.error().message().find("requires a token"), std::string::npos) << none.error().message();
  o.token_file = bad;
  auto wrong = LazyRestore::start(uri(), kf_, o);
  ASSERT_FALSE(wrong.ok());
  EXPECT_EQ(wrong.error().code(), Errc::kPermission);
  EXPECT_NE(wrong.error().message().find("wrong token"), std::string::npos) << wrong.error().message();
  o.token_file = good;
  restore_and_compare(uri(), o);
  EXPECT_GE(server_->stats().errors_auth, 1u);
}

TEST_F(PageServerTest, UploadThenRestoreEveryByte) {
  capture(4 * kMiB, 28);  // leaves `snap` in the store; we upload a second one
  start_server();
  void* p = ::mmap(nullptr, 32 * kMiB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(p, MAP_FAILED);
  testing::fill_mixed(static_cast<std::byte*>(p), 32 * kMiB, 29);
  expected_.assign(static_cast<std::byte*>(p), static_cast<std::byte*>(p) + 32 * kMiB);
  len_ = 32 * kMiB;
  CaptureRegion r{"heap", p, len_, PROT_READ | PROT_WRITE};
  std::string target = "lazymem://127.0.0.1:" + std::to_string(server_->port()) + "/uploaded";
  auto rep = capture_regions(target, std::span(&r, 1), {});
  ASSERT_TRUE(rep.ok()) << rep.error().message();
  ::munmap(p, len_);
  restore_and_compare(target, RestoreOptions{});
  EXPECT_EQ(server_->stats().uploads, 1u);
}

// A hello frame as a client sends it (no token, a zero nonce): what raw-socket tests send first.
std::vector<std::byte> hello_frame() {
  capnp::MallocMessageBuilder m;
  auto rq = m.initRoot<proto::wire::Request>();
  rq.setId(1);
  auto h = rq.initHello();
  h.setVersion(proto::wire::PROTOCOL_VERSION);
  const std::array<kj::byte, 32> nonce{};
  h.setClientNonce(capnp::Data::Reader(nonce.data(), nonce.size()));
  return net::encode_frame(m, 0);
}

// A store on an ext4 image of its own, mounted through a loop device, which a test can freeze
// (FIFREEZE): every write and fsync there then waits until it is thawed. Unmounted, thawed
// first, when it goes.
class FreezableStore {
 public:
  // "" once mounted, else why not (the test skips).
  std::string mount(const std::string& scratch) {
    image_ = scratch + "/store.img";
    dir_ = scratch + "/frozen-store";
    std::filesystem::create_directories(dir_);
    const std::string cmd = fmt::format("truncate -s 96M {0} && mkfs.ext4 -q -F {0} >/dev/null 2>&1 && mount -o loop {0} {1} 2>/dev/null",
                                        image_, dir_);
    if (std::system(cmd.c_str()) != 0) return "cannot mount an ext4 image through a loop device (needs root, /dev/loop-control, mkfs.ext4)";
    mounted_ = true;
    fd_ = ::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    return fd_ >= 0 ? "" : "cannot open the mounted store";
  }
  ~FreezableStore() {
    thaw();
    if (fd_ >= 0) ::close(fd_);
    // Lazily: a server of the test may still hold files there (an assertion ended the test early).
    if (mounted_) (void)!std::system(fmt::format("umount -l {}", dir_).c_str());
  }
  bool freeze() { return frozen_ = ::ioctl(fd_, FIFREEZE, 0) == 0; }
  void thaw() {
    if (frozen_) ::ioctl(fd_, FITHAW, 0);
    frozen_ = false;
  }
  const std::string& dir() const { return dir_; }

 private:
  std::string image_, dir_;
  bool mounted_ = false, frozen_ = false;
  int fd_ = -1;
};

// An upload's commit waits on the disk (its fsyncs, the rename): it runs off the server's loop,
// which meanwhile serves everyone else. The disk is made to wait without end here (the store's
// filesystem frozen) while the commit is under way: another client still gets its answer; the
// uploader gets its own once the disk goes on, and the snapshot restores whole.
TEST_F(PageServerTest, AnUploadsCommitDoesNotHoldUpOtherClients) {
  FreezableStore store;
  if (std::string why = store.mount(dir_.path()); !why.empty()) GTEST_SKIP() << why;
  capture(4 * kMiB, 30);  // in the scratch store: its files are what is uploaded
  auto file = [&](const char* name) {
    std::ifstream in(dir_.path() + "/snap/" + name, std::ios::binary);
    std::string bytes{std::istreambuf_iterator<char>(in), {}};
    std::vector<std::byte> out(bytes.size());
    std::memcpy(out.data(), bytes.data(), bytes.size());
    return out;
  };
  const std::vector<std::byte> data = file(snapshot::kDataFile), manifest = file(snapshot::kManifestFile);
  ASSERT_FALSE(data.empty());
  ASSERT_FALSE(manifest.empty());
  pageserver::ServerOptions o;
  o.store_dir = store.dir();
  auto srv = pageserver::PageServer::listen(o);
  ASSERT_TRUE(srv.ok()) << srv.error().message();
  server_ = std::move(*srv);
  thread_ = std::thread([this] { (void)server_->run(); });
  const auto deadline = [] { return std::chrono::steady_clock::now() + std::chrono::seconds(10); };
  auto up = net::dial("127.0.0.1", server_->port(), deadline());
  ASSERT_TRUE(up.ok()) << up.error().message();
  net::FrameBuffer in;
  auto ask = [&](uint64_t id, auto fill, std::span<const std::byte> payload) {
    capnp::MallocMessageBuilder m;
    auto rq = m.initRoot<proto::wire::Request>();
    rq.setId(id);
    fill(rq);
    return net::send_frame(up->get(), m, payload, deadline());
  };
  auto answer = [&] { return net::recv_frame(up->get(), in, deadline()); };
  const auto hello = hello_frame();
  ASSERT_EQ(::send(up->get(), hello.data(), hello.size(), MSG_NOSIGNAL), static_cast<ssize_t>(hello.size()));
  ASSERT_TRUE(answer().ok());
  ASSERT_TRUE(ask(2, [](auto rq) { rq.initPutBegin().setName("up"); }, {}).ok());
  auto begun = answer();
  ASSERT_TRUE(begun.ok() && begun->header->root<proto::wire::Reply>().isOk());
  ASSERT_TRUE(ask(3, [](auto rq) { rq.setPutData(); }, data).ok());
  // Answered after the data frame: the data is written.
  ASSERT_TRUE(ask(4, [](auto rq) { rq.setStats(); }, {}).ok());
  auto stats = answer();
  ASSERT_TRUE(stats.ok() && stats->header->root<proto::wire::Reply>().isStats());

  ASSERT_TRUE(store.freeze()) << "FIFREEZE: " << std::strerror(errno);
  ASSERT_TRUE(ask(5, [](auto rq) { rq.setPutCommit(); }, manifest).ok());
  auto loc = SnapshotLocation::parse("lazymem://127.0.0.1:" + std::to_string(server_->port()) + "/snap");
  ASSERT_TRUE(loc.ok());
  auto listed = net::list_remote(*loc, "", std::chrono::steady_clock::now() + std::chrono::seconds(5));
  EXPECT_TRUE(listed.ok()) << "another client waited for the upload's commit: " << listed.error().message();
  pollfd p{up->get(), POLLIN, 0};
  EXPECT_EQ(::poll(&p, 1, 0), 0) << "the commit was answered while the disk could not have done it";
  store.thaw();
  auto committed = answer();
  ASSERT_TRUE(committed.ok()) << committed.error().message();
  ASSERT_TRUE(committed->header->root<proto::wire::Reply>().isOk());
  EXPECT_EQ(server_->stats().uploads, 1u);
  restore_and_compare("lazymem://127.0.0.1:" + std::to_string(server_->port()) + "/up", RestoreOptions{});
  stop_server();
  server_.reset();  // its files closed before the store is unmounted
}

// Captured live to a server: chunks stored again are sent after the first pass, out of order,
// and the manifest sent at the commit points at their last versions, which the restore reads.
TEST_F(PageServerTest, LiveCaptureUploadRestoresThePausedState) {
  if (!kf_.has_dirty_tracking()) GTEST_SKIP() << "dirty tracking needs Linux 5.13 (userfaultfd write-protect faults)";
  capture(4 * kMiB, 31);
  start_server();
  len_ = 32 * kMiB;
  void* p = ::mmap(nullptr, len_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(p, MAP_FAILED);
  auto* m = static_cast<std::byte*>(p);
  testing::fill_mixed(m, len_, 32);
  CaptureOptions co;
  unsigned calls = 0;
  co.progress = [&](uint64_t done, uint64_t) {  // behind the first pass: pages it has stored
    ++calls;
    for (size_t off = 0; off + 4096 <= done; off += 3 * 4096) m[off + 8 * calls] = static_cast<std::byte>(calls);
  };
  LiveCaptureOptions live;
  live.pause = [&] { expected_.assign(m, m + len_); };  // nothing else writes: what is stored
  live.resume = [] {};
  CaptureRegion r{"heap", p, len_, PROT_READ | PROT_WRITE};
  const std::string target = "lazymem://127.0.0.1:" + std::to_string(server_->port()) + "/live";
  auto rep = capture_regions_live(target, std::span(&r, 1), co, live, kf_);
  ASSERT_TRUE(rep.ok()) << rep.error().message();
  EXPECT_GE(calls, 2u);
  EXPECT_GT(rep->superseded_bytes, 0u);
  ::munmap(p, len_);
  restore_and_compare(target, RestoreOptions{});
}

TEST_F(PageServerTest, InterruptedUploadLeavesNothing) {
  capture(4 * kMiB, 30);
  start_server();
  auto loc = SnapshotLocation::parse("lazymem://127.0.0.1:" + std::to_string(server_->port()) + "/half");
  ASSERT_TRUE(loc.ok());
  {
    auto sink = net::open_upload(*loc, "", false, std::chrono::seconds(5));
    ASSERT_TRUE(sink.ok()) << sink.error().message();
    std::vector<std::byte> some(1 << 20, std::byte{7});
    ASSERT_TRUE((*sink)->append(some).ok());
    (*sink)->abort();  // the connection drops before putCommit
  }
  // The server notices the close on its own; wait until it has (it answers in order).
  auto list = net::list_remote(*loc, "", std::chrono::steady_clock::now() + std::chrono::seconds(5));
  ASSERT_TRUE(list.ok()) << list.error().message();
  for (const auto& s : *list) {
    EXPECT_NE(s.name, "half");
    EXPECT_EQ(s.format_version, 2u) << s.name;  // listed with its format, for mixed-version fleets
  }
  auto r = LazyRestore::start(loc->to_string(), kf_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::kNotFound);
  for (const auto& e : std::filesystem::directory_iterator(dir_.path())) {
    EXPECT_EQ(e.path().filename().string().find(".half"), std::string::npos) << "left behind: " << e.path();
  }
}

// A server gone under an upload: the capture fails saying where it was going and that nothing
// is stored (the person capturing must capture again), not just "connection reset by peer".
TEST_F(PageServerTest, UploadToAServerThatStopsSaysNothingIsStored) {
  start_server();
  auto loc = SnapshotLocation::parse("lazymem://127.0.0.1:" + std::to_string(server_->port()) + "/cut");
  ASSERT_TRUE(loc.ok());
  auto sink = net::open_upload(*loc, "", false, std::chrono::seconds(5));
  ASSERT_TRUE(sink.ok()) << sink.error().message();
  std::vector<std::byte> some(1 << 20, std::byte{7});
  ASSERT_TRUE((*sink)->append(some).ok());
  stop_server();
  Status s = ok_status();
  for (int i = 0; i < 64 && s.ok(); ++i) s = (*sink)->append(some);  // until the socket's buffers are full
  if (s.ok()) s = (*sink)->commit(some);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.error().message().find("upload to " + loc->to_string() + " failed"), std::string::npos)
      << s.error().message();
  EXPECT_NE(s.error().message().find("nothing is stored under that name"), std::string::npos) << s.error().message();
}

// Removed through the server: gone for new restores and from the list at once, a second
// removal is a clear "not found", and the files are deleted (on a thread of the server's).
TEST_F(PageServerTest, RemovedSnapshotIsGoneAtOnce) {
  capture(4 * kMiB, 31);
  start_server();
  restore_and_compare(uri(), {});  // held open by the server now
  auto loc = SnapshotLocation::parse(uri());
  ASSERT_TRUE(loc.ok());
  const auto deadline = [] { return std::chrono::steady_clock::now() + std::chrono::seconds(5); };
  Status s = net::remove_remote(*loc, "", deadline());
  ASSERT_TRUE(s.ok()) << s.error().message();
  auto list = net::list_remote(*loc, "", deadline());
  ASSERT_TRUE(list.ok()) << list.error().message();
  EXPECT_TRUE(list->empty());
  auto r = LazyRestore::start(uri(), kf_);
  ASSERT_FALSE(r.ok()) << "restored a removed snapshot";
  EXPECT_EQ(r.error().code(), Errc::kNotFound);
  s = net::remove_remote(*loc, "", deadline());
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.error().code(), Errc::kNotFound) << s.error().message();
  EXPECT_NE(s.error().message().find("snap"), std::string::npos) << s.error().message();
  auto leftovers = [&] {
    size_t n = 0;
    for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir_.path())) ++n;
    return n;
  };
  for (auto until = deadline(); leftovers() != 0 && std::chrono::steady_clock::now() < until;) std::this_thread::yield();
  EXPECT_EQ(leftovers(), 0u) << "the removed snapshot's files are still there";
}

// A connection to a test's page server, past its hello (no token): raw requests, one at a time.
struct RawClient {
  sys::UniqueFd fd;
  net::FrameBuffer in;
  uint64_t next_id = 2;
  static auto deadline() { return std::chrono::steady_clock::now() + std::chrono::seconds(10); }
  ::testing::AssertionResult open(uint16_t port) {
    auto d = net::dial("127.0.0.1", port, deadline());
    if (!d.ok()) return ::testing::AssertionFailure() << d.error().message();
    fd = std::move(*d);
    const auto hello = hello_frame();
    if (::send(fd.get(), hello.data(), hello.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(hello.size())) {
      return ::testing::AssertionFailure() << "hello: " << std::strerror(errno);
    }
    auto r = recv();
    if (!r.ok()) return ::testing::AssertionFailure() << "hello: " << r.error().message();
    return ::testing::AssertionSuccess();
  }
  template <typename Fill>
  Status send(Fill fill) {
    capnp::MallocMessageBuilder m;
    auto rq = m.initRoot<proto::wire::Request>();
    rq.setId(next_id++);
    fill(rq);
    return net::send_frame(fd.get(), m, {}, deadline());
  }
  Result<net::OwnedFrame> recv() { return net::recv_frame(fd.get(), in, deadline()); }
  // Whether a reply (or anything) waits to be read.
  bool answered() {
    pollfd p{fd.get(), POLLIN, 0};
    return ::poll(&p, 1, 0) != 0;
  }
};

// Captures `len` bytes of heap-like data to `target` (a store path or a page server's).
Status put_snapshot(const std::string& target, size_t len, uint64_t seed, bool replace) {
  void* p = testing::map_for_capture(len, seed);
  if (p == nullptr) return Error(Errc::kIo, "mmap failed");
  testing::fill_mixed(static_cast<std::byte*>(p), len, seed);
  CaptureRegion r{"heap", p, len, PROT_READ | PROT_WRITE};
  CaptureOptions co;
  co.replace = replace;
  auto rep = capture_regions(target, std::span(&r, 1), co);
  ::munmap(p, len);
  if (!rep.ok()) return std::move(rep).error();
  return ok_status();
}

// What a server's `list` offers: each snapshot's name and size.
std::map<std::string, uint64_t> listed(const SnapshotLocation& server) {
  auto l = net::list_remote(server, "", std::chrono::steady_clock::now() + std::chrono::seconds(10));
  EXPECT_TRUE(l.ok()) << l.error().message();
  std::map<std::string, uint64_t> out;
  if (l.ok())
    for (const auto& s : *l) out[s.name] = s.total_bytes;
  return out;
}

// `list` is answered from listings that remember what each manifest said: whatever changes the
// store, through the server or behind its back, the next list shows it, and a damaged snapshot
// is not offered, as before.
TEST_F(PageServerTest, ListFollowsTheStoreAsItChanges) {
  capture(4 * kMiB, 40);
  start_server();
  auto loc = SnapshotLocation::parse(uri());
  ASSERT_TRUE(loc.ok());
  auto at = [&](const std::string& name) { return "lazymem://127.0.0.1:" + std::to_string(server_->port()) + "/" + name; };
  using Listed = std::map<std::string, uint64_t>;
  EXPECT_EQ(listed(*loc), (Listed{{"snap", 4 * kMiB}}));
  // Through the server: uploaded, replaced, removed.
  ASSERT_TRUE(put_snapshot(at("up"), 1 * kMiB, 41, false).ok());
  EXPECT_EQ(listed(*loc), (Listed{{"snap", 4 * kMiB}, {"up", 1 * kMiB}})) << "uploaded";
  ASSERT_TRUE(put_snapshot(at("up"), 2 * kMiB, 42, true).ok());
  EXPECT_EQ(listed(*loc), (Listed{{"snap", 4 * kMiB}, {"up", 2 * kMiB}})) << "replaced by an upload";
  auto up = SnapshotLocation::parse(at("up"));
  ASSERT_TRUE(up.ok());
  ASSERT_TRUE(net::remove_remote(*up, "", RawClient::deadline()).ok());
  EXPECT_EQ(listed(*loc), (Listed{{"snap", 4 * kMiB}})) << "removed through the server";
  // Behind its back, in the store directory: imported, replaced, damaged, repaired, truncated, removed.
  const std::string imported = dir_.path() + "/imported";
  ASSERT_TRUE(put_snapshot(imported, 1 * kMiB, 43, false).ok());
  EXPECT_EQ(listed(*loc), (Listed{{"imported", 1 * kMiB}, {"snap", 4 * kMiB}})) << "imported";
  ASSERT_TRUE(put_snapshot(imported, 3 * kMiB, 44, true).ok());
  EXPECT_EQ(listed(*loc), (Listed{{"imported", 3 * kMiB}, {"snap", 4 * kMiB}})) << "replaced in the store";
  // One byte of its manifest changed in place (same file, same size): it fails its checksum.
  const std::string manifest = imported + "/" + snapshot::kManifestFile;
  auto flip_last_byte = [&] {
    sys::UniqueFd f(::open(manifest.c_str(), O_RDWR | O_CLOEXEC));
    ASSERT_TRUE(f.valid());
    const off_t at_end = ::lseek(f.get(), -1, SEEK_END);
    unsigned char b = 0;
    ASSERT_EQ(::pread(f.get(), &b, 1, at_end), 1);
    b ^= 0x5a;
    ASSERT_EQ(::pwrite(f.get(), &b, 1, at_end), 1);
  };
  flip_last_byte();
  auto local = snapshot::list_store(dir_.path());
  ASSERT_TRUE(local.ok());
  ASSERT_EQ(local->size(), 2u);
  EXPECT_NE((*local)[0].damage.find("checksum"), std::string::npos) << (*local)[0].damage;  // what `ls --store` shows
  EXPECT_EQ(listed(*loc), (Listed{{"snap", 4 * kMiB}})) << "a damaged manifest was offered";
  flip_last_byte();
  EXPECT_EQ(listed(*loc), (Listed{{"imported", 3 * kMiB}, {"snap", 4 * kMiB}})) << "repaired";
  ASSERT_EQ(::truncate((imported + "/" + snapshot::kDataFile).c_str(), 4096), 0);
  EXPECT_EQ(listed(*loc), (Listed{{"snap", 4 * kMiB}})) << "a truncated data file was offered";
  std::filesystem::remove_all(imported);
  EXPECT_EQ(listed(*loc), (Listed{{"snap", 4 * kMiB}})) << "removed from the store";
}

// The first open() of a file, held until allow(): a disk that hangs, made with a fanotify
// permission mark.
class HeldOpen {
 public:
  HeldOpen() : fan_(::fanotify_init(FAN_CLASS_CONTENT | FAN_CLOEXEC, O_RDONLY)) {}
  bool available() const { return fan_.valid(); }
  bool mark(const std::string& path) {
    return ::fanotify_mark(fan_.get(), FAN_MARK_ADD, FAN_OPEN_PERM, AT_FDCWD, path.c_str()) == 0;
  }
  // Waits up to `timeout_ms` for the open; true once it is held.
  bool wait(int timeout_ms) {
    pollfd p{fan_.get(), POLLIN, 0};
    if (::poll(&p, 1, timeout_ms) != 1) return false;
    if (::read(fan_.get(), &ev_, sizeof ev_) != static_cast<ssize_t>(sizeof ev_)) return false;
    opened_.reset(ev_.fd);
    return (ev_.mask & FAN_OPEN_PERM) != 0;
  }
  bool allow() {
    fanotify_response r{ev_.fd, FAN_ALLOW};
    return ::write(fan_.get(), &r, sizeof r) == static_cast<ssize_t>(sizeof r);
  }

 private:
  sys::UniqueFd fan_;
  fanotify_event_metadata ev_{};
  sys::UniqueFd opened_;
};

// A stream of lists reads each manifest once (on the listing thread), not once per list, while
// another client restores every byte.
TEST_F(PageServerTest, AStreamOfListsReadsEachManifestOnce) {
  capture(4 * kMiB, 45);
  constexpr int kCopies = 20, kLists = 200;
  for (int i = 0; i < kCopies; ++i) std::filesystem::copy(dir_.path() + "/snap", dir_.path() + fmt::format("/copy{:02}", i));
  start_server();
  EXPECT_EQ(server_->stats().listings, 0u) << "the store was listed before any list came";
  RawClient lister;
  ASSERT_TRUE(lister.open(server_->port()));
  std::atomic<int> good{0};
  std::thread lists([&] {
    for (int i = 0; i < kLists; ++i) {
      if (!lister.send([](auto rq) { rq.setList(); }).ok()) return;
      auto r = lister.recv();
      if (!r.ok()) return;
      auto reply = r->header->root<proto::wire::Reply>();
      if (!reply.isSnapshots() || reply.getSnapshots().size() != kCopies + 1) return;
      ++good;
    }
  });
  restore_and_compare(uri(), {});
  lists.join();
  EXPECT_EQ(good.load(), kLists);
  const auto st = server_->stats();
  EXPECT_EQ(st.listing_manifest_reads, static_cast<uint64_t>(kCopies + 1)) << "a manifest was read again";
  EXPECT_GE(st.listings, 1u);
  EXPECT_LE(st.listings, static_cast<uint64_t>(kLists));
  // The same counts are read from the running server (stats request).
  auto js = net::server_stats_json(*SnapshotLocation::parse(uri()), "", std::chrono::steady_clock::now() + std::chrono::seconds(10));
  ASSERT_TRUE(js.ok()) << js.error().message();
  const auto j = nlohmann::json::parse(*js);
  EXPECT_EQ(j["listing_manifest_reads"].get<uint64_t>(), st.listing_manifest_reads) << *js;
  EXPECT_EQ(j["listings"].get<uint64_t>(), server_->stats().listings) << *js;
}

// A list waits on the disk while the store is listed; other clients do not. The listing is
// made to wait without end here: a fanotify permission mark on the manifest of a snapshot
// imported after the server started, which the listing must read, holds its open() until this
// test answers. Meanwhile another client's chunks are served, byte for byte; then the list is
// answered, with the import in it.
TEST_F(PageServerTest, AListWaitingOnTheDiskDoesNotHoldUpOtherClients) {
  capture(4 * kMiB, 46);
  start_server();
  auto loc = SnapshotLocation::parse(uri());
  ASSERT_TRUE(loc.ok());
  ASSERT_EQ(listed(*loc).size(), 1u);  // the listing thread has read "snap" and is idle
  const std::string imported = dir_.path() + "/imported";
  ASSERT_TRUE(put_snapshot(imported, 1 * kMiB, 47, false).ok());
  HeldOpen held;
  if (!held.available()) GTEST_SKIP() << "fanotify permission events unavailable: " << std::strerror(errno);
  ASSERT_TRUE(held.mark(imported + "/" + snapshot::kManifestFile)) << std::strerror(errno);
  RawClient lister, faults;
  ASSERT_TRUE(lister.open(server_->port()));
  ASSERT_TRUE(faults.open(server_->port()));
  ASSERT_TRUE(lister.send([](auto rq) { rq.setList(); }).ok());
  // The listing reached the manifest and waits.
  ASSERT_TRUE(held.wait(10000)) << "the listing never opened the imported manifest";

  auto m = read_manifest(dir_.path() + "/snap");
  ASSERT_TRUE(m.ok());
  sys::UniqueFd data(::open((dir_.path() + "/snap/" + snapshot::kDataFile).c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_TRUE(data.valid());
  const uint32_t chunks = std::min<uint32_t>(16, static_cast<uint32_t>(m->regions[0].chunks.size()));
  ASSERT_TRUE(faults
                  .send([&](auto rq) {
                    auto gc = rq.initGetChunks();
                    gc.setSnapshot("snap");
                    gc.setDemand(true);
                    auto list = gc.initChunks(chunks);
                    for (uint32_t i = 0; i < chunks; ++i) {
                      list[i].setRegion(0);
                      list[i].setChunk(i);
                      list[i].setTag(i);
                    }
                  })
                  .ok());
  for (uint32_t i = 0; i < chunks; ++i) {
    auto r = faults.recv();
    ASSERT_TRUE(r.ok()) << "chunk requests waited for the listing: " << r.error().message();
    auto reply = r->header->root<proto::wire::Reply>();
    ASSERT_TRUE(reply.isChunk());
    const auto& c = m->regions[0].chunks[reply.getChunk().getChunk()];
    std::vector<std::byte> stored(c.stored_length);
    ASSERT_EQ(::pread(data.get(), stored.data(), stored.size(), static_cast<off_t>(c.offset)),
              static_cast<ssize_t>(stored.size()));
    EXPECT_TRUE(r->payload == stored) << "chunk " << reply.getChunk().getChunk();
  }
  EXPECT_FALSE(lister.answered()) << "the list was answered while its listing could not have been made";
  ASSERT_TRUE(held.allow());
  auto r = lister.recv();
  ASSERT_TRUE(r.ok()) << r.error().message();
  auto reply = r->header->root<proto::wire::Reply>();
  ASSERT_TRUE(reply.isSnapshots());
  std::map<std::string, uint64_t> got;
  for (auto s : reply.getSnapshots()) got[s.getName()] = s.getTotalBytes();
  EXPECT_EQ(got, (std::map<std::string, uint64_t>{{"imported", 1 * kMiB}, {"snap", 4 * kMiB}}));
}

// A listing stuck on the disk (a hung mount, held here by a fanotify permission mark) does not
// keep the server from stopping: it is left to finish on its own. The server used to wait for it.
TEST_F(PageServerTest, StoppingDoesNotWaitForAListingStuckOnTheDisk) {
  capture(1 * kMiB, 48);
  start_server();
  const std::string imported = dir_.path() + "/imported";
  ASSERT_TRUE(put_snapshot(imported, 1 * kMiB, 49, false).ok());
  HeldOpen held;
  if (!held.available()) GTEST_SKIP() << "fanotify permission events unavailable: " << std::strerror(errno);
  ASSERT_TRUE(held.mark(imported + "/" + snapshot::kManifestFile)) << std::strerror(errno);
  RawClient lister;
  ASSERT_TRUE(lister.open(server_->port()));
  ASSERT_TRUE(lister.send([](auto rq) { rq.setList(); }).ok());
  ASSERT_TRUE(held.wait(10000)) << "the listing never opened the imported manifest";
  // Stopped on a thread of its own, so that the listing is let go below whatever happens.
  std::promise<void> stopped;
  std::thread stopper([&] {
    stop_server();
    server_.reset();
    stopped.set_value();
  });
  const bool in_time = stopped.get_future().wait_for(std::chrono::seconds(20)) == std::future_status::ready;
  ASSERT_TRUE(held.allow());
  stopper.join();
  EXPECT_TRUE(in_time) << "stopping the server waited for a listing stuck on the disk";
}

// Names from the network never lead out of the store: a snapshot beside the store (reachable as
// "../<dir>/victim") can be neither read, replaced nor removed, and "a/../snap" is no way to
// remove "snap".
TEST_F(PageServerTest, NamesFromTheNetworkStayInTheStore) {
  capture(1 * kMiB, 35);
  ScratchDir outside;
  std::filesystem::copy(dir_.path() + "/snap", outside.path() + "/victim");
  start_server();
  auto loc = SnapshotLocation::parse(uri());
  ASSERT_TRUE(loc.ok());
  auto fd = net::open_connection(*loc, "", std::chrono::steady_clock::now() + std::chrono::seconds(5));
  ASSERT_TRUE(fd.ok()) << fd.error().message();
  net::FrameBuffer in;
  auto ask = [&](auto fill) {
    capnp::MallocMessageBuilder m;
    auto rq = m.initRoot<proto::wire::Request>();
    rq.setId(9);
    fill(rq);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    EXPECT_TRUE(net::send_frame(fd->get(), m, {}, deadline).ok());
    auto f = net::recv_frame(fd->get(), in, deadline);
    EXPECT_TRUE(f.ok()) << f.error().message();
    return f.ok() && f->header->root<proto::wire::Reply>().isError();
  };
  const std::string escape = "../" + std::filesystem::path(outside.path()).filename().string() + "/victim";
  EXPECT_TRUE(ask([&](auto rq) { rq.setGetManifest(escape); })) << "served a snapshot outside the store";
  EXPECT_TRUE(ask([&](auto rq) { rq.setRemove(escape); })) << "removed a snapshot outside the store";
  EXPECT_TRUE(ask([&](auto rq) { rq.setRemove("x/../snap"); }));
  EXPECT_TRUE(ask([&](auto rq) {
    auto pb = rq.initPutBegin();
    pb.setName(escape);
    pb.setReplace(true);
  })) << "began an upload outside the store";
  EXPECT_TRUE(std::filesystem::exists(outside.path() + "/victim/" + snapshot::kManifestFile));
  EXPECT_TRUE(std::filesystem::exists(dir_.path() + "/snap/" + snapshot::kManifestFile));
}

// Replaced or removed in the store by another program while the server holds it open: a
// restore starting afterwards gets what the store holds now.
TEST_F(PageServerTest, SnapshotChangedInTheStoreIsSeenByNewRestores) {
  capture(4 * kMiB, 32);
  start_server();
  restore_and_compare(uri(), {});
  capture(4 * kMiB, 33);  // replaced in place (another capture, an import)
  restore_and_compare(uri(), {});
  auto loc = SnapshotLocation::parse(dir_.path() + "/snap");
  ASSERT_TRUE(loc.ok());
  ASSERT_TRUE(snapshot::remove_snapshot(*loc).ok());
  auto r = LazyRestore::start(uri(), kf_);
  ASSERT_FALSE(r.ok()) << "restored a snapshot removed from the store";
  EXPECT_EQ(r.error().code(), Errc::kNotFound);
}

// Asks for chunk `chunk` of region 0 of "snap" on connection `fd`: "" and its stored bytes, or
// what went wrong (an error reply's text).
std::string ask_chunk(int fd, uint32_t chunk, std::vector<std::byte>& out) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  capnp::MallocMessageBuilder m;
  auto gc = m.initRoot<proto::wire::Request>().initGetChunks();
  gc.setSnapshot("snap");
  gc.setDemand(true);
  gc.initChunks(1)[0].setChunk(chunk);
  if (Status st = net::send_frame(fd, m, {}, deadline); !st.ok()) return st.error().message();
  net::FrameBuffer in;
  auto f = net::recv_frame(fd, in, deadline);
  if (!f.ok()) return f.error().message();
  auto reply = f->header->root<proto::wire::Reply>();
  if (!reply.isChunk()) return reply.isError() ? reply.getError().getMessage().cStr() : "not a chunk";
  out = f->payload;
  return "";
}

// A restore reads the version whose manifest it read to its end, whatever happens to the name
// meanwhile: replaced in the store by another program, replaced by an upload, removed. Restores
// starting meanwhile get what the store holds then. Once no restore reads a version that left
// the store (and its keep period is over), the server lets it go, and a connection naming it is
// told so (notFound), never served another version.
TEST_F(PageServerTest, RunningRestoreKeepsTheVersionItRead) {
  capture(8 * kMiB, 36);
  const std::vector<std::byte> a = expected_;
  auto a_manifest = read_manifest(dir_.path() + "/snap");
  ASSERT_TRUE(a_manifest.ok()) << a_manifest.error().message();
  pageserver::ServerOptions so;
  so.keep_replaced = std::chrono::seconds(0);  // held by its readers only
  start_server(so);
  RestoreOptions o;
  o.prefetch = false;  // every page below is fetched when touched, after the change above it
  auto r = LazyRestore::start(uri(), kf_, o);
  ASSERT_TRUE(r.ok()) << r.error().message();
  const auto* got = static_cast<const std::byte*>((*r)->regions()[0].address);
  size_t next = 0;
  auto touch_up_to = [&](size_t end) {
    for (; next < end; next += 4096) ASSERT_EQ(std::memcmp(got + next, a.data() + next, 4096), 0) << "page at " << next;
  };
  touch_up_to(len_ / 4);

  capture(8 * kMiB, 37);  // replaced in the store by another program
  restore_and_compare(uri(), {});
  touch_up_to(len_ / 2);

  {  // replaced by an upload through the server
    void* p = testing::map_for_capture(len_, 38);
    ASSERT_NE(p, nullptr);
    testing::fill_mixed(static_cast<std::byte*>(p), len_, 38);
    expected_.assign(static_cast<std::byte*>(p), static_cast<std::byte*>(p) + len_);
    CaptureRegion cr{"heap", p, len_, PROT_READ | PROT_WRITE};
    CaptureOptions co;
    co.replace = true;
    auto rep = capture_regions(uri(), std::span(&cr, 1), co);
    ASSERT_TRUE(rep.ok()) << rep.error().message();
    ::munmap(p, len_);
  }
  restore_and_compare(uri(), {});
  touch_up_to(3 * len_ / 4);

  auto loc = SnapshotLocation::parse(uri());
  ASSERT_TRUE(loc.ok());
  const auto deadline = [] { return std::chrono::steady_clock::now() + std::chrono::seconds(10); };
  Status s = net::remove_remote(*loc, "", deadline());
  ASSERT_TRUE(s.ok()) << s.error().message();
  touch_up_to(len_);
  EXPECT_GE(server_->stats().snapshots_retired, 1u);
  for (auto until = deadline(); server_->stats().snapshots_retired_bytes < a_manifest->stored_bytes() &&
                                std::chrono::steady_clock::now() < until;) {
    std::this_thread::yield();  // housekeeping counts them (once a millisecond while requests come)
  }
  EXPECT_GE(server_->stats().snapshots_retired_bytes, a_manifest->stored_bytes()) << "disk space not freed, not shown";
  ASSERT_TRUE((*r)->finish().ok());
  ::munmap(const_cast<std::byte*>(got), len_);

  for (auto until = deadline(); server_->stats().snapshots_retired != 0 && std::chrono::steady_clock::now() < until;) {
    std::this_thread::yield();
  }
  EXPECT_EQ(server_->stats().snapshots_retired, 0u) << "versions no restore reads are still held";
  EXPECT_EQ(server_->stats().snapshots_retired_bytes, 0u);
  capture(8 * kMiB, 36);  // the name exists again, with other content (another capture time)
  auto fd = net::open_connection(*loc, "", deadline(), a_manifest->checksum);
  ASSERT_TRUE(fd.ok()) << fd.error().message();
  std::vector<std::byte> chunk;
  const std::string why = ask_chunk(fd->get(), 0, chunk);
  EXPECT_NE(why.find("no longer held"), std::string::npos) << (why.empty() ? "served a chunk of another version" : why);
  EXPECT_EQ(server_->stats().errors_not_found, 1u);
}

// A version that left the store stays readable for a while with no connection reading it: a
// restore that read the manifest connects after the replacement, or one reconnects after its
// connections all closed. Its chunks are that version's, not the store's.
TEST_F(PageServerTest, VersionThatLeftTheStoreIsFoundByLaterConnections) {
  capture(2 * kMiB, 39);
  auto a = read_manifest(dir_.path() + "/snap");
  ASSERT_TRUE(a.ok()) << a.error().message();
  uint32_t chunk = 0;  // one whose pages are stored as frames: its stored checksum names its bytes
  while (chunk < a->regions[0].chunks.size() && a->regions[0].chunks[chunk].codec != Codec::kZstdPages) ++chunk;
  ASSERT_LT(chunk, a->regions[0].chunks.size());
  start_server();  // keeps versions that left the store for the default 60 s
  auto loc = SnapshotLocation::parse(uri());
  ASSERT_TRUE(loc.ok());
  const auto deadline = [] { return std::chrono::steady_clock::now() + std::chrono::seconds(10); };
  // Reads a's chunk on a new connection that names a's version.
  auto read_chunk = [&](std::vector<std::byte>& out) -> std::string {
    auto fd = net::open_connection(*loc, "", deadline(), a->checksum);
    if (!fd.ok()) return fd.error().message();
    return ask_chunk(fd->get(), chunk, out);
  };
  std::vector<std::byte> got;
  ASSERT_EQ(read_chunk(got), "");  // the server holds a open now, as the store's
  capture(2 * kMiB, 40);          // replaced by another program
  restore_and_compare(uri(), {});  // a restore starting now sees it (and the server lets a go)
  EXPECT_EQ(server_->stats().snapshots_retired, 1u);
  got.clear();
  ASSERT_EQ(read_chunk(got), "") << "a version that left the store a moment ago is gone";
  ASSERT_EQ(got.size(), a->regions[0].chunks[chunk].stored_length);
  EXPECT_EQ(snapshot::chunk_checksum(got), a->regions[0].chunks[chunk].stored_checksum) << "another version's chunk";
}

// A connection whose version could not be found when it was made (the snapshot out of the store
// a moment) looks again when asked: a failed bind does not stick.
TEST_F(PageServerTest, VersionNotFoundAtConnectIsLookedForAgain) {
  capture(1 * kMiB, 41);
  auto a = read_manifest(dir_.path() + "/snap");
  ASSERT_TRUE(a.ok()) << a.error().message();
  start_server();
  auto loc = SnapshotLocation::parse(uri());
  ASSERT_TRUE(loc.ok());
  std::filesystem::rename(dir_.path() + "/snap", dir_.path() + "/.away");
  auto fd = net::open_connection(*loc, "", std::chrono::steady_clock::now() + std::chrono::seconds(10), a->checksum);
  ASSERT_TRUE(fd.ok()) << fd.error().message();
  std::vector<std::byte> got;
  EXPECT_NE(ask_chunk(fd->get(), 0, got), "") << "served a snapshot that is not there";
  std::filesystem::rename(dir_.path() + "/.away", dir_.path() + "/snap");
  EXPECT_EQ(ask_chunk(fd->get(), 0, got), "");
  EXPECT_EQ(got.size(), a->regions[0].chunks[0].stored_length);
}

// The same bytes stored twice under the name (a copy put back in place) are two versions with
// one checksum: while a connection reads the first, it stays held and findable after the
// second has come and gone.
TEST_F(PageServerTest, SameBytesStoredTwiceAreHeldApart) {
  capture(1 * kMiB, 42);
  auto a = read_manifest(dir_.path() + "/snap");
  ASSERT_TRUE(a.ok()) << a.error().message();
  pageserver::ServerOptions so;
  so.keep_replaced = std::chrono::seconds(0);
  start_server(so);
  auto loc = SnapshotLocation::parse(uri());
  ASSERT_TRUE(loc.ok());
  const auto deadline = [] { return std::chrono::steady_clock::now() + std::chrono::seconds(10); };
  auto reader = net::open_connection(*loc, "", deadline(), a->checksum);  // reads the first copy
  ASSERT_TRUE(reader.ok()) << reader.error().message();
  std::filesystem::copy(dir_.path() + "/snap", dir_.path() + "/.copy");
  std::filesystem::rename(dir_.path() + "/snap", dir_.path() + "/.first");
  std::filesystem::rename(dir_.path() + "/.copy", dir_.path() + "/snap");
  std::filesystem::remove_all(dir_.path() + "/.first");
  restore_and_compare(uri(), {});  // the second copy, from now on
  capture(1 * kMiB, 43);
  restore_and_compare(uri(), {});  // then another snapshot: the second copy is let go
  for (auto until = deadline(); server_->stats().snapshots_retired != 1 && std::chrono::steady_clock::now() < until;) {
    std::this_thread::yield();
  }
  EXPECT_EQ(server_->stats().snapshots_retired, 1u) << "the version still read is not counted, or the other not let go";
  auto again = net::open_connection(*loc, "", deadline(), a->checksum);  // a reconnect, meanwhile
  ASSERT_TRUE(again.ok()) << again.error().message();
  std::vector<std::byte> got;
  EXPECT_EQ(ask_chunk(again->get(), 0, got), "");
  EXPECT_EQ(ask_chunk(reader->get(), 0, got), "");
}

// `serve --metrics HOST:PORT`: the stats in Prometheus text format over HTTP, while peers that
// connected to that port and say nothing (as many as it takes scrapers at once) are connected.
TEST_F(PageServerTest, MetricsInPrometheusText) {
  capture(4 * kMiB, 44);
  pageserver::ServerOptions so;
  so.metrics = "127.0.0.1:0";
  start_server(so);
  ASSERT_NE(server_->metrics_port(), 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(server_->metrics_port());
  std::vector<sys::UniqueFd> silent;
  for (int i = 0; i < 16; ++i) {
    silent.emplace_back(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    ASSERT_EQ(::connect(silent.back().get(), reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  }
  restore_and_compare(uri(), {});
  const auto st = server_->stats();
  sys::UniqueFd c(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  ASSERT_EQ(::connect(c.get(), reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  const std::string get = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
  ASSERT_EQ(::send(c.get(), get.data(), get.size(), 0), static_cast<ssize_t>(get.size()));
  timeval limit{10, 0};
  ::setsockopt(c.get(), SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof limit);
  std::string resp;
  char buf[4096];
  for (ssize_t n; (n = ::recv(c.get(), buf, sizeof buf, 0)) > 0;) resp.append(buf, static_cast<size_t>(n));
  EXPECT_EQ(resp.rfind("HTTP/1.0 200 OK\r\n", 0), 0u) << resp;
  EXPECT_NE(resp.find("Content-Type: text/plain; version=0.0.4"), std::string::npos);
  EXPECT_NE(resp.find("# TYPE lazymem_pageserver_requests_total counter"), std::string::npos) << resp;
  EXPECT_NE(resp.find(fmt::format("\nlazymem_pageserver_requests_total {}\n", st.requests)), std::string::npos) << resp;
  EXPECT_NE(resp.find(fmt::format("\nlazymem_pageserver_chunks_total {}\n", st.chunks)), std::string::npos) << resp;
  EXPECT_NE(resp.find("lazymem_pageserver_errors_total{kind=\"not_found\"} 0\n"), std::string::npos) << resp;
  EXPECT_NE(resp.find("# TYPE lazymem_pageserver_open_connections gauge"), std::string::npos) << resp;
}

// Verified through the server: what a restore from it would get, every stored chunk.
TEST_F(PageServerTest, VerifyThroughTheServerFindsADamagedChunk) {
  capture(4 * kMiB, 34);
  start_server();
  auto clean = verify_snapshot(uri());
  ASSERT_TRUE(clean.ok()) << clean.error().message();
  EXPECT_TRUE(clean->damaged.empty());
  auto m = read_manifest(dir_.path() + "/snap");
  ASSERT_TRUE(m.ok());
  uint32_t c = static_cast<uint32_t>(m->regions[0].chunks.size()) - 1;
  while (m->regions[0].chunks[c].codec == Codec::kZero) --c;
  stop_server();  // its cache holds the chunk: a new server reads the damaged disk
  {
    std::fstream data(dir_.path() + "/snap/" + snapshot::kDataFile, std::ios::in | std::ios::out | std::ios::binary);
    data.seekp(static_cast<std::streamoff>(m->regions[0].chunks[c].offset + 3));
    data.put('\x5a').put('\x5a');
    ASSERT_TRUE(data.good());
  }
  start_server();
  auto rep = verify_snapshot(uri());
  ASSERT_TRUE(rep.ok()) << rep.error().message();
  EXPECT_EQ(rep->chunks, clean->chunks);
  ASSERT_EQ(rep->damaged.size(), 1u);
  EXPECT_NE(rep->damaged[0].find("chunk " + std::to_string(c) + " "), std::string::npos) << rep->damaged[0];
}

// A snapshot the server holds damaged as a whole (its manifest fails its checksum, its data
// file is cut short or gone) is damage to whoever reads it through the server (Errc::kCorrupt:
// `verify --server` says DAMAGED, exit 1), not a server that could not be asked; the server
// counts it as corrupt.
TEST_F(PageServerTest, ASnapshotDamagedOnTheServerIsCorruptToItsReaders) {
  start_server();
  struct Damage {
    const char* name;
    std::function<void(const std::string& dir)> apply;
    const char* says;
  };
  const Damage damages[] = {
      {"badmanifest", [](const std::string& dir) {
         std::fstream f(dir + "/" + snapshot::kManifestFile, std::ios::in | std::ios::out | std::ios::binary);
         f.seekp(40);
         f.put('\x5a');
       }, "checksum"},
      {"cutdata", [](const std::string& dir) {
         std::filesystem::resize_file(dir + "/" + snapshot::kDataFile, 4096);
       }, "truncated"},
      {"nodata", [](const std::string& dir) { std::filesystem::remove(dir + "/" + snapshot::kDataFile); }, "missing"},
  };
  uint64_t seed = 60;
  for (const Damage& d : damages) {
    capture(1 * kMiB, ++seed);
    std::filesystem::rename(dir_.path() + "/snap", dir_.path() + "/" + d.name);
    d.apply(dir_.path() + "/" + d.name);
    const uint64_t before = server_->stats().errors_corrupt;
    auto rep = verify_snapshot(fmt::format("lazymem://127.0.0.1:{}/{}", server_->port(), d.name));
    ASSERT_FALSE(rep.ok()) << d.name;
    EXPECT_EQ(rep.error().code(), Errc::kCorrupt) << d.name << ": " << rep.error().message();
    EXPECT_NE(rep.error().message().find(d.says), std::string::npos) << rep.error().message();
    EXPECT_GT(server_->stats().errors_corrupt, before) << d.name;
  }
}

TEST_F(PageServerTest, UnknownSnapshotIsAClearError) {
  capture(4 * kMiB, 23);
  start_server();
  auto r = LazyRestore::start("lazymem://127.0.0.1:" + std::to_string(server_->port()) + "/nope", kf_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::kNotFound);
}

// Sends raw bytes on a fresh connection and reports whether the server closed it.
bool server_closes_after(uint16_t port, const std::vector<std::byte>& bytes) {
  auto fd = net::dial("127.0.0.1", port, std::chrono::steady_clock::now() + std::chrono::seconds(5));
  if (!fd.ok()) return false;
  (void)!::send(fd->get(), bytes.data(), bytes.size(), MSG_NOSIGNAL);
  char buf[4096];
  for (;;) {
    pollfd p{fd->get(), POLLIN, 0};
    if (::poll(&p, 1, 5000) <= 0) return false;  // still open after 5 s
    ssize_t n = ::recv(fd->get(), buf, sizeof buf, 0);
    if (n <= 0) return true;
  }
}

// Reading every chunk (eager restore, verify) from a server that stops answering without closing
// its connection (here: stopped, SIGSTOP) ends with a timeout error, not a wait without end.
TEST_F(PageServerTest, ReadingEveryChunkFromAStalledServerTimesOut) {
  capture(4 * kMiB, 36);
  ServerProcess server;
  fork_server(server);
  if (HasFatalFailure()) return;
  RestoreOptions o;
  o.fault_deadline = std::chrono::milliseconds(300);
  auto source = open_chunk_source("lazymem://127.0.0.1:" + std::to_string(server.port) + "/snap", o);
  ASSERT_TRUE(source.ok()) << source.error().message();
  auto reader = (*source)->open_reader();
  ASSERT_TRUE(reader.ok()) << reader.error().message();
  ASSERT_EQ(::kill(server.pid, SIGSTOP), 0);
  struct Sink final : snapshot::ChunkSink {
    size_t chunks = 0;
    void on_chunk(uint64_t, std::span<const std::byte>) override { ++chunks; }
    void on_chunk_error(uint64_t, const Error&) override {}
  } sink;
  const auto refs = snapshot::stored_chunks((*source)->manifest());
  const auto start = std::chrono::steady_clock::now();
  Status s = snapshot::read_chunks(**reader, refs, sink, std::chrono::milliseconds(300));
  const auto took = std::chrono::steady_clock::now() - start;
  ASSERT_FALSE(s.ok()) << "read every chunk from a stopped server";
  EXPECT_EQ(s.error().code(), Errc::kTimeout) << s.error().message();
  EXPECT_LT(sink.chunks, refs.size());
  EXPECT_LT(took, std::chrono::seconds(5));
}

// A server out of file descriptors refuses new connections (takes each and closes it) instead of
// spinning on a listening socket that stays readable, and keeps serving the connections it has.
// The server runs in a child process whose open-file limit is a few above what it holds.
TEST_F(PageServerTest, OutOfDescriptorsRefusesWithoutSpinning) {
  ServerProcess server;
  fork_server(server, [] {
    size_t open_fds = 0;
    for (const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) (void)e, ++open_fds;
    rlimit lim{open_fds + 4, open_fds + 4};  // room for a few connections, no more
    return ::setrlimit(RLIMIT_NOFILE, &lim) == 0;
  });
  if (HasFatalFailure()) return;
  const uint16_t port = server.port;
  auto loc = SnapshotLocation::parse("lazymem://127.0.0.1:" + std::to_string(port) + "/x");
  ASSERT_TRUE(loc.ok());
  const auto deadline = [] { return std::chrono::steady_clock::now() + std::chrono::seconds(10); };
  auto first = net::open_connection(*loc, "", deadline());
  ASSERT_TRUE(first.ok()) << first.error().message();
  std::vector<sys::UniqueFd> flood;
  for (int i = 0; i < 40; ++i) {
    sys::UniqueFd f(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(port);
    ASSERT_EQ(::connect(f.get(), reinterpret_cast<sockaddr*>(&a), sizeof a), 0) << std::strerror(errno);
    flood.push_back(std::move(f));
  }
  auto cpu_ms = [&] {
    std::ifstream st("/proc/" + std::to_string(server.pid) + "/stat");
    std::string line;
    std::getline(st, line);
    std::istringstream rest(line.substr(line.rfind(')') + 2));
    std::string field;
    uint64_t utime = 0, stime = 0;
    for (int k = 3; k <= 15 && rest >> field; ++k) {
      if (k == 14) utime = std::stoull(field);
      if (k == 15) stime = std::stoull(field);
    }
    return (utime + stime) * 1000.0 / static_cast<double>(::sysconf(_SC_CLK_TCK));
  };
  // Counters of the server, asked on the connection it already had.
  auto stats = [&](net::OwnedFrame& holder) {
    capnp::MallocMessageBuilder m;
    auto rq = m.initRoot<proto::wire::Request>();
    rq.setId(9);
    rq.setStats();
    EXPECT_TRUE(net::send_frame(first->get(), m, {}, deadline()).ok());
    net::FrameBuffer buf;
    auto f = net::recv_frame(first->get(), buf, deadline());
    EXPECT_TRUE(f.ok()) << f.error().message();
    if (f.ok()) holder = std::move(*f);
    auto r = holder.header ? holder.header->root<proto::wire::Reply>() : proto::wire::Reply::Reader();
    EXPECT_TRUE(r.isStats());
    return r.getStats();
  };
  // The flood taken in: every connection accepted or refused.
  const auto limit = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  for (;;) {
    net::OwnedFrame holder;
    auto st = stats(holder);
    if (HasFailure() || st.getConnections() + st.getConnectionsRefused() >= 1 + flood.size()) break;
    ASSERT_LT(std::chrono::steady_clock::now(), limit) << "the server did not take in the flood";
  }
  // A server that spins never sleeps: its listening socket stays readable, so epoll_wait returns
  // at once. One that does not is seen asleep in epoll_wait with the flood still pending.
  auto asleep_in_epoll = [&] {
    const std::string proc = "/proc/" + std::to_string(server.pid);
    std::ifstream st(proc + "/stat");
    std::string line;
    std::getline(st, line);
    if (line.size() < 2 || line.substr(line.rfind(')') + 2, 1) != "S") return false;
    long nr = -1;
    std::ifstream(proc + "/syscall") >> nr;  // "running" while on a CPU: no number
    return nr == SYS_epoll_wait || nr == SYS_epoll_pwait || nr == SYS_epoll_pwait2;
  };
  const double before = cpu_ms();
  for (const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5); !asleep_in_epoll();) {
    ASSERT_LT(std::chrono::steady_clock::now(), until) << "the server spins while out of descriptors";
    std::this_thread::yield();
  }
  EXPECT_LT(cpu_ms() - before, 150.0) << "the server spins while out of descriptors";
  // Refused ones were closed: they read end-of-file (or a reset), not silence.
  size_t closed = 0;
  for (auto& f : flood) {
    pollfd p{f.get(), POLLIN, 0};
    if (::poll(&p, 1, 0) == 1) ++closed;
  }
  EXPECT_GT(closed, 0u);
  // The connection it had is still served.
  net::OwnedFrame holder;
  EXPECT_GT(stats(holder).getConnectionsRefused(), 0u);
}

TEST_F(PageServerTest, HostilePeersAreCutOffAndOthersKeepBeingServed) {
  capture(16 * kMiB, 24);
  start_server("", std::chrono::milliseconds(300));
  uint16_t port = server_->port();
  // Garbage that is not a frame.
  std::vector<std::byte> garbage(64, std::byte{0xff});
  EXPECT_TRUE(server_closes_after(port, garbage));
  // A frame claiming a 1 GiB payload.
  std::vector<std::byte> huge(8);
  uint32_t h = 8, p = 1u << 30;
  std::memcpy(huge.data(), &h, 4);
  std::memcpy(huge.data() + 4, &p, 4);
  EXPECT_TRUE(server_closes_after(port, huge));
  // Before hello, a payload within the protocol's 16 MiB but more than any such request has:
  // refused before 8 MiB are buffered for it.
  std::vector<std::byte> early(8);
  uint32_t eh = 8, ep = 8u << 20;
  std::memcpy(early.data(), &eh, 4);
  std::memcpy(early.data() + 4, &ep, 4);
  {
    const auto before = server_->stats();
    EXPECT_TRUE(server_closes_after(port, early));
    const auto after = server_->stats();
    EXPECT_EQ(after.handshake_timeouts, before.handshake_timeouts) << "closed by the handshake timeout, not refused at once";
    EXPECT_EQ(after.errors_protocol, before.errors_protocol + 1);
  }
  // A well-framed header that is not a valid message.
  std::vector<std::byte> bad(8 + 16, std::byte{0x41});
  uint32_t hl = 16, pl = 0;
  std::memcpy(bad.data(), &hl, 4);
  std::memcpy(bad.data() + 4, &pl, 4);
  EXPECT_TRUE(server_closes_after(port, bad));
  // Requests before hello.
  {
    capnp::MallocMessageBuilder m;
    auto rq = m.initRoot<proto::wire::Request>();
    rq.setId(1);
    rq.setList();
    EXPECT_TRUE(server_closes_after(port, net::encode_frame(m, 0)));
  }
  // A client that connects and says nothing is closed after the handshake timeout.
  EXPECT_TRUE(server_closes_after(port, {}));
  // Out-of-range chunks get an error reply, not a crash.
  {
    auto loc = SnapshotLocation::parse("lazymem://127.0.0.1:" + std::to_string(port) + "/snap");
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    auto fd = net::open_connection(*loc, "", deadline);
    ASSERT_TRUE(fd.ok()) << fd.error().message();
    capnp::MallocMessageBuilder m;
    auto rq = m.initRoot<proto::wire::Request>();
    rq.setId(9);
    auto gc = rq.initGetChunks();
    gc.setSnapshot("snap");
    auto l = gc.initChunks(2);
    l[0].setRegion(0);
    l[0].setChunk(1u << 30);
    l[0].setTag(5);
    l[1].setRegion(7);
    l[1].setChunk(0);
    l[1].setTag(6);
    ASSERT_TRUE(net::send_frame(fd->get(), m, {}, deadline).ok());
    net::FrameBuffer buf;
    for (int i = 0; i < 2; ++i) {
      auto f = net::recv_frame(fd->get(), buf, deadline);
      ASSERT_TRUE(f.ok()) << f.error().message();
      auto reply = f->header->root<proto::wire::Reply>();
      ASSERT_TRUE(reply.isError());
      EXPECT_EQ(reply.getError().getCode(), proto::wire::ErrorCode::OUT_OF_RANGE);
    }
  }
  // And the server still serves a real client, correctly.
  restore_and_compare(uri(), RestoreOptions{});
  auto st = server_->stats();
  EXPECT_GE(st.errors_protocol, 3u);
  EXPECT_GE(st.errors_range, 2u);
  EXPECT_GE(st.handshake_timeouts, 1u);
}

size_t resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  size_t pages = 0, resident = 0;
  statm >> pages >> resident;
  return resident * static_cast<size_t>(::sysconf(_SC_PAGESIZE));
}

// A peer that asks and never reads holds at most its bound (ServerOptions::max_queued_bytes) of
// replies: its requests are read only while it is under it. Before, every request it had sent
// was handled on reading, and each getManifest queued a copy of the manifest (thousands of them
// in one read: hundreds of MiB from one connection).
TEST_F(PageServerTest, APeerThatNeverReadsHoldsItsBoundNotItsRequests) {
  capture(16 * kMiB, 25);
  start_server();
  auto loc = SnapshotLocation::parse(uri());
  ASSERT_TRUE(loc.ok());
  auto deadline = [] { return std::chrono::steady_clock::now() + std::chrono::seconds(10); };
  auto fd = net::open_connection(*loc, "", deadline());
  ASSERT_TRUE(fd.ok()) << fd.error().message();
  constexpr int kRequests = 5000;
  std::vector<std::byte> flood;
  for (int i = 0; i < kRequests; ++i) {
    capnp::MallocMessageBuilder m;
    auto rq = m.initRoot<proto::wire::Request>();
    rq.setId(static_cast<uint64_t>(i) + 10);
    rq.setGetManifest("snap");
    auto f = net::encode_frame(m, 0);
    flood.insert(flood.end(), f.begin(), f.end());
  }
  // From a thread: once the server stops reading, the rest stays in the socket (or the send
  // waits for good): that is the point.
  const int flood_fd = fd->get();
  std::thread flooder([&] { (void)!::send(flood_fd, flood.data(), flood.size(), MSG_NOSIGNAL); });
  const uint64_t before = server_->stats().requests;
  // A whole restore from another connection: many turns of the server's loop, in each of which
  // the flooding connection is read as far as its bound allows.
  restore_and_compare(uri(), RestoreOptions{});
  const uint64_t handled = server_->stats().requests - before;
  ::shutdown(flood_fd, SHUT_RDWR);  // ends a send still waiting
  flooder.join();
  EXPECT_LT(handled, uint64_t{kRequests} / 2) << "the server handled the requests of a peer that reads no reply";
}

// A peer that asks for chunks and takes none of the replies (a host gone without a reset, or a
// peer that never reads) is closed after the stall timeout: the extents pinned for its replies
// go back to the others. One that reads slowly is not.
TEST_F(PageServerTest, APeerThatTakesNoReplyIsClosedAfterTheStallTimeout) {
  capture(64 * kMiB, 31);
  pageserver::ServerOptions o;
  o.send_stall_timeout = std::chrono::milliseconds(300);
  start_server(o);
  auto loc = SnapshotLocation::parse(uri());
  ASSERT_TRUE(loc.ok());
  auto manifest = read_manifest(dir_.path() + "/snap");
  ASSERT_TRUE(manifest.ok()) << manifest.error().message();
  const auto deadline = [] { return std::chrono::steady_clock::now() + std::chrono::seconds(10); };
  auto ask_everything = [&](int fd) {
    capnp::MallocMessageBuilder m;
    auto rq = m.initRoot<proto::wire::Request>();
    rq.setId(7);
    auto gc = rq.initGetChunks();
    gc.setSnapshot("snap");
    const auto& chunks = manifest->regions.at(0).chunks;
    auto l = gc.initChunks(static_cast<unsigned>(chunks.size()));
    for (unsigned i = 0; i < chunks.size(); ++i) {
      l[i].setRegion(0);
      l[i].setChunk(i);
      l[i].setTag(i);
    }
    return net::send_frame(fd, m, {}, deadline());
  };
  // A small receive buffer: the replies fill it, and the server's send buffer, long before all
  // of the 64 MiB went out.
  auto stalled = net::open_connection(*loc, "", deadline());
  ASSERT_TRUE(stalled.ok()) << stalled.error().message();
  const int small = 64 << 10;  // fixed: no autotuning up to tcp_rmem's 32 MiB
  ASSERT_EQ(::setsockopt(stalled->get(), SOL_SOCKET, SO_RCVBUF, &small, sizeof small), 0);
  ASSERT_TRUE(ask_everything(stalled->get()).ok());
  // The server closes it (reset: zero-copy sends may have been in flight): reading what it
  // had taken ends in an error or end of file, within the timeout and a turn of housekeeping.
  std::vector<char> sink(1 << 20);
  const auto closed_by = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  ssize_t n = 1;
  // Waits first, without reading: reading would be progress.
  while (server_->stats().connections_stalled == 0 && std::chrono::steady_clock::now() < closed_by) {
    pollfd p{stalled->get(), POLLRDHUP, 0};
    ::poll(&p, 1, 50);
  }
  EXPECT_EQ(server_->stats().connections_stalled, 1u) << "a peer that took no reply for 300 ms was not closed";
  while (n > 0) n = ::recv(stalled->get(), sink.data(), sink.size(), 0);
  // A peer that reads, however slowly at first, is served to the end.
  auto slow = net::open_connection(*loc, "", deadline());
  ASSERT_TRUE(slow.ok()) << slow.error().message();
  ASSERT_TRUE(ask_everything(slow->get()).ok());
  net::FrameBuffer in;
  size_t replies = 0;
  while (replies < manifest->regions.at(0).chunks.size()) {
    auto f = net::recv_frame(slow->get(), in, deadline());
    ASSERT_TRUE(f.ok()) << "after " << replies << " replies: " << f.error().message();
    ASSERT_TRUE(f->header->root<proto::wire::Reply>().isChunk());
    ++replies;
  }
  EXPECT_EQ(server_->stats().connections_stalled, 1u);
}

// 8 bytes announcing a 16 MiB frame make the connection hold what comes of it, not 16 MiB at
// once: 24 such peers used to take 384 MiB of the server's memory before sending anything more.
TEST_F(PageServerTest, AFramesAnnouncedLengthIsNotHeldBeforeItsBytesCome) {
  capture(4 * kMiB, 26);
  start_server();
  std::vector<std::byte> hello_then_prefix = hello_frame();
  const uint32_t header = 8, payload = net::kMaxPayload;
  hello_then_prefix.resize(hello_then_prefix.size() + 8);
  std::memcpy(hello_then_prefix.data() + hello_then_prefix.size() - 8, &header, 4);
  std::memcpy(hello_then_prefix.data() + hello_then_prefix.size() - 4, &payload, 4);
  const size_t rss_before = resident_bytes();
  std::vector<sys::UniqueFd> peers;
  for (int i = 0; i < 24; ++i) {
    auto fd = net::dial("127.0.0.1", server_->port(), std::chrono::steady_clock::now() + std::chrono::seconds(5));
    ASSERT_TRUE(fd.ok()) << fd.error().message();
    ASSERT_EQ(::send(fd->get(), hello_then_prefix.data(), hello_then_prefix.size(), MSG_NOSIGNAL),
              static_cast<ssize_t>(hello_then_prefix.size()));
    // Its hello answered: the server has read the prefix that came with it.
    net::FrameBuffer in;
    auto f = net::recv_frame(fd->get(), in, std::chrono::steady_clock::now() + std::chrono::seconds(5));
    ASSERT_TRUE(f.ok()) << f.error().message();
    ASSERT_TRUE(f->header->root<proto::wire::Reply>().isHello());
    peers.push_back(std::move(*fd));
  }
  const size_t grown = resident_bytes() - std::min(rss_before, resident_bytes());
  EXPECT_LT(grown, size_t{64} << 20) << "24 announced frames made the server hold " << (grown >> 20) << " MiB";
  restore_and_compare(uri(), RestoreOptions{});
}

// Every slot taken by peers that connect and say nothing: a client still gets in (the oldest
// silent one makes room), without waiting for the handshake timeout.
TEST_F(PageServerTest, SilentPeersInEverySlotDoNotLockClientsOut) {
  capture(4 * kMiB, 27);
  pageserver::ServerOptions o;
  o.max_connections = 8;
  o.handshake_timeout = std::chrono::seconds(60);
  start_server(o);
  std::vector<sys::UniqueFd> silent;
  for (size_t i = 0; i < o.max_connections; ++i) {
    auto fd = net::dial("127.0.0.1", server_->port(), std::chrono::steady_clock::now() + std::chrono::seconds(5));
    ASSERT_TRUE(fd.ok()) << fd.error().message();
    silent.push_back(std::move(*fd));
  }
  auto loc = SnapshotLocation::parse(uri());
  ASSERT_TRUE(loc.ok());
  for (int i = 0; i < 3; ++i) {
    auto list = net::list_remote(*loc, "", std::chrono::steady_clock::now() + std::chrono::seconds(5));
    ASSERT_TRUE(list.ok()) << "client " << i << ": " << list.error().message();
    ASSERT_EQ(list->size(), 1u);
  }
  // Each client closes when done, so only the first found every slot taken.
  EXPECT_EQ(server_->stats().handshake_timeouts, 1u) << "one silent peer dropped for the newcomer";
  // The oldest went first: the first silent connection is closed.
  char c;
  pollfd p{silent[0].get(), POLLIN, 0};
  ASSERT_EQ(::poll(&p, 1, 5000), 1);
  EXPECT_EQ(::recv(silent[0].get(), &c, 1, 0), 0);
}

// A page server that answers the handshake and the manifest as a real one does, and then one
// kind of reply malformed: a pointer of its root struct sent 1000 words past the message, which
// Header::parse (it reads the root alone) lets through and Cap'n Proto's getters throw on.
class HostileServer {
 public:
  // kHello, kList, kChunks: that reply malformed. kProofWithoutToken: asks for a token, takes any
  // MAC, and answers with a proof it cannot have made; kOkWithoutProof: answers ok, as servers
  // did before they proved anything.
  enum class Mangles { kHello, kList, kChunks, kProofWithoutToken, kOkWithoutProof };
  HostileServer(Mangles what, std::string manifest) : what_(what), manifest_(std::move(manifest)) {
    auto l = net::listen_tcp("hostile", "127.0.0.1:0", 16);
    if (!l.ok()) throw std::runtime_error(l.error().message());
    listener_ = std::move(*l);
    ::pipe2(stop_, O_CLOEXEC);
    thread_ = std::thread([this] { run(); });
  }
  ~HostileServer() {
    (void)!::write(stop_[1], "x", 1);
    thread_.join();
    ::close(stop_[0]);
    ::close(stop_[1]);
  }
  uint16_t port() const { return listener_.port; }
  int mangled() const { return mangled_.load(); }

 private:
  struct Conn {
    sys::UniqueFd fd;
    net::FrameBuffer in;
  };
  void run() {
    std::vector<std::unique_ptr<Conn>> conns;
    for (;;) {
      std::vector<pollfd> p{{stop_[0], POLLIN, 0}, {listener_.fd.get(), POLLIN, 0}};
      for (auto& c : conns) p.push_back({c->fd.get(), POLLIN, 0});
      if (::poll(p.data(), p.size(), -1) < 0) continue;
      if (p[0].revents) return;
      const size_t polled = conns.size();  // one accepted below is polled next time
      if (p[1].revents) {
        int fd = ::accept4(listener_.fd.get(), nullptr, nullptr, SOCK_CLOEXEC);
        if (fd >= 0) conns.push_back(std::make_unique<Conn>(Conn{sys::UniqueFd(fd), net::FrameBuffer()}));
      }
      for (size_t i = 0; i < polled; ++i) {
        if (p[2 + i].revents == 0) continue;
        if (!serve(*conns[i])) conns[i].reset();
      }
      std::erase(conns, nullptr);
    }
  }
  bool serve(Conn& c) {
    auto space = c.in.writable();
    ssize_t n = ::recv(c.fd.get(), space.data(), space.size(), 0);
    if (n <= 0) return false;
    c.in.commit(static_cast<size_t>(n));
    for (;;) {
      auto f = c.in.next();
      if (!f.ok()) return false;
      if (!f->has_value()) return true;
      auto h = net::Header::parse((*f)->header);
      c.in.consume();
      if (!h.ok()) return false;
      auto rq = (*h)->root<proto::wire::Request>();
      if (rq.isHello()) {
        capnp::MallocMessageBuilder m;
        auto r = m.initRoot<proto::wire::Reply>();
        r.setId(rq.getId());
        auto hello = r.initHello();
        hello.setVersion(proto::wire::PROTOCOL_VERSION);
        hello.setServerNonce(capnp::Data::Reader(nonce_.data(), nonce_.size()));
        hello.setAuthRequired(what_ == Mangles::kProofWithoutToken || what_ == Mangles::kOkWithoutProof);
        send(c, m, {}, what_ == Mangles::kHello);
      } else if (rq.isAuthenticate()) {
        capnp::MallocMessageBuilder m;
        auto r = m.initRoot<proto::wire::Reply>();
        r.setId(rq.getId());
        const std::array<kj::byte, 32> guess{1, 2, 3};
        if (what_ == Mangles::kOkWithoutProof) {
          r.setOk();
        } else {
          r.setAuthenticated(capnp::Data::Reader(guess.data(), guess.size()));
        }
        send(c, m, {}, false);
      } else if (rq.isList()) {
        capnp::MallocMessageBuilder m;
        auto r = m.initRoot<proto::wire::Reply>();
        r.setId(rq.getId());
        r.initSnapshots(1)[0].setName("snap");
        send(c, m, {}, what_ == Mangles::kList);
      } else if (rq.isGetManifest()) {
        capnp::MallocMessageBuilder m;
        auto r = m.initRoot<proto::wire::Reply>();
        r.setId(rq.getId());
        r.setManifest();
        send(c, m, std::as_bytes(std::span(manifest_)), false);
      } else if (rq.isGetChunks()) {
        for (auto ch : rq.getGetChunks().getChunks()) {
          capnp::MallocMessageBuilder m;
          auto r = m.initRoot<proto::wire::Reply>();
          r.setId(rq.getId());
          auto id = r.initChunk();
          id.setRegion(ch.getRegion());
          id.setChunk(ch.getChunk());
          id.setTag(ch.getTag());
          send(c, m, {}, what_ == Mangles::kChunks);
        }
      } else {
        capnp::MallocMessageBuilder m;
        auto r = m.initRoot<proto::wire::Reply>();
        r.setId(rq.getId());
        auto e = r.initError();
        e.setCode(proto::wire::ErrorCode::BAD_REQUEST);
        e.setMessage("not served here");
        if (rq.isGetPage()) e.setTag(rq.getGetPage().getTag());
        send(c, m, {}, false);
      }
    }
  }
  void send(Conn& c, capnp::MallocMessageBuilder& m, std::span<const std::byte> payload, bool mangle) {
    std::vector<std::byte> frame = net::encode_frame(m, static_cast<uint32_t>(payload.size()));
    if (mangle) {
      // After the 8-byte prefix and the segment table's word: the root pointer, then the root.
      auto word = [&](size_t k) { return frame.data() + net::kFramePrefix + 8 * (k + 1); };
      uint64_t root;
      std::memcpy(&root, word(0), 8);
      const size_t start = 1 + static_cast<size_t>(static_cast<int32_t>(root) >> 2);
      const size_t data_words = (root >> 32) & 0xffff, pointers = root >> 48;
      for (size_t k = start + data_words; k < start + data_words + pointers; ++k) {
        uint64_t ptr;
        std::memcpy(&ptr, word(k), 8);
        if (ptr == 0 || (ptr & 3) > 1) continue;  // null, or neither a struct nor a list pointer
        const uint32_t lo = (1000u << 2) | (ptr & 3);
        std::memcpy(word(k), &lo, 4);
        ++mangled_;
      }
    }
    frame.insert(frame.end(), payload.begin(), payload.end());
    (void)!::send(c.fd.get(), frame.data(), frame.size(), MSG_NOSIGNAL);
  }

  const Mangles what_;
  const std::string manifest_;
  const std::array<kj::byte, 32> nonce_{};
  net::Listener listener_;
  int stop_[2] = {-1, -1};
  std::atomic<int> mangled_{0};
  std::thread thread_;
};

// The server proves it holds the token too: a client with one restores from no server that
// cannot (one without a token, one that takes any MAC, one that answers as servers did before
// they proved anything), each refused at the handshake with what to do.
TEST_F(PageServerTest, AClientWithATokenTrustsOnlyAServerThatProvesIt) {
  capture(4 * kMiB, 23);
  start_server();  // no token
  const std::string token = dir_.path() + "/t.token";
  std::ofstream(token) << "correct horse battery staple\n";
  RestoreOptions o;
  o.token_file = token;
  auto tokenless = LazyRestore::start(uri(), kf_, o);
  ASSERT_FALSE(tokenless.ok());
  EXPECT_EQ(tokenless.error().code(), Errc::kPermission);
  EXPECT_NE(tokenless.error().message().find("does not ask for a token"), std::string::npos)
      << tokenless.error().message();
  std::ifstream mf(dir_.path() + "/snap/" + snapshot::kManifestFile, std::ios::binary);
  const std::string manifest{std::istreambuf_iterator<char>(mf), {}};
  for (auto [mode, says] : {std::pair{HostileServer::Mangles::kProofWithoutToken, "does not hold the token"},
                            std::pair{HostileServer::Mangles::kOkWithoutProof, "without proving it holds it"}}) {
    HostileServer impostor(mode, manifest);
    auto r = LazyRestore::start(fmt::format("lazymem://127.0.0.1:{}/snap", impostor.port()), kf_, o);
    ASSERT_FALSE(r.ok()) << "restored from a server that does not know the token";
    EXPECT_EQ(r.error().code(), Errc::kPermission);
    EXPECT_NE(r.error().message().find(says), std::string::npos) << r.error().message();
  }
}

// A reply the getters cannot read is the server's protocol error, said once, at every place a
// client reads one: the dial's hello (a token makes the client read the nonce), a listing, and
// chunk replies on the fault engine's thread (before, the exception went up through the engine
// and ended the process: the agent's, or the restoring one's). The restore fails its pages
// visibly, as for any server that cannot serve.
TEST_F(PageServerTest, MalformedRepliesAreProtocolErrorsNotCrashes) {
  capture(4 * kMiB, 29);
  std::ifstream mf(dir_.path() + "/snap/" + snapshot::kManifestFile, std::ios::binary);
  const std::string manifest{std::istreambuf_iterator<char>(mf), {}};
  ASSERT_FALSE(manifest.empty());
  const auto deadline = [] { return std::chrono::steady_clock::now() + std::chrono::seconds(10); };
  auto at = [](const HostileServer& h, const std::string& name) {
    auto loc = SnapshotLocation::parse(fmt::format("lazymem://127.0.0.1:{}/{}", h.port(), name));
    EXPECT_TRUE(loc.ok());
    return *loc;
  };
  {
    HostileServer hostile(HostileServer::Mangles::kHello, manifest);
    auto list = net::list_remote(at(hostile, "snap"), "a token of sixteen or more", deadline());
    ASSERT_FALSE(list.ok());
    EXPECT_NE(list.error().message().find("malformed message from page server"), std::string::npos)
        << list.error().message();
    EXPECT_GT(hostile.mangled(), 0);
  }
  {
    HostileServer hostile(HostileServer::Mangles::kList, manifest);
    auto list = net::list_remote(at(hostile, "snap"), "", deadline());
    ASSERT_FALSE(list.ok());
    EXPECT_NE(list.error().message().find("malformed message from page server"), std::string::npos)
        << list.error().message();
    EXPECT_GT(hostile.mangled(), 0);
  }
  HostileServer hostile(HostileServer::Mangles::kChunks, manifest);
  RestoreOptions ro;
  ro.fetch_attempts = 2;
  ro.fault_deadline = std::chrono::milliseconds(3000);
  auto r = LazyRestore::start(at(hostile, "snap").to_string(), kf_, ro);
  ASSERT_TRUE(r.ok()) << r.error().message();
  Status done = (*r)->wait_complete(std::chrono::seconds(60));
  EXPECT_FALSE(done.ok()) << "every chunk reply was malformed, yet the restore completed";
  EXPECT_TRUE((*r)->stats().failed);
  EXPECT_GT(hostile.mangled(), 0);
  ::munmap((*r)->regions()[0].address, len_);
  r->reset();
}

// The server dies while a process restores from it: the process's access to a page that was
// never fetched fails visibly (SIGBUS from UFFDIO_POISON) within the deadline, never hangs.
TEST_F(PageServerTest, ServerDeathFailsTheFaultVisibly) {
  if (!kf_.has_uffd_poison()) GTEST_SKIP() << "kernel lacks UFFDIO_POISON (Linux 6.6)";
  capture(64 * kMiB, 25);
  RestoreOptions o;
  o.prefetch = false;
  o.fault_deadline = std::chrono::milliseconds(3000);
  o.fetch_attempts = 2;
  int status = 0;
  double secs = 0;
  child_touches_after_server_death(o, 32 * kMiB, true, status, secs);
  if (HasFatalFailure()) return;
  ASSERT_TRUE(WIFSIGNALED(status)) << "child exited with " << WEXITSTATUS(status);
  EXPECT_EQ(WTERMSIG(status), SIGBUS);
  EXPECT_LT(secs, 10.0);
}

// The server restarts (same port) mid-restore: the client reconnects and every byte is right.
TEST_F(PageServerTest, ServerRestartMidRestoreIsInvisible) {
  capture(32 * kMiB, 30);
  start_server();
  RestoreOptions o;
  o.prefetch = false;  // faults keep coming after the restart
  auto r = LazyRestore::start(uri(), kf_, o);
  ASSERT_TRUE(r.ok()) << r.error().message();
  const auto* got = static_cast<const std::byte*>((*r)->regions()[0].address);
  expect_pages(got, 0, len_ / 2);
  if (HasFatalFailure()) return;
  restart_server();
  expect_pages(got, len_ / 2, len_);
  if (HasFatalFailure()) return;
  ASSERT_TRUE((*r)->finish().ok());
  ::munmap(const_cast<std::byte*>(got), len_);
}

// A restore from several page servers sharing a store (lazymem://A,B/NAME) goes on with the
// next when its server dies mid-restore (its port closed) or stops answering (SIGSTOP: it still
// accepts connections, which then say nothing), by the fault engine and by faulting threads
// alike; and starts from the second when the first has stopped before it began. Every byte
// compared.
struct Failover {
  bool on_thread;
  bool stalled;
  bool before_start = false;  // (stalled) stopped before the restore starts
};
class FailoverTest : public PageServerTest, public ::testing::WithParamInterface<Failover> {};

TEST_P(FailoverTest, RestoreGoesOnWithTheNextServer) {
  const auto [on_thread, stalled, before_start] = GetParam();
  if (on_thread && !kf_.has_uffd_feature(UFFD_FEATURE_SIGBUS)) GTEST_SKIP() << "userfaultfd lacks UFFD_FEATURE_SIGBUS";
  capture(16 * kMiB, 45);
  ServerProcess forked;  // the first server, when it is to be stopped (forked before any thread)
  if (stalled) {
    fork_server(forked);
    if (HasFatalFailure()) return;
  } else {
    start_server();
  }
  const uint16_t first_port = stalled ? forked.port : server_->port();
  OtherServer other;
  start_other(dir_.path(), other);
  if (HasFatalFailure()) return;
  auto& second = other.server;
  const std::string both = fmt::format("lazymem://127.0.0.1:{},127.0.0.1:{}/snap", first_port, second->port());
  if (before_start) {
    ASSERT_EQ(::kill(forked.pid, SIGSTOP), 0);
  }
  RestoreOptions o;
  o.prefetch = false;  // faults keep coming after the first server is gone
  o.fault_on_thread = on_thread;
  o.fault_deadline = std::chrono::milliseconds(4000);
  o.fetch_attempts = 3;
  auto r = LazyRestore::start(both, kf_, o);
  ASSERT_TRUE(r.ok()) << r.error().message();
  const auto* got = static_cast<const std::byte*>((*r)->regions()[0].address);
  expect_pages(got, 0, len_ / 2);
  if (HasFatalFailure()) return;
  if (!before_start) {
    EXPECT_EQ(second->stats().chunks + second->stats().pages, 0u) << "the second server served while the first lived";
  }
  if (stalled && !before_start) {
    ASSERT_EQ(::kill(forked.pid, SIGSTOP), 0);
  } else if (!stalled) {
    stop_server();
    server_.reset();  // its port closes: reconnects to it are refused
  }
  expect_pages(got, len_ / 2, len_);
  if (HasFatalFailure()) return;
  EXPECT_GT(second->stats().chunks + second->stats().pages, 0u);
  ASSERT_TRUE((*r)->finish().ok());
  ::munmap(const_cast<std::byte*>(got), len_);
}

INSTANTIATE_TEST_SUITE_P(PageServerTest, FailoverTest,
                         ::testing::Values(Failover{false, false}, Failover{true, false}, Failover{false, true},
                                           Failover{true, true}, Failover{false, true, true}, Failover{true, true, true}),
                         [](const auto& info) {
                           return std::string(info.param.on_thread ? "FaultOnThread" : "Engine") +
                                  (info.param.before_start ? "FirstStoppedAtStart"
                                                           : info.param.stalled ? "FirstStops" : "FirstDies");
                         });

// A server that cannot serve what the restore reads is passed over, not failed on. Here the
// second server holds another version under the name (so it refuses the version the restore
// read from the first); the first restarts mid-restore, so the restore's reconnects go to the
// second first (after the server that failed) and are refused there: the requests go back to
// the first. Every byte compared against the first's version. Faulting threads also with more
// connections than attempts: all of them land on the refusing server, whose refusal must count
// once.
struct PassOver {
  bool on_thread;
  unsigned connections = 2;
};
class PassOverTest : public PageServerTest, public ::testing::WithParamInterface<PassOver> {};

TEST_P(PassOverTest, ServerThatRefusesTheVersionIsPassedOver) {
  const auto [on_thread, connections] = GetParam();
  if (on_thread && !kf_.has_uffd_feature(UFFD_FEATURE_SIGBUS)) GTEST_SKIP() << "userfaultfd lacks UFFD_FEATURE_SIGBUS";
  ScratchDir other;
  capture(16 * kMiB, 46);
  std::filesystem::copy(dir_.path() + "/snap", other.path() + "/snap", std::filesystem::copy_options::recursive);
  capture(16 * kMiB, 47);  // the first server's store now holds another version
  start_server();
  const uint16_t first_port = server_->port();
  OtherServer running;
  start_other(other.path(), running);
  if (HasFatalFailure()) return;
  auto& second = running.server;
  RestoreOptions o;
  o.prefetch = false;
  o.fault_on_thread = on_thread;
  o.fault_connections = connections;
  o.fault_deadline = std::chrono::milliseconds(10000);
  o.fetch_attempts = 3;
  auto r = LazyRestore::start(fmt::format("lazymem://127.0.0.1:{},127.0.0.1:{}/snap", first_port, second->port()),
                              kf_, o);
  ASSERT_TRUE(r.ok()) << r.error().message();
  const auto* got = static_cast<const std::byte*>((*r)->regions()[0].address);
  expect_pages(got, 0, len_ / 2);
  if (HasFatalFailure()) return;
  restart_server();
  expect_pages(got, len_ / 2, len_);
  if (HasFatalFailure()) return;
  EXPECT_GT(second->stats().errors_not_found, 0u) << "the second server was asked and refused";
  ASSERT_TRUE((*r)->finish().ok());
  ::munmap(const_cast<std::byte*>(got), len_);
}

INSTANTIATE_TEST_SUITE_P(PageServerTest, PassOverTest,
                         ::testing::Values(PassOver{false}, PassOver{true}, PassOver{true, 4}), [](const auto& info) {
                           return info.param.on_thread ? fmt::format("FaultOnThread{}Connections", info.param.connections)
                                                       : std::string("Engine");
                         });

// Reconnecting to a server that accepts connections but never answers does not block the
// caller (the engine thread, which serves every other session meanwhile): each poll() returns
// at once, and the requests fail once the attempts are spent.
TEST_F(PageServerTest, ReconnectNeverBlocksTheEngine) {
  capture(4 * kMiB, 31);
  start_server();
  uint16_t port = server_->port();
  auto loc = SnapshotLocation::parse(uri());
  ASSERT_TRUE(loc.ok());
  net::RemoteOptions ro;
  ro.deadline = std::chrono::milliseconds(1500);
  ro.fetch_attempts = 2;
  auto src = net::RemoteSource::open(*loc, ro);
  ASSERT_TRUE(src.ok()) << src.error().message();
  auto reader = (*src)->open_reader();
  ASSERT_TRUE(reader.ok());
  stop_server();
  server_.reset();
  // A listener that takes connections into its backlog and never reads them.
  sys::UniqueFd silent(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  int one = 1;
  ::setsockopt(silent.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(port);
  ASSERT_EQ(::bind(silent.get(), reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ASSERT_EQ(::listen(silent.get(), 16), 0);

  struct Sink : snapshot::ChunkSink {
    int chunks = 0, errors = 0;
    void on_chunk(uint64_t, std::span<const std::byte>) override { ++chunks; }
    void on_chunk_error(uint64_t, const Error&) override { ++errors; }
  } sink;
  snapshot::ChunkRequest rq{snapshot::ChunkRef{0, 1}, 7, true};
  (void)(*reader)->submit(std::span(&rq, 1));  // the send may or may not notice the dead peer
  auto t0 = std::chrono::steady_clock::now();
  bool failed = false;
  while (!failed && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(10)) {
    pollfd p{(*reader)->wait_fd(), POLLIN, 0};
    ::poll(&p, 1, 100);
    auto t = std::chrono::steady_clock::now();
    auto n = (*reader)->poll(sink, false, 16);
    EXPECT_LT(std::chrono::steady_clock::now() - t, std::chrono::milliseconds(50)) << "poll() blocked";
    if (!n.ok()) {
      failed = true;
      EXPECT_NE(n.error().message().find("gave up after 2 reconnects"), std::string::npos) << n.error().message();
    }
  }
  EXPECT_TRUE(failed) << "the request never failed";
  EXPECT_EQ(sink.chunks, 0);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
}

// A process whose memory the engine restores (over a uffd it sends us), forked before the test
// starts any thread. Told to, it reads every page and exits 0 if each holds `expected`'s bytes
// (2 if one does not; a failed page kills it with SIGBUS). Killed when this goes.
struct RestoredChild {
  pid_t pid = -1;
  sys::UniqueFd pidfd;  // readable once it has exited
  sys::UniqueFd uffd;   // registered over its copy of the region
  sys::UniqueFd go;     // a byte: read every page now
  RestoredChild() = default;
  RestoredChild(const RestoredChild&) = delete;
  RestoredChild& operator=(const RestoredChild&) = delete;
  ~RestoredChild() {
    if (pid <= 0) return;
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
  }
  void read_every_page() const { ASSERT_EQ(::write(go.get(), "g", 1), 1); }
  bool exited_within(std::chrono::milliseconds t) const {
    pollfd p{pidfd.get(), POLLIN, 0};
    return ::poll(&p, 1, static_cast<int>(t.count())) == 1;
  }
  int wait() {  // its wait status, once exited_within() says it has exited
    int status = 0;
    EXPECT_EQ(::waitpid(pid, &status, 0), pid);
    pid = -1;
    return status;
  }
};

// Forks `out`, whose region lies where the snapshot's region `r` was captured (free in this
// process since the capture), and receives its uffd (SCM_RIGHTS).
void fork_restored(const RegionInfo& r, const std::vector<std::byte>& expected, RestoredChild& out) {
  int sock[2], go[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sock), 0);
  ASSERT_EQ(::pipe2(go, O_CLOEXEC), 0);
  out.pid = ::fork();
  ASSERT_GE(out.pid, 0);
  if (out.pid == 0) {
    ::signal(SIGBUS, SIG_DFL);  // a failed page kills it plainly, under the sanitizers too
    void* p = ::mmap(reinterpret_cast<void*>(r.start_address), r.length, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    auto uffd = sys::Uffd::open(0);
    if (p == MAP_FAILED || !uffd.ok() || !uffd->register_missing(r.start_address, r.length).ok()) _exit(3);
    const std::byte byte{'u'};
    char c;
    if (!agent::send_with_fd(sock[1], std::span(&byte, 1), uffd->fd()).ok() || ::read(go[0], &c, 1) != 1) _exit(4);
    const auto* got = static_cast<const std::byte*>(p);
    for (size_t off = 0; off < r.length; off += 4096)
      if (std::memcmp(got + off, expected.data() + off, 4096) != 0) _exit(2);
    _exit(0);
  }
  ::close(sock[1]);
  ::close(go[0]);
  sys::UniqueFd from(sock[0]);
  out.go = sys::UniqueFd(go[1]);
  out.pidfd = sys::UniqueFd(static_cast<int>(::syscall(SYS_pidfd_open, out.pid, 0)));
  ASSERT_TRUE(out.pidfd.valid()) << std::strerror(errno);
  net::FrameBuffer buf;
  std::deque<sys::UniqueFd> fds;
  ASSERT_TRUE(agent::recv_some(from.get(), buf, fds, 20000).ok());
  ASSERT_EQ(fds.size(), 1u) << "the child sent no uffd";
  out.uffd = std::move(fds.front());
}

fault::SessionSpec session_of(const std::string& name, RestoredChild& child,
                              std::shared_ptr<snapshot::ChunkSource> source) {
  const RegionInfo& r = source->manifest().regions[0];
  fault::SessionSpec spec;
  spec.name = name;
  spec.uffd = sys::Uffd::adopt(std::move(child.uffd), 0);
  spec.ranges = {fault::MappedRange{r.start_address, r.length, 0, 0}};
  spec.source = std::move(source);
  spec.pid = child.pid;
  return spec;
}

// Counts the chunks a reader delivers; a chunk it fails is a test failure.
struct CountedChunks final : snapshot::ChunkSink {
  size_t chunks = 0;
  void on_chunk(uint64_t, std::span<const std::byte>) override { ++chunks; }
  void on_chunk_error(uint64_t, const Error& e) override { ADD_FAILURE() << e.message(); }
};

// One engine serves session A, whose reader is held up (`held_up`, called once A is added, waits
// until it is), and session B, which reads a local snapshot. B's process must read every byte
// while A has neither completed nor failed (A's deadline is a minute away: this is about order,
// not timing); once `release`d, A's process reads every byte too.
void expect_others_served_while_one_waits(const KernelFeatures& kf, RestoredChild& a, RestoredChild& b,
                                          std::shared_ptr<snapshot::ChunkSource> remote,
                                          std::shared_ptr<snapshot::ChunkSource> disk,
                                          const std::function<void()>& held_up, const std::function<void()>& release) {
  fault::EngineOptions eo;
  eo.demand_deadline = std::chrono::seconds(60);
  fault::FaultEngine engine(kf, eo);
  ASSERT_TRUE(engine.start().ok());
  auto id_a = engine.add_session(session_of("a", a, std::move(remote)));  // first: its reader opens first
  ASSERT_TRUE(id_a.ok()) << id_a.error().message();
  held_up();
  if (::testing::Test::HasFatalFailure()) return;
  auto id_b = engine.add_session(session_of("b", b, std::move(disk)));
  ASSERT_TRUE(id_b.ok()) << id_b.error().message();
  a.read_every_page();  // its faults wait
  b.read_every_page();
  ASSERT_TRUE(b.exited_within(std::chrono::seconds(20))) << "B's process never finished";
  const int status_b = b.wait();
  ASSERT_TRUE(WIFEXITED(status_b) && WEXITSTATUS(status_b) == 0) << "B's process: wait status " << status_b;
  Status complete_b = engine.wait_complete(*id_b, std::chrono::seconds(10));
  EXPECT_TRUE(complete_b.ok()) << complete_b.error().message();
  auto info_a = engine.session_info(*id_a);
  ASSERT_TRUE(info_a.has_value());
  EXPECT_FALSE(info_a->failed) << "A failed before B was done: " << info_a->failure;
  EXPECT_FALSE(info_a->complete) << "A completed while held up";
  EXPECT_FALSE(a.exited_within(std::chrono::milliseconds(0))) << "A's process ended while held up";

  release();
  ASSERT_TRUE(a.exited_within(std::chrono::seconds(60))) << "A's process never finished";
  const int status_a = a.wait();
  EXPECT_TRUE(WIFEXITED(status_a) && WEXITSTATUS(status_a) == 0) << "A's process: wait status " << status_a;
  Status complete_a = engine.wait_complete(*id_a, std::chrono::seconds(60));
  EXPECT_TRUE(complete_a.ok()) << complete_a.error().message();
  engine.remove_session(*id_a);
  engine.remove_session(*id_b);
  engine.stop();
}

// The engine opens each session's chunk reader on its own thread, the one that serves every
// other session (of an agent: every process on the host). A page server that accepts and then
// never answers (stopped, SIGSTOP: its kernel still takes connections) must not hold up the
// faults of other sessions while a first connection to it waits.
TEST_F(PageServerTest, FirstConnectionToAStoppedServerNeverBlocksTheEngine) {
  ScratchDir local;
  capture(8 * kMiB, 48);
  std::filesystem::rename(dir_.path() + "/snap", local.path() + "/snap");
  const std::vector<std::byte> expected_b = expected_;
  capture(8 * kMiB, 49);
  ServerProcess server;
  fork_server(server);
  if (HasFatalFailure()) return;
  RestoreOptions o;
  o.fault_deadline = std::chrono::seconds(60);
  o.fetch_attempts = 10;  // with 5 s attempts (the most a slice gets): A keeps trying for the minute
  auto remote = open_chunk_source("lazymem://127.0.0.1:" + std::to_string(server.port) + "/snap", o);
  ASSERT_TRUE(remote.ok()) << remote.error().message();
  auto disk = open_chunk_source(local.path() + "/snap", o);
  ASSERT_TRUE(disk.ok()) << disk.error().message();
  RestoredChild a, b;  // forked before the engine starts its threads
  fork_restored((*remote)->manifest().regions[0], expected_, a);
  if (HasFatalFailure()) return;
  fork_restored((*disk)->manifest().regions[0], expected_b, b);
  if (HasFatalFailure()) return;

  ASSERT_EQ(::kill(server.pid, SIGSTOP), 0);  // before A's reader connects
  expect_others_served_while_one_waits(
      kf_, a, b, *remote, *disk, [] {}, [&] { ASSERT_EQ(::kill(server.pid, SIGCONT), 0); });
}

// A page server named by a host name: the engine's thread, which serves every session of the
// host, must not wait on DNS either (a reader's first connection, every reconnect: the name is
// looked up afresh each time). The resolver really asks a DNS server of the test's own, which
// holds its queries as a DNS server that is down would: session A's name is being looked up
// (its query is held) while session B is served. Before lookups moved off the engine's thread,
// B waited out the resolver's 30 s timeout.
TEST_F(PageServerTest, LookingUpAServersNameNeverBlocksTheEngine) {
  const std::string kName = "pageserver.lazymem.test";
  ScratchDir local;
  capture(8 * kMiB, 51);
  std::filesystem::rename(dir_.path() + "/snap", local.path() + "/snap");
  const std::vector<std::byte> expected_b = expected_;
  capture(8 * kMiB, 52);
  ServerProcess server;
  fork_server(server);
  if (HasFatalFailure()) return;
  RestoreOptions o;
  o.fault_deadline = std::chrono::seconds(60);
  o.fetch_attempts = 10;
  auto served = open_chunk_source(dir_.path() + "/snap", o);  // its regions, before any thread
  ASSERT_TRUE(served.ok()) << served.error().message();
  auto disk = open_chunk_source(local.path() + "/snap", o);
  ASSERT_TRUE(disk.ok()) << disk.error().message();
  RestoredChild a, b;
  fork_restored((*served)->manifest().regions[0], expected_, a);
  if (HasFatalFailure()) return;
  fork_restored((*disk)->manifest().regions[0], expected_b, b);
  if (HasFatalFailure()) return;

  testing::FakeDns dns(kName, "127.0.0.153");
  const std::string skip = dns.use_for_this_thread(dir_.path() + "/resolv.conf");
  if (!skip.empty()) GTEST_SKIP() << skip;
  auto remote = open_chunk_source(fmt::format("lazymem://{}:{}/snap", kName, server.port), o);
  ASSERT_TRUE(remote.ok()) << remote.error().message();
  ASSERT_GT(dns.queries(), 0u) << "the name was not looked up through our DNS server";

  dns.hold();
  expect_others_served_while_one_waits(
      kf_, a, b, *remote, *disk,
      [&] { ASSERT_TRUE(dns.wait_held(std::chrono::seconds(20))) << "A's reader never asked for the server's name"; },
      [&] {
        EXPECT_GT(dns.held(), 0u) << "A's lookup was answered by something else";
        dns.answer_held();
      });
}

// One lookup of a name at a time: readers reconnecting to a server whose DNS is down share it
// (a thread per name, not one per reconnect). A numeric address needs no lookup at all; a name
// that does not exist is a clear error.
TEST_F(PageServerTest, NameLookupsAreSharedWhileUnderWay) {
  testing::FakeDns dns("shared.lazymem.test", "127.0.0.154");
  const std::string skip = dns.use_for_this_thread(dir_.path() + "/resolv.conf");
  if (!skip.empty()) GTEST_SKIP() << skip;
  auto numeric = net::Lookup::start("127.0.0.1", 7000);
  ASSERT_TRUE(numeric->done());
  ASSERT_TRUE(numeric->result().ok());
  EXPECT_EQ(numeric->fd(), -1);

  dns.hold();
  auto first = net::Lookup::start("shared.lazymem.test", 7000);
  auto second = net::Lookup::start("shared.lazymem.test", 7000);
  EXPECT_EQ(first, second);
  auto other_port = net::Lookup::start("shared.lazymem.test", 7001);
  EXPECT_NE(first, other_port);
  EXPECT_FALSE(first->done());
  dns.answer_held();
  for (auto* l : {&first, &other_port}) {
    pollfd p{(*l)->fd(), POLLIN, 0};
    ASSERT_EQ(::poll(&p, 1, 20000), 1) << "the lookup never said it was done";
    ASSERT_TRUE((*l)->done());
    ASSERT_TRUE((*l)->result().ok()) << (*l)->result().error().message();
    const auto& addrs = *(*l)->result();
    ASSERT_EQ(addrs.size(), 1u);
    const auto* in = reinterpret_cast<const sockaddr_in*>(&addrs[0].addr);
    EXPECT_EQ(in->sin_family, AF_INET);
    EXPECT_EQ(ntohl(in->sin_addr.s_addr), INADDR_LOOPBACK);
  }
  EXPECT_EQ(ntohs(reinterpret_cast<const sockaddr_in*>(&(*first->result())[0].addr)->sin_port), 7000);
  EXPECT_EQ(ntohs(reinterpret_cast<const sockaddr_in*>(&(*other_port->result())[0].addr)->sin_port), 7001);
  auto again = net::Lookup::start("shared.lazymem.test", 7000);  // the last one is done: a fresh one
  EXPECT_NE(again, first);

  auto unknown = net::Lookup::start("nowhere.lazymem.test", 7000);
  pollfd p{unknown->fd(), POLLIN, 0};
  ASSERT_EQ(::poll(&p, 1, 20000), 1);
  ASSERT_TRUE(unknown->done());  // what orders the result before its reading
  ASSERT_FALSE(unknown->result().ok());
  EXPECT_NE(unknown->result().error().message().find("nowhere.lazymem.test"), std::string::npos)
      << unknown->result().error().message();
}

// A reader dialing a name waits on the lookup's descriptor, then on a socket per address it
// tries: each must wake the reader's set (which the engine waits on) in turn, and the one before
// be taken out of it. The name's first address refuses (nothing listens there), its second is
// the server's. Two readers share one lookup; the first is driven, as the engine does, only
// when its set wakes, until its chunk comes; then its set must be quiet while the second still
// holds the finished lookup's descriptor (readable for good: left in the set, it would keep the
// engine's thread spinning). Then the second is driven likewise.
TEST_F(PageServerTest, AReaderDialingANameIsWokenByEachStepAndThenQuiet) {
  capture(4 * kMiB, 53);
  start_server();
  testing::FakeDns dns("two.lazymem.test", "127.0.0.155", {"127.0.0.3", "127.0.0.1"});
  const std::string skip = dns.use_for_this_thread(dir_.path() + "/resolv.conf");
  if (!skip.empty()) GTEST_SKIP() << skip;
  auto source = open_chunk_source(fmt::format("lazymem://two.lazymem.test:{}/snap", server_->port()), {});
  ASSERT_TRUE(source.ok()) << source.error().message();
  dns.hold();
  auto first = (*source)->open_reader();
  ASSERT_TRUE(first.ok()) << first.error().message();
  auto second = (*source)->open_reader();
  ASSERT_TRUE(second.ok()) << second.error().message();
  CountedChunks sink1, sink2;
  snapshot::ChunkRequest rq{snapshot::ChunkRef{0, 1}, 7, true};
  ASSERT_TRUE((*first)->submit(std::span(&rq, 1)).ok());
  ASSERT_TRUE((*second)->submit(std::span(&rq, 1)).ok());
  ASSERT_TRUE(dns.wait_held(std::chrono::seconds(20))) << "the readers did not look the name up";
  dns.answer_held();

  auto drive = [](snapshot::ChunkReader& r, CountedChunks& sink) {
    while (sink.chunks == 0) {
      pollfd p{r.wait_fd(), POLLIN, 0};
      ASSERT_EQ(::poll(&p, 1, 2000), 1) << "the reader's set did not wake for the step its connection waits on";
      auto n = r.poll(sink, false, 16);
      ASSERT_TRUE(n.ok()) << n.error().message();
    }
  };
  drive(**first, sink1);
  if (HasFatalFailure()) return;
  pollfd p{(*first)->wait_fd(), POLLIN, 0};
  EXPECT_EQ(::poll(&p, 1, 200), 0) << "the reader's set is readable with nothing to do";
  drive(**second, sink2);
  if (HasFatalFailure()) return;
  p = {(*second)->wait_fd(), POLLIN, 0};
  EXPECT_EQ(::poll(&p, 1, 200), 0) << "the reader's set is readable with nothing to do";
}

// A slow resolver (its first nameserver down: every lookup takes seconds) whose answers come
// just after two attempts' slices: a reader's attempt still looking the name up when its slice
// ends goes on waiting for it (the slice counts as an attempt). Before, the attempt gave up and
// the next joined the lookup under way, but one that finished during the pause before the next
// attempt was lost: that attempt began a lookup of its own, and here the reader failed with the
// resolver working. Slices here are 1.2 s (3.6 s, 2 attempts); each answer comes 2.42 s after
// its query.
TEST_F(PageServerTest, AReaderWaitsOutASlowResolver) {
  capture(4 * kMiB, 54);
  start_server();
  testing::FakeDns dns("slow.lazymem.test", "127.0.0.156");
  const std::string skip = dns.use_for_this_thread(dir_.path() + "/resolv.conf");
  if (!skip.empty()) GTEST_SKIP() << skip;
  dns.answer_after(std::chrono::milliseconds(2420));
  RestoreOptions o;
  o.fault_deadline = std::chrono::milliseconds(3600);
  o.fetch_attempts = 2;
  ASSERT_EQ(snapshot::attempt_slice(o.fault_deadline, o.fetch_attempts), std::chrono::milliseconds(1200));
  auto source = open_chunk_source(fmt::format("lazymem://slow.lazymem.test:{}/snap", server_->port()), o);
  ASSERT_TRUE(source.ok()) << source.error().message();
  auto reader = (*source)->open_reader();
  ASSERT_TRUE(reader.ok()) << reader.error().message();
  CountedChunks sink;
  const snapshot::ChunkRef chunk{0, 1};
  Status read = snapshot::read_chunks(**reader, std::span(&chunk, 1), sink, std::chrono::seconds(20));
  ASSERT_TRUE(read.ok()) << read.error().message();
  EXPECT_EQ(sink.chunks, 1u) << "the chunk never came";
}

// A location whose first server's name cannot be looked up (its DNS server silent), its second
// an address: a reader fails over an attempt's slice after it began, as from a silent server,
// rather than keep waiting on the name (which it does when the name is the only server).
TEST_F(PageServerTest, ASilentResolverDoesNotStopTheFailover) {
  capture(4 * kMiB, 55);
  start_server();
  testing::FakeDns dns("silent.lazymem.test", "127.0.0.157");
  const std::string skip = dns.use_for_this_thread(dir_.path() + "/resolv.conf");
  if (!skip.empty()) GTEST_SKIP() << skip;
  dns.hold();
  RestoreOptions o;
  o.fault_deadline = std::chrono::milliseconds(3600);
  o.fetch_attempts = 2;  // 1.2 s slices
  auto source = open_chunk_source(
      fmt::format("lazymem://silent.lazymem.test:{},127.0.0.1:{}/snap", server_->port(), server_->port()), o);
  ASSERT_TRUE(source.ok()) << source.error().message();  // from the second, once the first's share ran out
  auto reader = (*source)->open_reader();
  ASSERT_TRUE(reader.ok()) << reader.error().message();
  CountedChunks sink;
  const snapshot::ChunkRef chunk{0, 1};
  Status read = snapshot::read_chunks(**reader, std::span(&chunk, 1), sink, std::chrono::seconds(20));
  ASSERT_TRUE(read.ok()) << read.error().message();
  EXPECT_EQ(sink.chunks, 1u) << "the chunk never came";
  EXPECT_GT(dns.held(), 0u) << "the first server's name was not asked for";
  dns.answer_held();  // the lookup's thread ends now, not at the resolver's timeout
}

// The first connection of a reader is made in the background, so its refusal is no longer
// opening's error: it comes from poll(), where a blocking caller (eager restore, verify) waits
// for it, and it is the failure an engine's session reports. Both say why. Here the server's
// token changes between the manifest and the reader.
TEST_F(PageServerTest, FirstConnectionRefusedIsAClearError) {
  capture(4 * kMiB, 50);
  start_server("correct horse battery staple");
  const std::string good = dir_.path() + "/good.token";
  std::ofstream(good) << "correct horse battery staple\n";
  RestoreOptions o;
  o.token_file = good;
  auto source = open_chunk_source(uri(), o);
  ASSERT_TRUE(source.ok()) << source.error().message();
  pageserver::ServerOptions changed;
  changed.port = server_->port();
  changed.token = "another token, long enough too";
  stop_server();
  server_.reset();
  start_server(changed);

  auto reader = (*source)->open_reader();
  ASSERT_TRUE(reader.ok()) << "opening a reader waited for the server: " << reader.error().message();
  struct Sink final : snapshot::ChunkSink {
    size_t chunks = 0;
    void on_chunk(uint64_t, std::span<const std::byte>) override { ++chunks; }
    void on_chunk_error(uint64_t, const Error&) override {}
  } sink;
  Status read = snapshot::read_chunks(**reader, snapshot::stored_chunks((*source)->manifest()), sink,
                                      std::chrono::seconds(30));
  ASSERT_FALSE(read.ok()) << "read every chunk with the wrong token";
  EXPECT_EQ(read.error().code(), Errc::kPermission) << read.error().message();
  EXPECT_NE(read.error().message().find("wrong token"), std::string::npos) << read.error().message();
  EXPECT_EQ(sink.chunks, 0u);

  // In this process, untouched: prefetch asks, and the session fails with the reason.
  const RegionInfo& r = (*source)->manifest().regions[0];
  auto map = sys::Mapping::anonymous_at(r.start_address, r.length, PROT_READ | PROT_WRITE);
  ASSERT_TRUE(map.ok()) << map.error().message();
  auto uffd = sys::Uffd::open(0);
  ASSERT_TRUE(uffd.ok()) << uffd.error().message();
  ASSERT_TRUE(uffd->register_missing(r.start_address, r.length).ok());
  fault::EngineOptions eo;
  eo.kill_on_failure = false;  // the process is this test
  fault::FaultEngine engine(kf_, eo);
  ASSERT_TRUE(engine.start().ok());
  fault::SessionSpec spec;
  spec.name = "refused";
  spec.uffd = std::move(*uffd);
  spec.source = *source;
  spec.ranges = {fault::MappedRange{r.start_address, r.length, 0, 0}};
  auto id = engine.add_session(std::move(spec));
  ASSERT_TRUE(id.ok()) << id.error().message();
  Status done = engine.wait_complete(*id, std::chrono::seconds(30));
  ASSERT_FALSE(done.ok()) << "a restore with the wrong token completed";
  EXPECT_NE(done.error().message().find("wrong token"), std::string::npos) << done.error().message();
  engine.remove_session(*id);
  engine.stop();
}

// A second "host": the page server runs in its own network namespace, reached over a veth pair.
TEST_F(PageServerTest, RestoresFromAnotherHostInANetworkNamespace) {
  VethHost host;
  if (std::string why = host.create(); !why.empty()) GTEST_SKIP() << why;
  if (HasFailure()) return;
  const std::string& ns = host.ns;
  capture(256 * kMiB, 26);

  int portpipe[2];
  ASSERT_EQ(::pipe(portpipe), 0);
  pid_t server = ::fork();
  ASSERT_GE(server, 0);
  if (server == 0) {
    int nsfd = ::open(("/var/run/netns/" + ns).c_str(), O_RDONLY | O_CLOEXEC);
    if (nsfd < 0 || ::setns(nsfd, CLONE_NEWNET) != 0) _exit(3);
    pageserver::ServerOptions o;
    o.store_dir = dir_.path();
    o.host = host.far();
    auto s = pageserver::PageServer::listen(o);
    if (!s.ok()) _exit(4);
    uint16_t port = (*s)->port();
    (void)!::write(portpipe[1], &port, sizeof port);
    (void)(*s)->run();
    _exit(0);
  }
  ::close(portpipe[1]);  // a server that dies early gives end-of-file, not a wait forever
  uint16_t port = 0;
  ASSERT_EQ(::read(portpipe[0], &port, sizeof port), static_cast<ssize_t>(sizeof port));
  restore_and_compare("lazymem://" + host.far() + ":" + std::to_string(port) + "/snap", RestoreOptions{});
  ::kill(server, SIGKILL);
  ::waitpid(server, nullptr, 0);
}


// getPage spoken on the wire directly: no userfaultfd needed.
class GetPageTest : public PageServerTest {
 protected:
  void SetUp() override {}

  // Mixed data (text chunks first: seed % 4 == 1) as snapshot `name`, in the given format, with
  // a zero page (1) and an incompressible page (2) planted in chunk 1. A length that is not a
  // multiple of the chunk size leaves the last chunk short.
  void capture_as(const std::string& name, size_t len, uint64_t seed, uint32_t format) {
    void* p = testing::map_for_capture(len, seed);
    ASSERT_NE(p, nullptr);
    auto* b = static_cast<std::byte*>(p);
    testing::fill_mixed(b, len, seed);
    std::memset(b + kDefaultChunkSize + 4096, 0, 4096);
    std::mt19937_64 rng(seed);
    for (size_t i = 0; i < 4096; i += 8) {
      uint64_t v = rng();
      std::memcpy(b + kDefaultChunkSize + 2 * 4096 + i, &v, 8);
    }
    expected_.assign(b, b + len);
    len_ = len;
    CaptureRegion r{"heap", p, len, PROT_READ | PROT_WRITE};
    CaptureOptions o;
    o.format_version = format;
    auto rep = capture_regions(dir_.path() + "/" + name, std::span(&r, 1), o);
    ASSERT_TRUE(rep.ok()) << rep.error().message();
    ::munmap(p, len);
    auto m = read_manifest(dir_.path() + "/" + name);
    ASSERT_TRUE(m.ok()) << m.error().message();
    man_ = std::move(*m);
    auto d = snapshot::DecodeDictionary::load(man_.dictionary);
    ASSERT_TRUE(d.ok()) << d.error().message();
    dict_ = std::move(*d);
  }

  void connect() {
    auto loc = SnapshotLocation::parse(uri());
    ASSERT_TRUE(loc.ok());
    auto fd = net::open_connection(*loc, "", deadline());
    ASSERT_TRUE(fd.ok()) << fd.error().message();
    fd_ = std::move(*fd);
  }
  // A connection as a client from before ErrorCode corrupt makes it: its hello says nothing of it.
  void connect_as_older_client() {
    auto fd = net::dial("127.0.0.1", server_->port(), deadline());
    ASSERT_TRUE(fd.ok()) << fd.error().message();
    fd_ = std::move(*fd);
    in_ = net::FrameBuffer();
    capnp::MallocMessageBuilder m;
    auto rq = m.initRoot<proto::wire::Request>();
    rq.setId(1);
    auto h = rq.initHello();
    h.setVersion(proto::wire::PROTOCOL_VERSION);
    const std::array<kj::byte, 32> nonce{};
    h.setClientNonce(capnp::Data::Reader(nonce.data(), nonce.size()));
    ASSERT_TRUE(net::send_frame(fd_.get(), m, {}, deadline()).ok());
    auto f = recv();
    ASSERT_TRUE(f.header);
    ASSERT_TRUE(f.header->root<proto::wire::Reply>().isHello());
  }
  static net::Deadline deadline() { return std::chrono::steady_clock::now() + std::chrono::seconds(10); }

  static void get_page(capnp::MallocMessageBuilder& m, const std::string& snap, uint32_t region, uint32_t chunk,
                       uint32_t page, uint64_t tag) {
    auto rq = m.initRoot<proto::wire::Request>();
    rq.setId(tag + 1000);
    auto g = rq.initGetPage();
    g.setSnapshot(snap);
    g.setRegion(region);
    g.setChunk(chunk);
    g.setPage(page);
    g.setTag(tag);
  }
  void send_get_page(const std::string& snap, uint32_t region, uint32_t chunk, uint32_t page, uint64_t tag) {
    capnp::MallocMessageBuilder m;
    get_page(m, snap, region, chunk, page, tag);
    ASSERT_TRUE(net::send_frame(fd_.get(), m, {}, deadline()).ok());
  }
  net::OwnedFrame recv() {
    auto f = net::recv_frame(fd_.get(), in_, deadline());
    EXPECT_TRUE(f.ok()) << f.error().message();
    return f.ok() ? std::move(*f) : net::OwnedFrame{};
  }
  proto::wire::ServerStats::Reader wire_stats(net::OwnedFrame& holder) {
    capnp::MallocMessageBuilder m;
    auto rq = m.initRoot<proto::wire::Request>();
    rq.setId(77);
    rq.setStats();
    EXPECT_TRUE(net::send_frame(fd_.get(), m, {}, deadline()).ok());
    holder = recv();
    auto r = holder.header->root<proto::wire::Reply>();
    EXPECT_TRUE(r.isStats());
    return r.getStats();
  }

  // The reply to getPage(region 0, chunk, page, tag) is that page, every byte: from its frame
  // alone (whole = false), or from the whole stored chunk, verified. Returns whether it was whole.
  bool check_page_reply(net::OwnedFrame& f, uint32_t chunk, uint32_t page, uint64_t tag) {
    auto r = f.header->root<proto::wire::Reply>();
    EXPECT_EQ(r.getId(), tag + 1000);
    if (!r.isPage()) {
      ADD_FAILURE() << "chunk " << chunk << " page " << page << ": not a page reply"
                    << (r.isError() ? std::string(": ") + r.getError().getMessage().cStr() : "");
      return false;
    }
    auto pg = r.getPage();
    EXPECT_EQ(pg.getRegion(), 0u);
    EXPECT_EQ(pg.getChunk(), chunk);
    EXPECT_EQ(pg.getPage(), page);
    EXPECT_EQ(pg.getTag(), tag);
    const ChunkInfo& ci = man_.regions[0].chunks[chunk];
    const uint32_t ps = man_.regions[0].page_size;
    std::vector<std::byte> out(man_.chunk_length(0, chunk));
    std::span<const std::byte> got;
    if (!pg.getWhole()) {
      EXPECT_EQ(ci.codec, Codec::kZstdPages) << "a page frame alone comes only from a page-frame chunk";
      EXPECT_LT(f.payload.size(), ps);
      EXPECT_EQ(pg.getStoredChecksum(), ci.stored_checksum) << "the client matches it against its manifest";
      Status s = dec_.decode_frame(f.payload, std::span(out).first(ps), {ps, dict_ ? dict_->get() : nullptr});
      EXPECT_TRUE(s.ok()) << "chunk " << chunk << " page " << page << ": " << s.error().message();
      got = std::span(out).first(ps);
    } else {
      EXPECT_EQ(f.payload.size(), ci.stored_length);
      Status s = dec_.decode(ci, f.payload, out, {ps, dict_ ? dict_->get() : nullptr});
      EXPECT_TRUE(s.ok()) << "chunk " << chunk << ": " << s.error().message();
      got = std::span(out).subspan(size_t{page} * ps, ps);
    }
    size_t at = size_t{chunk} * man_.chunk_size + size_t{page} * ps;
    EXPECT_EQ(std::memcmp(got.data(), expected_.data() + at, ps), 0) << "chunk " << chunk << " page " << page;
    return pg.getWhole();
  }

  // Asks for every page of every stored chunk of snapshot `name`; returns replies sent as a
  // frame alone (the rest were whole chunks).
  uint64_t get_every_page(const std::string& name) {
    uint64_t frames = 0;
    for (uint32_t c = 0; c < man_.regions[0].chunks.size(); ++c) {
      const ChunkInfo& ci = man_.regions[0].chunks[c];
      if (ci.codec == Codec::kZero) continue;  // never asked for: the client zero-fills those
      uint32_t pages = man_.chunk_length(0, c) / man_.regions[0].page_size;
      for (uint32_t p = 0; p < pages; ++p) {  // pipelined: every request of the chunk, then the replies
        send_get_page(name, 0, c, p, uint64_t{c} << 16 | p);
      }
      for (uint32_t p = 0; p < pages; ++p) {
        auto f = recv();
        if (!f.header) return frames;
        bool whole = check_page_reply(f, c, p, uint64_t{c} << 16 | p);
        frames += !whole;
        if (man_.format_version >= 2 && c == 1) {
          EXPECT_EQ(ci.codec, Codec::kZstdPages);
          EXPECT_EQ(whole, p == 1 || p == 2) << "zero and raw page frames go as the whole chunk; page " << p;
        }
      }
    }
    return frames;
  }

  // openDatagrams on the connection: its reply.
  net::OwnedFrame open_datagrams() {
    capnp::MallocMessageBuilder m;
    auto rq = m.initRoot<proto::wire::Request>();
    rq.setId(3);
    rq.setOpenDatagrams();
    EXPECT_TRUE(net::send_frame(fd_.get(), m, {}, deadline()).ok());
    return recv();
  }
  // The session openDatagrams gives (all zero, and a failure, without one).
  std::array<std::byte, 16> datagram_session() {
    std::array<std::byte, 16> session{};
    auto f = open_datagrams();
    if (!f.header) return session;
    auto r = f.header->root<proto::wire::Reply>();
    EXPECT_TRUE(r.isDatagrams());
    if (!r.isDatagrams() || r.getDatagrams().getSession().size() != session.size()) {
      ADD_FAILURE() << "no 16-byte session";
      return session;
    }
    EXPECT_GE(r.getDatagrams().getMaxPayload(), 4096u);
    std::memcpy(session.data(), r.getDatagrams().getSession().begin(), session.size());
    return session;
  }
  // A UDP socket bound to `source`, connected to the server's port at `host` (IPv4 or IPv6).
  sys::UniqueFd udp_socket(const char* source, const char* host = "127.0.0.1") {
    const bool v6 = std::strchr(source, ':') != nullptr;
    // `ip` with `port` as a socket address of the family.
    auto address = [v6](const char* ip, uint16_t port, sockaddr_storage& ss) -> socklen_t {
      ss = {};
      if (v6) {
        auto& a = reinterpret_cast<sockaddr_in6&>(ss);
        a.sin6_family = AF_INET6;
        a.sin6_port = htons(port);
        ::inet_pton(AF_INET6, ip, &a.sin6_addr);
        return sizeof a;
      }
      auto& a = reinterpret_cast<sockaddr_in&>(ss);
      a.sin_family = AF_INET;
      a.sin_port = htons(port);
      ::inet_pton(AF_INET, ip, &a.sin_addr);
      return sizeof a;
    };
    sys::UniqueFd u(::socket(v6 ? AF_INET6 : AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    sockaddr_storage ss;
    socklen_t len = address(source, 0, ss);
    EXPECT_EQ(::bind(u.get(), reinterpret_cast<sockaddr*>(&ss), len), 0) << std::strerror(errno);
    len = address(host, server_->port(), ss);
    EXPECT_EQ(::connect(u.get(), reinterpret_cast<sockaddr*>(&ss), len), 0) << std::strerror(errno);
    return u;
  }
  // A getPage datagram of snapshot "snap" with `session`; `on_stream`: replyOnStream.
  static std::vector<std::byte> page_datagram(uint32_t chunk, uint32_t page, uint64_t tag,
                                              std::span<const std::byte> session, bool on_stream = false) {
    capnp::MallocMessageBuilder m;
    get_page(m, "snap", 0, chunk, page, tag);
    auto gp = m.getRoot<proto::wire::Request>().getGetPage();
    gp.setSession(capnp::Data::Reader(reinterpret_cast<const kj::byte*>(session.data()), session.size()));
    gp.setReplyOnStream(on_stream);
    return net::encode_frame(m, 0);
  }
  // The datagram answer to a replyOnStream request with `tag` is the onStream notice.
  static void expect_on_stream_notice(int u, uint64_t tag) {
    auto f = datagram_answer(u, std::chrono::seconds(5));
    ASSERT_TRUE(f.header) << "no onStream notice";
    auto r = f.header->root<proto::wire::Reply>();
    ASSERT_TRUE(r.isError()) << "not a notice";
    EXPECT_EQ(r.getError().getCode(), proto::wire::ErrorCode::ON_STREAM);
    EXPECT_EQ(r.getError().getTag(), tag);
  }
  static void send_datagram(int u, const std::vector<std::byte>& d) {
    ASSERT_EQ(::send(u, d.data(), d.size(), 0), static_cast<ssize_t>(d.size())) << std::strerror(errno);
  }
  // The next datagram on `u` as a frame; none within `wait`: no header.
  static net::OwnedFrame datagram_answer(int u, std::chrono::milliseconds wait) {
    net::OwnedFrame f;
    pollfd p{u, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(wait.count())) != 1) return f;
    std::vector<std::byte> d(70000);
    ssize_t n = ::recv(u, d.data(), d.size(), 0);
    EXPECT_GE(n, 8);
    if (n < 8) return f;
    uint32_t hl = 0, pl = 0;
    std::memcpy(&hl, d.data(), 4);
    std::memcpy(&pl, d.data() + 4, 4);
    EXPECT_EQ(size_t{8} + hl + pl, static_cast<size_t>(n)) << "one frame per datagram";
    if (size_t{8} + hl + pl != static_cast<size_t>(n)) return f;
    auto h = net::Header::parse(std::span(d).subspan(8, hl));
    EXPECT_TRUE(h.ok());
    if (!h.ok()) return f;
    f.header = std::move(*h);
    f.payload.assign(d.begin() + 8 + hl, d.begin() + 8 + hl + pl);
    return f;
  }
  // Flips a bit of stored chunk `c` of snapshot "snap" on disk, inside its last frame.
  void damage_on_disk(uint32_t c) {
    const ChunkInfo& ci = man_.regions[0].chunks[c];
    std::fstream data(dir_.path() + "/snap/" + snapshot::kDataFile, std::ios::in | std::ios::out | std::ios::binary);
    ASSERT_TRUE(data.good());
    auto at = static_cast<std::streamoff>(ci.offset + ci.stored_length - 10);
    data.seekg(at);
    char b = 0;
    data.read(&b, 1);
    data.seekp(at);
    b = static_cast<char>(b ^ 0x40);
    data.write(&b, 1);
    ASSERT_TRUE(data.good());
  }
  // Chunk `c` of snapshot "snap" read into the server's memory, by a getPage on the connection:
  // a datagram asking for a chunk still on disk is told to use the connection.
  void warm(uint32_t c) {
    send_get_page("snap", 0, c, 0, 999);
    auto f = recv();
    ASSERT_TRUE(f.header);
    ASSERT_TRUE(f.header->root<proto::wire::Reply>().isPage()) << "chunk " << c;
  }
  // The size of page `page`'s frame in stored chunk `c` of snapshot "snap", as on disk.
  size_t frame_size(uint32_t c, uint32_t page) {
    const ChunkInfo& ci = man_.regions[0].chunks[c];
    std::vector<std::byte> stored(ci.stored_length);
    std::ifstream data(dir_.path() + "/snap/" + snapshot::kDataFile, std::ios::binary);
    data.seekg(static_cast<std::streamoff>(ci.offset));
    data.read(reinterpret_cast<char*>(stored.data()), static_cast<std::streamsize>(stored.size()));
    EXPECT_TRUE(data.good());
    return snapshot::page_frame(stored, man_.chunk_length(0, c), man_.regions[0].page_size, page).size();
  }
  // The first page of snapshot "snap" stored as a zstd frame of [min, max) bytes: (chunk, page).
  std::optional<std::pair<uint32_t, uint32_t>> page_with_frame(size_t min, size_t max) {
    for (uint32_t c = 0; c < man_.regions[0].chunks.size(); ++c) {
      if (man_.regions[0].chunks[c].codec != Codec::kZstdPages) continue;
      for (uint32_t p = 0; p < man_.chunk_length(0, c) / 4096; ++p) {
        const size_t n = frame_size(c, p);
        if (n >= min && n < max) return {{c, p}};
      }
    }
    return std::nullopt;
  }
  uint32_t first_page_frame_chunk() const {
    uint32_t c = 0;
    while (man_.regions[0].chunks[c].codec != Codec::kZstdPages) ++c;
    return c;
  }

  Manifest man_;
  std::shared_ptr<const snapshot::DecodeDictionary> dict_;
  snapshot::ChunkDecoder dec_;
  sys::UniqueFd fd_;
  net::FrameBuffer in_;
};

// Every page of every stored chunk: a page of a page-frame chunk stored as a zstd frame comes
// as that frame alone and decodes to the captured bytes; zero and raw pages, raw chunks and a
// format-1 snapshot come as the whole chunk. Some chunk straddles two cache extents.
TEST_F(GetPageTest, ServesEveryPageAsItsFrameOrTheWholeChunk) {
  const size_t len = 8 * kMiB + 3 * 4096;  // the last chunk holds 3 pages
  capture_as("v2", len, 41, 2);
  Manifest v2 = man_;
  start_server();
  connect();
  bool straddles = false;
  for (const ChunkInfo& ci : v2.regions[0].chunks) {
    straddles |= ci.codec == Codec::kZstdPages && ci.offset / (64 << 10) != (ci.offset + ci.stored_length - 1) / (64 << 10);
  }
  EXPECT_TRUE(straddles) << "no page-frame chunk crosses an extent: the copy into one span goes untested";
  ASSERT_EQ(v2.regions[0].chunks.back().codec, Codec::kZstdPages);

  uint64_t frames = get_every_page("v2");
  EXPECT_GT(frames, 0u);
  auto st = server_->stats();
  EXPECT_EQ(st.pages, frames);
  EXPECT_EQ(st.errors_corrupt + st.errors_io + st.errors_range, 0u);
  net::OwnedFrame holder;
  auto ws = wire_stats(holder);
  EXPECT_EQ(ws.getPages(), frames);
  EXPECT_EQ(ws.getErrorsCorrupt(), 0u);

  // Format 1 (one zstd frame per chunk): always the whole chunk.
  capture_as("v1", len, 42, 1);
  EXPECT_EQ(get_every_page("v1"), 0u);
  EXPECT_EQ(server_->stats().pages, frames);
}

// A page outside its chunk (the short last chunk's limit is its own length, not the chunk
// size), a chunk or region outside the snapshot, an unknown snapshot: an error carrying the
// tag, and the connection goes on.
TEST_F(GetPageTest, OutOfRangeAndUnknownAreErrorsWithTheTag) {
  capture_as("snap", 4 * kMiB + 3 * 4096, 45, 2);
  start_server();
  connect();
  const uint32_t last = static_cast<uint32_t>(man_.regions[0].chunks.size() - 1);
  struct Case {
    std::string snap;
    uint32_t region, chunk, page;
    proto::wire::ErrorCode code;
  };
  const Case cases[] = {
      {"snap", 0, 0, 16, proto::wire::ErrorCode::OUT_OF_RANGE},
      {"snap", 0, last, 3, proto::wire::ErrorCode::OUT_OF_RANGE},
      {"snap", 0, last + 1, 0, proto::wire::ErrorCode::OUT_OF_RANGE},
      {"snap", 1, 0, 0, proto::wire::ErrorCode::OUT_OF_RANGE},
      {"snap", 0, 0, ~0u, proto::wire::ErrorCode::OUT_OF_RANGE},
      {"nope", 0, 0, 0, proto::wire::ErrorCode::NOT_FOUND},
  };
  uint64_t tag = 500;
  for (const Case& k : cases) {
    send_get_page(k.snap, k.region, k.chunk, k.page, ++tag);
    auto f = recv();
    ASSERT_TRUE(f.header);
    auto r = f.header->root<proto::wire::Reply>();
    ASSERT_TRUE(r.isError()) << k.snap << " " << k.region << "/" << k.chunk << " page " << k.page;
    EXPECT_EQ(r.getError().getCode(), k.code);
    EXPECT_EQ(r.getError().getTag(), tag);
    EXPECT_EQ(r.getId(), tag + 1000);
  }
  // The last page of the short chunk is served.
  send_get_page("snap", 0, last, 2, 9);
  auto f = recv();
  ASSERT_TRUE(f.header);
  check_page_reply(f, last, 2, 9);
  EXPECT_EQ(server_->stats().errors_range, 5u);
  EXPECT_EQ(server_->stats().errors_not_found, 1u);
}

// A stored chunk damaged on the server's disk: getPage refuses it (CORRUPT naming it, with the
// tag; counted once as corrupt), and the connection keeps being served.
TEST_F(GetPageTest, CorruptStoredChunkIsRefusedAndServingGoesOn) {
  capture_as("snap", 4 * kMiB, 49, 2);
  uint32_t bad = 0;
  while (man_.regions[0].chunks[bad].codec != Codec::kZstdPages) ++bad;
  damage_on_disk(bad);
  start_server();
  connect();
  send_get_page("snap", 0, bad, 0, 31);
  auto f = recv();
  ASSERT_TRUE(f.header);
  auto r = f.header->root<proto::wire::Reply>();
  ASSERT_TRUE(r.isError());
  EXPECT_EQ(r.getError().getCode(), proto::wire::ErrorCode::CORRUPT);
  EXPECT_EQ(r.getError().getTag(), 31u);
  std::string msg = r.getError().getMessage().cStr();
  EXPECT_NE(msg.find("corrupt"), std::string::npos) << msg;
  EXPECT_NE(msg.find("'snap'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("0/" + std::to_string(bad)), std::string::npos) << msg;
  EXPECT_EQ(server_->stats().errors_corrupt, 1u);

  // Same connection: another chunk's pages, as before.
  uint32_t good = bad + 1;
  while (man_.regions[0].chunks[good].codec != Codec::kZstdPages) ++good;
  for (uint32_t p = 0; p < 16; ++p) send_get_page("snap", 0, good, p, 40 + p);
  for (uint32_t p = 0; p < 16; ++p) {
    auto g = recv();
    ASSERT_TRUE(g.header);
    check_page_reply(g, good, p, 40 + p);
  }
  net::OwnedFrame holder;
  auto ws = wire_stats(holder);
  EXPECT_EQ(ws.getErrorsCorrupt(), 1u);
  EXPECT_GT(ws.getPages(), 0u);

  // A client from before the code gets ioError, which it passes over to another server, as before.
  connect_as_older_client();
  if (HasFatalFailure()) return;
  send_get_page("snap", 0, bad, 0, 32);
  f = recv();
  ASSERT_TRUE(f.header);
  r = f.header->root<proto::wire::Reply>();
  ASSERT_TRUE(r.isError());
  EXPECT_EQ(r.getError().getCode(), proto::wire::ErrorCode::IO_ERROR);
  EXPECT_EQ(r.getError().getTag(), 32u);
}

// A chunk's stored checksum is checked on its first getPage and not again while its extents
// stay in memory (the disk is what is not trusted); once they were evicted and read again, it
// is checked again: damage done on disk meanwhile is then found.
TEST_F(GetPageTest, StoredChunkIsCheckedAgainWhenReadAgain) {
  capture_as("snap", 32 * kMiB, 50, 2);
  uint32_t x = 0;
  while (man_.regions[0].chunks[x].codec != Codec::kZstdPages) ++x;
  uint64_t stored = 0;
  for (const ChunkInfo& ci : man_.regions[0].chunks) stored += ci.stored_length;
  pageserver::ServerOptions o;
  o.cache_bytes = 4 << 20;  // one arena
  ASSERT_GT(stored, 2 * o.cache_bytes) << "the snapshot must not fit the cache";
  start_server(o);
  connect();
  send_get_page("snap", 0, x, 0, 1);
  auto f = recv();
  ASSERT_TRUE(f.header);
  check_page_reply(f, x, 0, 1);
  damage_on_disk(x);
  // Still in memory, checked already: served from there (page 0's frame is not the damaged one).
  send_get_page("snap", 0, x, 0, 2);
  f = recv();
  ASSERT_TRUE(f.header);
  check_page_reply(f, x, 0, 2);
  EXPECT_EQ(server_->stats().errors_corrupt, 0u);
  // Every other chunk once: the cache turns over, chunk x's extents are evicted.
  uint64_t tag = 100;
  for (uint32_t c = 0; c < man_.regions[0].chunks.size(); ++c) {
    if (c == x || man_.regions[0].chunks[c].codec == Codec::kZero) continue;
    send_get_page("snap", 0, c, 0, ++tag);
    f = recv();
    ASSERT_TRUE(f.header);
  }
  send_get_page("snap", 0, x, 0, 3);
  f = recv();
  ASSERT_TRUE(f.header);
  auto r = f.header->root<proto::wire::Reply>();
  ASSERT_TRUE(r.isError()) << "a chunk read again was not checked again";
  EXPECT_EQ(r.getError().getCode(), proto::wire::ErrorCode::CORRUPT);
  EXPECT_EQ(server_->stats().errors_corrupt, 1u);
}

// getPage by datagram (wire.capnp, DatagramSession). A session comes from openDatagrams on an
// authenticated connection; with it, every page of the snapshot comes back by datagram as its
// frame, or as useStream where it needs its whole chunk; errors come by datagram with the tag.
// Datagrams that are not a getPage of a live session from the session's own host get no answer
// at all (no reflection) and are counted; a session dies with its connection.
TEST_F(GetPageTest, DatagramsAnswerLiveSessionsOnlyAndDropStrangers) {
  capture_as("snap", 4 * kMiB + 3 * 4096, 57, 2);
  start_server();
  connect();
  const std::array<std::byte, 16> session = datagram_session();
  sys::UniqueFd u = udp_socket("127.0.0.1");
  uint64_t frames = 0, use_stream = 0;
  for (uint32_t c = 0; c < man_.regions[0].chunks.size(); ++c) {
    if (man_.regions[0].chunks[c].codec == Codec::kZero) continue;
    warm(c);
    const uint32_t pages = man_.chunk_length(0, c) / man_.regions[0].page_size;
    for (uint32_t p = 0; p < pages; ++p) {
      const uint64_t tag = uint64_t{c} << 16 | p;
      send_datagram(u.get(), page_datagram(c, p, tag, session));
      auto f = datagram_answer(u.get(), std::chrono::seconds(5));
      ASSERT_TRUE(f.header) << "no datagram answer for chunk " << c << " page " << p;
      auto r = f.header->root<proto::wire::Reply>();
      if (r.isError()) {
        EXPECT_EQ(r.getError().getCode(), proto::wire::ErrorCode::USE_STREAM) << r.getError().getMessage().cStr();
        EXPECT_EQ(r.getError().getTag(), tag);
        ++use_stream;
        continue;
      }
      EXPECT_FALSE(check_page_reply(f, c, p, tag)) << "a datagram carries a page frame, never a whole chunk";
      ++frames;
    }
  }
  EXPECT_GT(frames, 0u);
  EXPECT_GT(use_stream, 0u) << "the data has zero and raw page frames (chunk 1, pages 1 and 2)";
  // An error comes by datagram, with its tag.
  send_datagram(u.get(), page_datagram(0, 16, 4242, session));
  {
    auto f = datagram_answer(u.get(), std::chrono::seconds(5));
    ASSERT_TRUE(f.header);
    auto r = f.header->root<proto::wire::Reply>();
    ASSERT_TRUE(r.isError());
    EXPECT_EQ(r.getError().getCode(), proto::wire::ErrorCode::OUT_OF_RANGE);
    EXPECT_EQ(r.getError().getTag(), 4242u);
  }
  const uint32_t text = first_page_frame_chunk();

  // Strangers: each gets no answer, and is counted.
  std::vector<std::vector<std::byte>> hostile;
  hostile.push_back(std::vector<std::byte>(64, std::byte{0x5a}));  // not a frame
  hostile.push_back(std::vector<std::byte>(5));                    // shorter than a prefix
  {
    auto d = page_datagram(text, 0, 1, session);
    d[4] = std::byte{1};  // claims a payload the datagram does not hold
    hostile.push_back(d);
    d = page_datagram(text, 0, 1, session);
    d.resize(d.size() + 8);  // more than its frame
    hostile.push_back(d);
    d.assign(8 + 13, std::byte{0});  // lengths that agree, but a header not made of 8-byte words
    d[0] = std::byte{13};
    hostile.push_back(d);
    d.assign(8, std::byte{0});  // an empty header
    hostile.push_back(d);
  }
  hostile.push_back(page_datagram(text, 0, 1, {}));  // no session
  std::array<std::byte, 16> forged = session;
  forged[0] ^= std::byte{1};
  hostile.push_back(page_datagram(text, 0, 1, forged));  // not a live session
  {
    capnp::MallocMessageBuilder m;  // a live session, but not a getPage
    m.initRoot<proto::wire::Request>().setStats();
    hostile.push_back(net::encode_frame(m, 0));
  }
  hostile.push_back(std::vector<std::byte>(9000, std::byte{0}));  // larger than any request
  for (const auto& d : hostile) send_datagram(u.get(), d);
  EXPECT_FALSE(datagram_answer(u.get(), std::chrono::milliseconds(200)).header) << "a stranger got an answer";
  uint64_t dropped = hostile.size();
  EXPECT_EQ(server_->stats().datagrams_dropped, dropped);
  // A live session's datagram from another host (here 127.0.0.2) is a stranger too: the server
  // would otherwise send pages wherever a forged source address points.
  {
    sys::UniqueFd other = udp_socket("127.0.0.2");
    send_datagram(other.get(), page_datagram(text, 0, 1, session));
    EXPECT_FALSE(datagram_answer(other.get(), std::chrono::milliseconds(200)).header);
    EXPECT_EQ(server_->stats().datagrams_dropped, ++dropped);
  }
  // Still served.
  send_datagram(u.get(), page_datagram(text, 0, 7, session));
  {
    auto f = datagram_answer(u.get(), std::chrono::seconds(5));
    ASSERT_TRUE(f.header);
    EXPECT_FALSE(check_page_reply(f, text, 0, 7));
  }
  const uint64_t answered = server_->stats().datagram_requests;
  EXPECT_EQ(answered, frames + use_stream + 2);
  // The session dies with its connection: once the server has closed its side (end-of-file
  // here), the session is gone.
  ASSERT_EQ(::shutdown(fd_.get(), SHUT_WR), 0);
  {
    pollfd p{fd_.get(), POLLIN, 0};
    ASSERT_EQ(::poll(&p, 1, 5000), 1) << "the server did not close the connection";
    char b;
    ASSERT_EQ(::recv(fd_.get(), &b, 1, 0), 0);
  }
  fd_.reset();
  send_datagram(u.get(), page_datagram(text, 0, 8, session));
  EXPECT_FALSE(datagram_answer(u.get(), std::chrono::milliseconds(200)).header) << "a dead session was answered";
  EXPECT_EQ(server_->stats().datagrams_dropped, dropped + 1);
  EXPECT_EQ(server_->stats().datagram_requests, answered);
}

// A server listening on every address answers a datagram from the address it was sent to:
// asked at 127.0.0.2, its reply must come from 127.0.0.2 (the kernel would pick 127.0.0.1 for
// a reply to 127.0.0.1), or the client's connected UDP socket drops it (multi-homed hosts).
TEST_F(GetPageTest, DatagramRepliesLeaveFromTheAddressAsked) {
  capture_as("snap", 1 * kMiB, 59, 2);
  pageserver::ServerOptions o;
  o.host = "0.0.0.0";
  start_server(o);
  auto loc = SnapshotLocation::parse("lazymem://127.0.0.2:" + std::to_string(server_->port()) + "/snap");
  ASSERT_TRUE(loc.ok());
  auto fd = net::open_connection(*loc, "", deadline());
  ASSERT_TRUE(fd.ok()) << fd.error().message();
  fd_ = std::move(*fd);
  const std::array<std::byte, 16> session = datagram_session();
  sys::UniqueFd u = udp_socket("127.0.0.1", "127.0.0.2");
  const uint32_t text = first_page_frame_chunk();
  warm(text);
  send_datagram(u.get(), page_datagram(text, 0, 9, session));
  auto f = datagram_answer(u.get(), std::chrono::seconds(5));
  ASSERT_TRUE(f.header) << "no answer from 127.0.0.2";
  EXPECT_FALSE(check_page_reply(f, text, 0, 9));
}

// A dual-stack server (listening on "::") answers datagrams from IPv6 and IPv4 clients alike,
// from the address each asked (v4 peers come as v4-mapped addresses on both sockets).
TEST_F(GetPageTest, DatagramsOverIpv6AndDualStack) {
  capture_as("snap", 1 * kMiB, 61, 2);
  {
    sys::UniqueFd probe(::socket(AF_INET6, SOCK_DGRAM, 0));
    sockaddr_in6 a{};
    a.sin6_family = AF_INET6;
    a.sin6_addr = in6addr_loopback;
    if (!probe.valid() || ::bind(probe.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
      GTEST_SKIP() << "no IPv6 loopback here";
    }
  }
  pageserver::ServerOptions o;
  o.host = "::";
  start_server(o);
  const uint32_t text = first_page_frame_chunk();
  for (const char* host : {"::1", "127.0.0.1"}) {
    SCOPED_TRACE(host);
    const bool v6 = std::strchr(host, ':') != nullptr;
    auto loc = SnapshotLocation::parse(std::string("lazymem://") + (v6 ? "[::1]" : host) + ":" +
                                       std::to_string(server_->port()) + "/snap");
    ASSERT_TRUE(loc.ok());
    auto fd = net::open_connection(*loc, "", deadline());
    ASSERT_TRUE(fd.ok()) << fd.error().message();
    fd_ = std::move(*fd);
    const std::array<std::byte, 16> session = datagram_session();
    sys::UniqueFd u(::socket(v6 ? AF_INET6 : AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    sockaddr_storage to{};
    socklen_t len = 0;
    if (v6) {
      auto& a = reinterpret_cast<sockaddr_in6&>(to);
      a.sin6_family = AF_INET6;
      a.sin6_addr = in6addr_loopback;
      a.sin6_port = htons(server_->port());
      len = sizeof a;
    } else {
      auto& a = reinterpret_cast<sockaddr_in&>(to);
      a.sin_family = AF_INET;
      a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      a.sin_port = htons(server_->port());
      len = sizeof a;
    }
    ASSERT_EQ(::connect(u.get(), reinterpret_cast<sockaddr*>(&to), len), 0) << std::strerror(errno);
    warm(text);
    send_datagram(u.get(), page_datagram(text, 0, 11, session));
    auto f = datagram_answer(u.get(), std::chrono::seconds(5));
    ASSERT_TRUE(f.header) << "no datagram answer";
    EXPECT_FALSE(check_page_reply(f, text, 0, 11));
  }
  EXPECT_EQ(server_->stats().datagrams_dropped, 0u);
}

// On a path whose MTU a page frame does not fit (a 1280-byte veth to a second host), the reply
// is not sent in fragments (which firewalls drop, and which are lost whole when one is: the
// client would wait milliseconds for nothing) but as useStream, at once, or, where the request
// says replyOnStream, on the session's connection, announced; frames that fit still come by
// datagram.
class NeverFragmentTest : public GetPageTest, public ::testing::WithParamInterface<bool> {};

TEST_P(NeverFragmentTest, AcrossA1280ByteLink) {
  const bool v6 = GetParam();
  VethHost host;
  if (std::string why = host.create(1280); !why.empty()) GTEST_SKIP() << why;
  if (HasFailure()) return;
  const std::string near = v6 ? host.near6() : host.near(), far = v6 ? host.far6() : host.far();
  capture_as("snap", 1 * kMiB, 63, 2);
  // A page whose frame cannot fit a 1280-byte datagram, and one whose frame can.
  const auto big = page_with_frame(1300, 4096), small = page_with_frame(1, 600);
  ASSERT_TRUE(big && small) << "the snapshot has no page frame of each size";
  pageserver::ServerOptions o;
  o.host = near;
  start_server(o);
  sys::UniqueFd u[2];
  {
    InNamespace other(host.ns);  // the client's sockets are on the far side of the veth
    ASSERT_TRUE(other.entered) << std::strerror(errno);
    const std::string at = v6 ? "[" + near + "]" : near;
    auto loc = SnapshotLocation::parse("lazymem://" + at + ":" + std::to_string(server_->port()) + "/snap");
    ASSERT_TRUE(loc.ok());
    auto fd = net::open_connection(*loc, "", deadline());
    ASSERT_TRUE(fd.ok()) << fd.error().message();
    fd_ = std::move(*fd);
    for (auto& s : u) s = udp_socket(far.c_str(), near.c_str());
  }
  const std::array<std::byte, 16> session = datagram_session();
  warm(big->first);  // in memory: useStream below is for the MTU, not for a read
  warm(small->first);
  // The first port gets the session's own socket as its replies' source; a second port of the
  // same host is answered from the shared one.
  for (int round = 0; round < 2; ++round) {
    SCOPED_TRACE(round);
    const int s = u[round].get();
    send_datagram(s, page_datagram(big->first, big->second, 70 + round, session));
    auto f = datagram_answer(s, std::chrono::seconds(5));
    ASSERT_TRUE(f.header) << "no answer: the reply was sent in fragments or not at all";
    auto r = f.header->root<proto::wire::Reply>();
    ASSERT_TRUE(r.isError()) << "a " << frame_size(big->first, big->second) << "-byte frame came over a 1280-byte MTU";
    EXPECT_EQ(r.getError().getCode(), proto::wire::ErrorCode::USE_STREAM);
    EXPECT_EQ(r.getError().getTag(), 70u + round);
    send_datagram(s, page_datagram(small->first, small->second, 80 + round, session));
    f = datagram_answer(s, std::chrono::seconds(5));
    ASSERT_TRUE(f.header) << "a frame that fits did not come";
    EXPECT_FALSE(check_page_reply(f, small->first, small->second, 80 + round));
    // replyOnStream: the frame comes on the connection, as the datagram request's answer.
    send_datagram(s, page_datagram(big->first, big->second, 90 + round, session, true));
    expect_on_stream_notice(s, 90 + round);
    auto c = recv();
    ASSERT_TRUE(c.header);
    EXPECT_FALSE(check_page_reply(c, big->first, big->second, 90 + round)) << "the frame alone, on the connection";
  }
  EXPECT_EQ(server_->stats().datagrams_over_mtu, 4u);
  EXPECT_EQ(server_->stats().datagrams_on_stream, 2u);
  EXPECT_EQ(server_->stats().datagrams_unsent, 0u);
}
INSTANTIATE_TEST_SUITE_P(GetPageTest, NeverFragmentTest, ::testing::Values(false, true),
                         [](const auto& i) { return std::string(i.param ? "IPv6" : "IPv4"); });

// The page fetcher (a faulting thread's) across a 1280-byte link: a page whose frame no datagram
// carries comes on its connection after the one datagram request, not a second request there.
// Then, with every datagram to the client dropped (on the far side), the onStream notice is
// lost: the fetcher gives up waiting, asks on the connection and takes the first of the two
// answers there; the next fetch skips the second, an answer to a request it already has.
TEST_F(GetPageTest, FetcherTakesWhatNoDatagramCarriesFromItsConnection) {
  VethHost host;
  if (std::string why = host.create(1280); !why.empty()) GTEST_SKIP() << why;
  if (HasFailure()) return;
  capture_as("snap", 1 * kMiB, 63, 2);
  const auto big = page_with_frame(1300, 4096), small = page_with_frame(1, 600);
  ASSERT_TRUE(big && small) << "the snapshot has no page frame of each size";
  pageserver::ServerOptions o;
  o.host = host.near();
  start_server(o);
  {  // In the server's memory (as after a restore's first faults): the wait below is the network's.
    auto loc = SnapshotLocation::parse("lazymem://" + host.near() + ":" + std::to_string(server_->port()) + "/snap");
    ASSERT_TRUE(loc.ok());
    auto fd = net::open_connection(*loc, "", deadline());
    ASSERT_TRUE(fd.ok()) << fd.error().message();
    fd_ = std::move(*fd);
    warm(big->first);
    warm(small->first);
  }
  std::unique_ptr<net::RemotePageFetcher> fetcher;
  {
    InNamespace other(host.ns);
    ASSERT_TRUE(other.entered) << std::strerror(errno);
    auto loc = SnapshotLocation::parse("lazymem://" + host.near() + ":" + std::to_string(server_->port()) + "/snap");
    ASSERT_TRUE(loc.ok());
    auto f = net::RemotePageFetcher::open(*loc, "", man_, dict_, std::chrono::seconds(5));
    ASSERT_TRUE(f.ok()) << f.error().message();
    fetcher = std::move(*f);
  }
  std::vector<std::byte> out(4096);
  auto fetch = [&](std::pair<uint32_t, uint32_t> at) {
    std::fill(out.begin(), out.end(), std::byte{0x5a});
    auto r = fetcher->fetch({0, at.first}, at.second, out, sys::monotonic_ns() + 5'000'000'000);
    EXPECT_EQ(r, snapshot::PageFetcher::Outcome::kOk) << fetcher->failure();
    const size_t off = size_t{at.first} * man_.chunk_size + size_t{at.second} * 4096;
    EXPECT_EQ(std::memcmp(out.data(), expected_.data() + off, 4096), 0) << "chunk " << at.first << " page " << at.second;
  };
  auto before = server_->stats();
  fetch(*big);
  auto after = server_->stats();
  EXPECT_EQ(after.requests - before.requests, 1u) << "asked again on the connection";
  EXPECT_EQ(after.datagrams_on_stream - before.datagrams_on_stream, 1u);
  EXPECT_FALSE(fetcher->datagrams().lost);
  EXPECT_TRUE(fetcher->datagrams().on_connection) << "counted as announced";
  EXPECT_FALSE(fetcher->datagrams().answered);

  ASSERT_TRUE(host.drop_from_near("udp")) << "could not drop datagrams to the client";
  before = after;
  fetch(*big);
  EXPECT_TRUE(fetcher->datagrams().lost) << "the notice came through";
  fetch(*small);  // its datagram reply dropped too: on the connection, behind the stale answer
  EXPECT_TRUE(fetcher->datagrams().lost) << "the page came through";
  EXPECT_STREQ(fetcher->failure(), "");
  // Counted once the last answer came: the server takes a connection's requests in order.
  after = server_->stats();
  EXPECT_EQ(after.datagrams_on_stream - before.datagrams_on_stream, 1u);
  EXPECT_EQ(after.requests - before.requests, 4u) << "each: the datagram, then the connection";
}

// The version a fetcher reads is the one it names when it connects (its manifest's checksum):
// after the name is replaced, its pages still come from that version. A fetcher that names none
// (as against a server from before versions were named) is served whatever holds the name now,
// and refuses a page of another version by the chunk's stored checksum, though the frame
// decodes and passes its own checksum (too few pages for a dictionary: nothing else differs).
TEST_F(GetPageTest, FetcherGetsTheVersionItNamesAndRefusesAnyOther) {
  constexpr size_t kLen = 12 * 4096;  // under kMinSamplePages: no dictionary
  auto text_pages = [](char version) {
    const char* line = "snapshot ?, page ??; ";
    std::vector<std::byte> v(kLen);
    for (size_t i = 0; i < kLen; ++i) v[i] = std::byte(line[i % 21] == '?' ? version : line[i % 21]);
    for (size_t pg = 0; pg < kLen / 4096; ++pg) v[pg * 4096] = std::byte(pg);
    return v;
  };
  auto capture_text = [&](const std::string& where, char version) {
    void* p = testing::map_for_capture(kLen, 7);
    ASSERT_NE(p, nullptr);
    auto bytes = text_pages(version);
    std::memcpy(p, bytes.data(), kLen);
    CaptureRegion r{"heap", p, kLen, PROT_READ | PROT_WRITE};
    CaptureOptions co;
    co.replace = true;
    auto rep = capture_regions(where, std::span(&r, 1), co);
    ASSERT_TRUE(rep.ok()) << rep.error().message();
    ::munmap(p, kLen);
  };
  capture_text(dir_.path() + "/snap", 'A');
  auto m = read_manifest(dir_.path() + "/snap");
  ASSERT_TRUE(m.ok()) << m.error().message();
  ASSERT_TRUE(m->dictionary.empty());
  Manifest named = *m, unnamed = *m;
  unnamed.checksum = 0;
  auto dict = snapshot::DecodeDictionary::load({});
  ASSERT_TRUE(dict.ok()) << dict.error().message();
  start_server();
  auto loc = SnapshotLocation::parse(uri());
  ASSERT_TRUE(loc.ok());
  auto a = net::RemotePageFetcher::open(*loc, "", named, *dict, std::chrono::seconds(5));
  auto b = net::RemotePageFetcher::open(*loc, "", unnamed, *dict, std::chrono::seconds(5));
  ASSERT_TRUE(a.ok() && b.ok());
  const std::vector<std::byte> want = text_pages('A');
  std::vector<std::byte> out(4096);
  auto fetch = [&](net::RemotePageFetcher& f, uint32_t page) {
    std::fill(out.begin(), out.end(), std::byte{0x5a});
    auto r = f.fetch({0, 0}, page, out, sys::monotonic_ns() + 5'000'000'000);
    if (r == snapshot::PageFetcher::Outcome::kOk) {
      EXPECT_EQ(std::memcmp(out.data(), want.data() + page * 4096, 4096), 0);
    }
    return r;
  };
  ASSERT_EQ(fetch(**a, 1), snapshot::PageFetcher::Outcome::kOk) << (*a)->failure();
  ASSERT_EQ(fetch(**b, 1), snapshot::PageFetcher::Outcome::kOk) << (*b)->failure();
  capture_text(uri(), 'B');  // uploaded: the store holds the new one from now on
  EXPECT_EQ(fetch(**a, 5), snapshot::PageFetcher::Outcome::kOk) << (*a)->failure();
  EXPECT_NE(fetch(**b, 5), snapshot::PageFetcher::Outcome::kOk) << "installed a page of the replacement";
  EXPECT_NE(std::string((*b)->failure()).find("another version"), std::string::npos) << (*b)->failure();
  EXPECT_EQ(server_->stats().snapshots_retired, 1u);
}

// An onStream notice whose reply does not start on the connection (here: the far side drops
// the server's TCP segments until the fetcher has asked again; a forged notice, or a server
// that dropped the job, look the same) is not waited for until the fault's deadline: after a
// few datagram waits the fetcher asks on the connection, and takes the first answer that comes.
TEST_F(GetPageTest, FetcherAsksWhenAnAnnouncedReplyDoesNotCome) {
  VethHost host;
  if (std::string why = host.create(); !why.empty()) GTEST_SKIP() << why;
  if (HasFailure()) return;
  capture_as("snap", 1 * kMiB, 65, 2);
  ASSERT_EQ(man_.regions[0].chunks[1].codec, Codec::kZstdPages);
  pageserver::ServerOptions o;
  o.host = host.near();
  start_server(o);
  auto loc = SnapshotLocation::parse("lazymem://" + host.near() + ":" + std::to_string(server_->port()) + "/snap");
  ASSERT_TRUE(loc.ok());
  auto fd = net::open_connection(*loc, "", deadline());
  ASSERT_TRUE(fd.ok()) << fd.error().message();
  fd_ = std::move(*fd);
  warm(1);  // in memory: the announced reply would leave at once
  std::unique_ptr<net::RemotePageFetcher> fetcher;
  {
    InNamespace other(host.ns);
    ASSERT_TRUE(other.entered) << std::strerror(errno);
    auto f = net::RemotePageFetcher::open(*loc, "", man_, dict_, std::chrono::seconds(5));
    ASSERT_TRUE(f.ok()) << f.error().message();
    fetcher = std::move(*f);
  }
  ASSERT_TRUE(host.drop_from_near("tcp")) << "could not drop the server's TCP segments";
  const auto before = server_->stats();
  std::vector<std::byte> out(4096, std::byte{0x5a});
  snapshot::PageFetcher::Outcome outcome = snapshot::PageFetcher::Outcome::kBroken;
  std::thread faulting([&] {
    outcome = fetcher->fetch({0, 1}, 1, out, sys::monotonic_ns() + 5'000'000'000);  // the zero page: its whole chunk
  });
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(3);
  while (server_->stats().requests - before.requests < 2 && std::chrono::steady_clock::now() < until) {
    std::this_thread::yield();
  }
  const uint64_t asked = server_->stats().requests - before.requests;
  EXPECT_TRUE(host.stop_dropping());
  faulting.join();
  EXPECT_EQ(asked, 2u) << "the fetcher waited for the announced reply instead of asking";
  EXPECT_EQ(server_->stats().datagrams_on_stream - before.datagrams_on_stream, 1u);
  ASSERT_EQ(outcome, snapshot::PageFetcher::Outcome::kOk) << fetcher->failure();
  EXPECT_EQ(std::memcmp(out.data(), expected_.data() + man_.chunk_size + 4096, 4096), 0);
}

// A page asked by datagram whose chunk is still on disk: useStream at once (the client asks on
// its connection, which waits for the read however long it takes, instead of taking a late
// reply for a lost datagram), and the read is under way for it: once in, pages come by datagram.
TEST_F(GetPageTest, DatagramForAChunkOnDiskIsToldToUseTheConnection) {
  if (!probe_kernel().io_uring_usable) GTEST_SKIP() << "no io_uring: the server reads synchronously";
  capture_as("snap", 1 * kMiB, 65, 2);
  start_server();
  connect();
  const std::array<std::byte, 16> session = datagram_session();
  sys::UniqueFd u = udp_socket("127.0.0.1");
  const uint32_t text = first_page_frame_chunk();
  const uint64_t read_before = server_->stats().disk_read_bytes;
  send_datagram(u.get(), page_datagram(text, 0, 21, session));
  auto f = datagram_answer(u.get(), std::chrono::seconds(5));
  ASSERT_TRUE(f.header) << "no answer";
  auto r = f.header->root<proto::wire::Reply>();
  ASSERT_TRUE(r.isError()) << "a page came before its chunk was read";
  EXPECT_EQ(r.getError().getCode(), proto::wire::ErrorCode::USE_STREAM);
  EXPECT_EQ(r.getError().getTag(), 21u);
  // As the client then does: on the connection, answered once the read is in.
  send_get_page("snap", 0, text, 0, 22);
  auto c = recv();
  ASSERT_TRUE(c.header);
  EXPECT_FALSE(check_page_reply(c, text, 0, 22));
  EXPECT_GT(server_->stats().disk_read_bytes, read_before);
  send_datagram(u.get(), page_datagram(text, 1, 23, session));
  f = datagram_answer(u.get(), std::chrono::seconds(5));
  ASSERT_TRUE(f.header);
  EXPECT_FALSE(check_page_reply(f, text, 1, 23));
}

// With replyOnStream, what no datagram carries comes on the session's connection without being
// asked there, announced by onStream, under the datagram's id and tag: a page whose chunk is
// still being read (once it is in), zero and raw pages of a page-frame chunk in memory (their
// whole chunk), a page of a raw chunk, and the error for a chunk found corrupt once read. The
// datagram is the only request the server sees for each, and each is answered once.
TEST_F(GetPageTest, WhatNoDatagramCarriesComesOnTheConnectionWhenAsked) {
  if (!probe_kernel().io_uring_usable) GTEST_SKIP() << "no io_uring: the server reads synchronously";
  capture_as("snap", 8 * kMiB, 65, 2);  // the last chunk far from the first ones on disk
  std::optional<uint32_t> raw;
  for (uint32_t c = 0; c < man_.regions[0].chunks.size() && !raw; ++c) {
    if (man_.regions[0].chunks[c].codec == Codec::kRaw) raw = c;
  }
  ASSERT_TRUE(raw) << "the snapshot has no raw chunk";
  uint32_t last = static_cast<uint32_t>(man_.regions[0].chunks.size()) - 1;
  while (man_.regions[0].chunks[last].codec != Codec::kZstdPages) --last;
  damage_on_disk(last);
  start_server();
  connect();
  const std::array<std::byte, 16> session = datagram_session();
  sys::UniqueFd u = udp_socket("127.0.0.1");
  const uint32_t text = first_page_frame_chunk();
  ASSERT_EQ(man_.regions[0].chunks[1].codec, Codec::kZstdPages);
  const auto before = server_->stats();
  // On disk still: announced at once, answered once read.
  send_datagram(u.get(), page_datagram(text, 0, 21, session, true));
  expect_on_stream_notice(u.get(), 21);
  auto c = recv();
  ASSERT_TRUE(c.header);
  EXPECT_FALSE(check_page_reply(c, text, 0, 21));
  EXPECT_GT(server_->stats().disk_read_bytes, before.disk_read_bytes);
  // The zero page (1) and the raw page (2) of chunk 1, in memory: its whole chunk.
  warm(1);
  const uint64_t read = server_->stats().disk_read_bytes;
  for (uint32_t page : {1u, 2u}) {
    send_datagram(u.get(), page_datagram(1, page, 30 + page, session, true));
    expect_on_stream_notice(u.get(), 30 + page);
    c = recv();
    ASSERT_TRUE(c.header);
    EXPECT_TRUE(check_page_reply(c, 1, page, 30 + page)) << "page " << page << " comes as its whole chunk";
  }
  EXPECT_EQ(server_->stats().disk_read_bytes, read) << "chunk 1 was not in memory";
  // A raw chunk: said before anything is read.
  send_datagram(u.get(), page_datagram(*raw, 0, 40, session, true));
  expect_on_stream_notice(u.get(), 40);
  c = recv();
  ASSERT_TRUE(c.header);
  EXPECT_TRUE(check_page_reply(c, *raw, 0, 40));
  // A chunk found corrupt once read: the error, on the connection.
  const uint64_t unread = server_->stats().disk_read_bytes;
  send_datagram(u.get(), page_datagram(last, 0, 50, session, true));
  expect_on_stream_notice(u.get(), 50);
  c = recv();
  ASSERT_TRUE(c.header);
  auto r = c.header->root<proto::wire::Reply>();
  ASSERT_TRUE(r.isError());
  EXPECT_EQ(r.getId(), 1050u);
  EXPECT_EQ(r.getError().getTag(), 50u);
  EXPECT_EQ(r.getError().getCode(), proto::wire::ErrorCode::CORRUPT);
  EXPECT_GT(server_->stats().disk_read_bytes, unread) << "the damaged chunk was in memory already";
  // Nothing else queued on the connection: the next frame answers the next request.
  net::OwnedFrame holder;
  wire_stats(holder);
  const auto after = server_->stats();
  EXPECT_EQ(after.requests - before.requests, 7u) << "asked on the connection: only warm(1) and stats";
  EXPECT_EQ(after.datagram_requests - before.datagram_requests, 5u);
  EXPECT_EQ(after.datagrams_on_stream - before.datagrams_on_stream, 5u);
}

// A server started without datagrams says so to openDatagrams, and serves getPage on the
// connection as before.
TEST_F(GetPageTest, ServerWithoutDatagramsRefusesASession) {
  capture_as("snap", 1 * kMiB, 58, 2);
  pageserver::ServerOptions o;
  o.datagrams = false;
  start_server(o);
  connect();
  auto f = open_datagrams();
  ASSERT_TRUE(f.header);
  auto r = f.header->root<proto::wire::Reply>();
  ASSERT_TRUE(r.isError());
  EXPECT_EQ(r.getError().getCode(), proto::wire::ErrorCode::BAD_REQUEST);
  const uint32_t text = first_page_frame_chunk();
  send_get_page("snap", 0, text, 0, 5);
  auto g = recv();
  ASSERT_TRUE(g.header);
  check_page_reply(g, text, 0, 5);
}

// A demand getPage and a demand getChunks sent after a large prefetch getChunks on the same
// connection are answered before all but the prefetch the connection already held (one
// backpressure window), not after the whole prefetch.
TEST_F(GetPageTest, DemandOvertakesQueuedPrefetch) {
  capture_as("snap", 32 * kMiB, 53, 2);
  pageserver::ServerOptions o;
  start_server(o);
  connect();
  const auto& chunks = man_.regions[0].chunks;
  uint32_t text = 0;
  while (chunks[text].codec != Codec::kZstdPages) ++text;
  std::vector<uint32_t> stored;
  uint64_t prefetch_bytes = 0;
  for (uint32_t c = 0; c < chunks.size(); ++c) {
    if (chunks[c].codec == Codec::kZero) continue;
    stored.push_back(c);
    prefetch_bytes += chunks[c].stored_length;
  }
  ASSERT_GT(prefetch_bytes, 8 * o.max_queued_bytes);
  // All three requests in one write, so the server reads them together: prefetch first.
  std::vector<std::byte> wire;
  auto append = [&](capnp::MessageBuilder& m) {
    auto f = net::encode_frame(m, 0);
    wire.insert(wire.end(), f.begin(), f.end());
  };
  {
    capnp::MallocMessageBuilder m;
    auto rq = m.initRoot<proto::wire::Request>();
    rq.setId(1);
    auto gc = rq.initGetChunks();
    gc.setSnapshot("snap");
    gc.setDemand(false);
    auto l = gc.initChunks(static_cast<unsigned>(stored.size()));
    for (unsigned i = 0; i < stored.size(); ++i) {
      l[i].setChunk(stored[i]);
      l[i].setTag(stored[i]);
    }
    append(m);
  }
  const uint32_t demand_chunk = stored.back();
  {
    capnp::MallocMessageBuilder m;
    get_page(m, "snap", 0, text, 3, 1u << 30);
    append(m);
  }
  {
    capnp::MallocMessageBuilder m;
    auto rq = m.initRoot<proto::wire::Request>();
    rq.setId(2);
    auto gc = rq.initGetChunks();
    gc.setSnapshot("snap");
    gc.setDemand(true);
    auto l = gc.initChunks(1);
    l[0].setChunk(demand_chunk);
    l[0].setTag(1u << 31);
    append(m);
  }
  ASSERT_EQ(::send(fd_.get(), wire.data(), wire.size(), MSG_NOSIGNAL), static_cast<ssize_t>(wire.size()));

  uint64_t before = 0, got_prefetch = 0;
  std::optional<uint64_t> page_after, chunk_after;
  for (size_t n = 0; n < stored.size() + 2; ++n) {
    auto f = recv();
    ASSERT_TRUE(f.header) << "reply " << n;
    auto r = f.header->root<proto::wire::Reply>();
    if (r.isPage()) {
      page_after = before;
      EXPECT_FALSE(check_page_reply(f, text, 3, 1u << 30)) << "a text page goes as its frame alone";
    } else if (r.isChunk() && r.getChunk().getTag() == 1u << 31) {
      chunk_after = before;
      EXPECT_EQ(r.getId(), 2u);
      EXPECT_EQ(f.payload.size(), chunks[demand_chunk].stored_length);
    } else {
      ASSERT_TRUE(r.isChunk()) << (r.isError() ? r.getError().getMessage().cStr() : "");
      before += f.payload.size();
      ++got_prefetch;
    }
  }
  EXPECT_EQ(got_prefetch, stored.size());
  ASSERT_TRUE(page_after && chunk_after);
  // At most what the connection held when the demand came (its limit, plus the chunk that
  // crossed it) went first.
  EXPECT_LE(*page_after, o.max_queued_bytes + kDefaultChunkSize) << "of " << prefetch_bytes;
  EXPECT_LE(*chunk_after, o.max_queued_bytes + kDefaultChunkSize) << "of " << prefetch_bytes;
}

}  // namespace
}  // namespace lazymem
