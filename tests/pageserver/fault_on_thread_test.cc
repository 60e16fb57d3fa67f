// Faults resolved on the faulting thread (RestoreOptions::fault_on_thread) through a real page
// server: every byte compared; threads that allocate while they fault; the process's own map
// changes (madvise, mremap) mid-restore; fork; a server that restarts or dies.
#include <gtest/gtest.h>
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <fstream>
#include <sstream>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "../common/test_data.h"
#include "served_snapshot.h"
#include "lazymem/kernel_features.h"
#include "lazymem/restore.h"
#include "lazymem/snapshot.h"
#include "page_server.h"
#include "sys/uapi_compat.h"
#include "net/client.h"
#include <nlohmann/json.hpp>

namespace lazymem {
namespace {

using testing::ScratchDir;
constexpr size_t kMiB = 1 << 20;
constexpr size_t kPage = 4096;

class FaultOnThreadTest : public testing::ServedSnapshotTest {
 protected:
  void SetUp() override {
    ServedSnapshotTest::SetUp();
    if (IsSkipped()) return;
    if (!kf_.has_uffd_feature(UFFD_FEATURE_SIGBUS)) GTEST_SKIP() << "userfaultfd lacks UFFD_FEATURE_SIGBUS";
  }
  void capture(size_t len, uint64_t seed, uint32_t format = 2) { ServedSnapshotTest::capture(len, seed, format); }
  static RestoreOptions on_thread(bool prefetch) {
    RestoreOptions o;
    o.fault_on_thread = true;
    o.prefetch = prefetch;
    return o;
  }
  void expect_page(const std::byte* got, size_t off) {
    ASSERT_EQ(std::memcmp(got + off, expected_.data() + off, kPage), 0) << "page at " << off;
  }
};

// Random touches then every page, prefetch off: each fault is one getPage served on the
// faulting thread; the statistics say so and every byte is right.
TEST_F(FaultOnThreadTest, RestoresEveryByteFromFaultingThreads) {
  for (uint32_t format : {2u, 1u}) {
    SCOPED_TRACE(format);
    capture(64 * kMiB, 40 + format, format);
    start_server();
    auto r = LazyRestore::start(uri(), kf_, on_thread(false));
    ASSERT_TRUE(r.ok()) << r.error().message();
    const auto* got = static_cast<const std::byte*>((*r)->regions()[0].address);
    std::mt19937_64 rng(format);
    for (int i = 0; i < 500; ++i) expect_page(got, rng() % (len_ / kPage) * kPage);
    RegionStats mid = (*r)->stats().total();
    EXPECT_GE(mid.faults, 400u);  // some touches hit the same page or a zero chunk
    EXPECT_GE(mid.pages_fault + mid.pages_zero, mid.faults);
    EXPECT_EQ(mid.pages_prefetch, 0u);
    EXPECT_EQ(mid.errors, 0u);
    EXPECT_GT(mid.latency.count, 0u);
    for (size_t off = 0; off < len_; off += kPage) expect_page(got, off);
    RegionStats end = (*r)->stats().total();
    ASSERT_TRUE((*r)->finish().ok());
    ::munmap(const_cast<std::byte*>(got), len_);
    if (format == 2) {
      EXPECT_GT(server_->stats().pages, 0u);  // frames sent alone
      EXPECT_GT(server_->stats().datagram_requests, 0u);  // asked for by datagram
      // The restore's own count: its pages came by datagram (those of zero and raw frames and
      // of chunks prefetched or touched at the end may not).
      EXPECT_GE(end.pages_by_datagram, mid.pages_fault / 2);
      EXPECT_LE(end.pages_by_datagram, end.pages_fault);
      // Losses on loopback are replies later than the wait (a server thread descheduled for a
      // time slice on this two-CPU machine): a few at most.
      EXPECT_LE(end.datagrams_lost * 100, end.pages_by_datagram) << end.datagrams_lost << " lost";
      // Zero and raw page frames: asked by datagram, announced and sent on the connection.
      EXPECT_LE(end.datagram_pages_on_connection, server_->stats().datagrams_on_stream);
    } else {
      EXPECT_EQ(end.pages_by_datagram, 0u);  // format 1: whole chunks, on the connection
      EXPECT_EQ(end.datagram_pages_on_connection, 0u);
    }
    stop_server();
    server_.reset();
  }
}

// Four threads fault while they allocate and free (the handler must not need the allocator
// the interrupted code may be inside), with prefetch racing them for the same chunks.
TEST_F(FaultOnThreadTest, ThreadsAllocatingWhileFaultingWithPrefetch) {
  capture(64 * kMiB, 44);
  start_server();
  auto r = LazyRestore::start(uri(), kf_, on_thread(true));
  ASSERT_TRUE(r.ok()) << r.error().message();
  const auto* got = static_cast<const std::byte*>((*r)->regions()[0].address);
  std::atomic<size_t> wrong{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(t);
      std::vector<std::unique_ptr<std::vector<char>>> junk(64);
      for (int i = 0; i < 2000; ++i) {
        junk[rng() % junk.size()] = std::make_unique<std::vector<char>>(rng() % 5000 + 1);
        size_t off = rng() % (len_ / kPage) * kPage;
        if (std::memcmp(got + off, expected_.data() + off, kPage) != 0) ++wrong;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(wrong.load(), 0u);
  ASSERT_TRUE((*r)->finish().ok());
  for (size_t off = 0; off < len_; off += kPage) expect_page(got, off);
  ::munmap(const_cast<std::byte*>(got), len_);
}

// The process drops part of the region (zeros from then on) and moves another part mid-restore:
// faults follow the engine's map, never installing snapshot bytes where the process dropped them.
TEST_F(FaultOnThreadTest, FollowsMadviseAndMremap) {
  capture(32 * kMiB, 45);
  start_server();
  auto r = LazyRestore::start(uri(), kf_, on_thread(false));
  ASSERT_TRUE(r.ok()) << r.error().message();
  auto* base = static_cast<std::byte*>((*r)->regions()[0].address);
  expect_page(base, 0);
  ASSERT_EQ(::madvise(base + 4 * kMiB, 4 * kMiB, MADV_DONTNEED), 0);
  for (size_t off = 4 * kMiB; off < 8 * kMiB; off += kPage) {
    ASSERT_TRUE(testing::all_zero(base + off, kPage)) << off;
  }
  // Move the last 8 MiB elsewhere: its pages come with it, still restored on touch.
  void* spot = ::mmap(nullptr, 8 * kMiB, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(spot, MAP_FAILED);
  void* moved = ::mremap(base + 24 * kMiB, 8 * kMiB, 8 * kMiB, MREMAP_MAYMOVE | MREMAP_FIXED, spot);
  ASSERT_NE(moved, MAP_FAILED);
  const auto* mv = static_cast<const std::byte*>(moved);
  for (size_t off = 0; off < 8 * kMiB; off += kPage) {
    ASSERT_EQ(std::memcmp(mv + off, expected_.data() + 24 * kMiB + off, kPage), 0) << "moved page at " << off;
  }
  for (size_t off = 8 * kMiB; off < 24 * kMiB; off += kPage) expect_page(base, off);
  ASSERT_TRUE((*r)->finish().ok());
  ::munmap(const_cast<std::byte*>(mv), 8 * kMiB);
  ::munmap(base, 24 * kMiB);
}

// The process grows a restored mapping (mremap), in place and then moving it: the faulting
// thread zero-fills the new tails, as the kernel would, and still restores every snapshot page.
// The tail's first touch used to be passed on as a bus error.
TEST_F(FaultOnThreadTest, AGrownMappingReadsZerosPastTheSnapshot) {
  capture(8 * kMiB, 53);
  start_server();
  auto r = LazyRestore::start(uri(), kf_, on_thread(false));
  ASSERT_TRUE(r.ok()) << r.error().message();
  auto* base = static_cast<std::byte*>((*r)->regions()[0].address);
  expect_page(base, 0);
  auto expect_zeros = [](const std::byte* p, size_t len) {
    for (size_t off = 0; off < len; off += kPage) {
      ASSERT_TRUE(testing::all_zero(p + off, kPage)) << off;
    }
  };
  ASSERT_EQ(::mremap(base, 8 * kMiB, 12 * kMiB, 0), base) << std::strerror(errno);
  expect_zeros(base + 9 * kMiB, 3 * kMiB);
  void* spot = ::mmap(nullptr, 16 * kMiB, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(spot, MAP_FAILED);
  void* moved = ::mremap(base, 12 * kMiB, 16 * kMiB, MREMAP_MAYMOVE | MREMAP_FIXED, spot);
  ASSERT_EQ(moved, spot) << std::strerror(errno);
  auto* mv = static_cast<std::byte*>(moved);
  expect_zeros(mv + 8 * kMiB, 8 * kMiB);
  for (size_t off = 0; off < 8 * kMiB; off += kPage) {
    ASSERT_EQ(std::memcmp(mv + off, expected_.data() + off, kPage), 0) << "snapshot page at " << off;
  }
  ASSERT_TRUE((*r)->finish().ok());
  ::munmap(mv, 16 * kMiB);
}

// fork() mid-restore: the restore completes first, so the child sees every byte.
TEST_F(FaultOnThreadTest, ForkCompletesTheRestoreFirst) {
  capture(16 * kMiB, 46);
  start_server();
  auto r = LazyRestore::start(uri(), kf_, on_thread(false));
  ASSERT_TRUE(r.ok()) << r.error().message();
  const auto* got = static_cast<const std::byte*>((*r)->regions()[0].address);
  expect_page(got, 0);
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    for (size_t off = 0; off < len_; off += kPage)
      if (std::memcmp(got + off, expected_.data() + off, kPage) != 0) _exit(7);
    _exit(0);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status)) << "child died of signal " << WTERMSIG(status);
  EXPECT_EQ(WEXITSTATUS(status), 0);
  EXPECT_TRUE((*r)->stats().complete);
  ASSERT_TRUE((*r)->finish().ok());
  ::munmap(const_cast<std::byte*>(got), len_);
}

// The server restarts on the same port mid-restore: broken connections are reopened and the
// faults that met them are served again; every byte is right.
TEST_F(FaultOnThreadTest, ServerRestartIsInvisible) {
  capture(16 * kMiB, 47);
  start_server();
  uint16_t port = server_->port();
  auto r = LazyRestore::start(uri(), kf_, on_thread(false));
  ASSERT_TRUE(r.ok()) << r.error().message();
  const auto* got = static_cast<const std::byte*>((*r)->regions()[0].address);
  for (size_t off = 0; off < len_ / 2; off += kPage) expect_page(got, off);
  stop_server();
  server_.reset();
  pageserver::ServerOptions same_port;
  same_port.port = port;
  start_server(same_port);
  for (size_t off = len_ / 2; off < len_; off += kPage) expect_page(got, off);
  ASSERT_TRUE((*r)->finish().ok());
  ::munmap(const_cast<std::byte*>(got), len_);
}

// Datagrams lost or late: the server (a process of its own here) is stopped and continued
// again and again while a thread faults. A fault whose datagram gets no answer within the wait
// is asked for on the connection, which answers once the server runs again; late datagram
// replies are told apart by their id and skipped. Every byte is right.
TEST_F(FaultOnThreadTest, LostOrLateDatagramsFallBackToTheConnection) {
  capture(32 * kMiB, 52);
  ServerProcess server;
  fork_server(server);
  if (HasFatalFailure()) return;
  const uint16_t port = server.port;
  const std::string u = "lazymem://127.0.0.1:" + std::to_string(port) + "/snap";
  auto r = LazyRestore::start(u, kf_, on_thread(false));
  ASSERT_TRUE(r.ok()) << r.error().message();
  const auto* got = static_cast<const std::byte*>((*r)->regions()[0].address);

  std::atomic<bool> done{false};
  std::atomic<size_t> wrong{0}, slow{0}, touched{0};
  std::atomic<int64_t> touch_began{0};  // CLOCK_MONOTONIC ns of the touch in progress (0: none)
  std::thread toucher([&] {
    std::vector<size_t> order(len_ / kPage);
    for (size_t i = 0; i < order.size(); ++i) order[i] = i * kPage;
    std::shuffle(order.begin(), order.end(), std::mt19937_64(52));
    for (size_t off : order) {
      auto t0 = std::chrono::steady_clock::now();
      touch_began = t0.time_since_epoch().count();
      bool ok = std::memcmp(got + off, expected_.data() + off, kPage) == 0;
      touch_began = 0;
      // As long as a datagram wait at least (2 ms): it went to the connection.
      if (std::chrono::steady_clock::now() - t0 >= std::chrono::milliseconds(2)) ++slow;
      if (!ok) ++wrong;
      touched.fetch_add(1);
      touched.notify_all();
    }
    done = true;
    touched.fetch_add(1);
    touched.notify_all();
  });
  // Waits until the thread has touched `n` more pages (or is done).
  auto wait_for_touches = [&](size_t n) {
    const size_t target = touched.load() + n;
    for (size_t v = touched.load(); v < target && !done; v = touched.load()) touched.wait(v);
  };
  // Whether a request waits unread on one of the server's TCP connections: a fault that gave
  // up on its datagram and asked on the connection (/proc/net/tcp: local port, state 01 =
  // established, rx_queue).
  auto request_on_a_connection = [&] {
    std::ifstream tcp("/proc/net/tcp");
    std::string line;
    std::getline(tcp, line);  // the heading
    while (std::getline(tcp, line)) {
      std::istringstream f(line);
      std::string sl, local, remote, state, queues;
      if (!(f >> sl >> local >> remote >> state >> queues)) continue;
      const unsigned long local_port = std::stoul(local.substr(local.find(':') + 1), nullptr, 16);
      const unsigned long rx = std::stoul(queues.substr(queues.find(':') + 1), nullptr, 16);
      if (local_port == port && state == "01" && rx > 0) return true;
    }
    return false;
  };
  // While the server is stopped its shared UDP socket's buffer is filled with junk (counted and
  // dropped once it runs): a datagram sent there then is lost for good; one already on its
  // session's own socket is answered late, after the fault asked on the connection.
  sys::UniqueFd junk(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  sockaddr_in to{};
  to.sin_family = AF_INET;
  to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  to.sin_port = htons(port);
  ASSERT_EQ(::connect(junk.get(), reinterpret_cast<sockaddr*>(&to), sizeof to), 0);
  int stops = 0;
  while (!done) {
    wait_for_touches(64);  // served as usual a while
    ::kill(server.pid, SIGSTOP);
    char b[64] = {};
    for (int i = 0; i < 400; ++i) (void)::send(junk.get(), b, sizeof b, 0);  // ~2x what the buffer holds
    // Stopped until a fault has given up on its datagram and asked on the connection, or (the
    // server stopped between reading a request and answering it) has waited longer than any
    // datagram wait (20 ms).
    auto stuck = [&] {
      const int64_t began = touch_began.load();
      return began != 0 && std::chrono::steady_clock::now().time_since_epoch().count() - began > 25'000'000;
    };
    while (!done && !request_on_a_connection() && !stuck()) std::this_thread::yield();
    ::kill(server.pid, SIGCONT);
    ++stops;
  }
  toucher.join();
  EXPECT_EQ(wrong.load(), 0u);
  EXPECT_GT(slow.load(), 0u) << "no fault met a stopped server (" << stops << " stops): the fallback went untested";
  auto loc = SnapshotLocation::parse(u);
  ASSERT_TRUE(loc.ok());
  auto st = net::server_stats_json(*loc, "", std::chrono::steady_clock::now() + std::chrono::seconds(10));
  ASSERT_TRUE(st.ok()) << st.error().message();
  auto j = nlohmann::json::parse(*st);
  EXPECT_GT(j["datagram_requests"].get<uint64_t>(), 0u) << *st;
  EXPECT_GT(j["datagrams_dropped"].get<uint64_t>(), 0u) << *st;  // the junk
  RegionStats rs = (*r)->stats().total();
  EXPECT_GT(rs.datagrams_lost, 0u) << "the restore did not count the datagrams it gave up on";
  EXPECT_GT(rs.pages_by_datagram, 0u);
  ASSERT_TRUE((*r)->finish().ok());
  for (size_t off = 0; off < len_; off += kPage) expect_page(got, off);
  ::munmap(const_cast<std::byte*>(got), len_);
}

// The server dies: the faulting access fails visibly (SIGBUS) within the deadline, no hang.
TEST_F(FaultOnThreadTest, ServerDeathFailsTheFaultVisibly) {
  if (!kf_.has_uffd_poison()) GTEST_SKIP() << "kernel lacks UFFDIO_POISON (Linux 6.6)";
  capture(32 * kMiB, 48);
  RestoreOptions o = on_thread(false);
  o.fault_deadline = std::chrono::milliseconds(2000);
  int status = 0;
  double secs = 0;
  child_touches_after_server_death(o, 16 * kMiB, false, status, secs);
  if (HasFatalFailure()) return;
  // The SIGBUS goes on to the handler that was there first (a sanitizer's reports it and exits).
  ASSERT_TRUE(testing::died_of_sigbus(status));
  EXPECT_LT(secs, 8.0);
}

// The snapshot is replaced under the same name while a process restores from it: its faults
// are still served the version it read. The server then restarts with only the replacement in
// its store: a fault now fails visibly (the version is gone), never installs the other's page.
TEST_F(FaultOnThreadTest, ReplacedSnapshotServesTheVersionTheRestoreRead) {
  if (!kf_.has_uffd_poison()) GTEST_SKIP() << "kernel lacks UFFDIO_POISON (Linux 6.6)";
  capture(1 * kMiB, 51);
  const std::vector<std::byte> a = expected_;
  constexpr size_t kSecond = 65 * kPage, kThird = 100 * kPage;  // in chunks of their own, data in both versions
  int ready[2], go[2];
  ASSERT_EQ(::pipe(ready), 0);
  ASSERT_EQ(::pipe(go), 0);
  // Forked before the server starts: a child holding the server's sockets would keep its port.
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::close(ready[0]);
    ::close(go[1]);
    uint16_t port = 0;
    if (::read(go[0], &port, sizeof port) != sizeof port) _exit(2);
    const std::string u = "lazymem://127.0.0.1:" + std::to_string(port) + "/snap";
    RestoreOptions o = on_thread(false);
    o.fault_deadline = std::chrono::milliseconds(2000);
    o.fetch_attempts = 1;
    auto r = LazyRestore::start(u, kf_, o);
    if (!r.ok()) _exit(3);
    const auto* p = static_cast<const std::byte*>((*r)->regions()[0].address);
    if (std::memcmp(p, a.data(), kPage) != 0) _exit(6);
    char c = 1;
    (void)!::write(ready[1], &c, 1);
    (void)!::read(go[0], &c, 1);  // the parent has replaced the snapshot
    if (std::memcmp(p + kSecond, a.data() + kSecond, kPage) != 0) _exit(7);  // another version's page
    (void)!::write(ready[1], &c, 1);
    (void)!::read(go[0], &c, 1);  // the parent has restarted the server
    _exit(std::memcmp(p + kThird, a.data() + kThird, kPage) == 0 ? 8 : 9);  // 9: another version's page
  }
  ::close(ready[1]);
  ::close(go[0]);
  start_server();
  const uint16_t port = server_->port();
  ASSERT_EQ(::write(go[1], &port, sizeof port), static_cast<ssize_t>(sizeof port));
  char c;
  ASSERT_EQ(::read(ready[0], &c, 1), 1) << "the child died before its first page";
  capture(1 * kMiB, 52);  // replaced in the store
  for (size_t off : {kSecond, kThird}) ASSERT_NE(std::memcmp(a.data() + off, expected_.data() + off, kPage), 0);
  {
    auto r = LazyRestore::start(uri(), kf_);  // a restore starting now reads the replacement
    ASSERT_TRUE(r.ok()) << r.error().message();
    const auto* p = static_cast<const std::byte*>((*r)->regions()[0].address);
    EXPECT_EQ(std::memcmp(p, expected_.data(), len_), 0);
    ASSERT_TRUE((*r)->finish().ok());
    ::munmap(const_cast<std::byte*>(p), len_);
  }
  ASSERT_EQ(::write(go[1], &c, 1), 1);
  ASSERT_EQ(::read(ready[0], &c, 1), 1) << "the child did not get the page of the version it read";
  stop_server();
  server_.reset();
  pageserver::ServerOptions again;
  again.port = port;
  start_server(again);
  if (HasFatalFailure()) ::kill(pid, SIGKILL);
  ASSERT_EQ(::write(go[1], &c, 1), 1);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ::close(ready[0]);
  ::close(go[1]);
  ASSERT_FALSE(WIFEXITED(status) && WEXITSTATUS(status) == 9) << "a page of the replacement was installed";
  EXPECT_TRUE(testing::died_of_sigbus(status));
}

// A bus error that is not a missing page of ours (an access past the end of a mapped file)
// goes on as if the restore's handler were not there: to the handler there was before, or to
// the default action. Death tests re-run in a fresh process, where the handler goes in first.
void touch_past_end_of_file(const std::string& dir) {
  int fd = ::open((dir + "/short").c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
  if (fd < 0 || ::ftruncate(fd, kPage) != 0) _exit(10);
  auto* m = static_cast<volatile char*>(::mmap(nullptr, 2 * kPage, PROT_READ, MAP_SHARED, fd, 0));
  if (m == MAP_FAILED) _exit(11);
  (void)m[kPage];  // past the end: SIGBUS
}

TEST_F(FaultOnThreadTest, ForeignBusErrorsGoToThePreviousHandler) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  capture(1 * kMiB, 50);
  start_server();
  EXPECT_EXIT(
      {
        struct sigaction sa {};
        sa.sa_sigaction = [](int, siginfo_t* si, void*) { _exit(si->si_code == BUS_ADRERR ? 42 : 43); };
        sa.sa_flags = SA_SIGINFO;
        ::sigaction(SIGBUS, &sa, nullptr);
        auto r = LazyRestore::start(uri(), kf_, on_thread(false));
        if (!r.ok()) _exit(3);
        touch_past_end_of_file(dir_.path());
        _exit(5);
      },
      ::testing::ExitedWithCode(42), "");
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)  // theirs is the previous handler
  EXPECT_EXIT(
      {
        struct sigaction sa {};
        sa.sa_handler = SIG_DFL;
        sa.sa_flags = SA_SIGINFO;  // the default action, with a flag that must not matter
        ::sigaction(SIGBUS, &sa, nullptr);
        auto r = LazyRestore::start(uri(), kf_, on_thread(false));
        if (!r.ok()) _exit(3);
        touch_past_end_of_file(dir_.path());
        _exit(5);
      },
      ::testing::KilledBySignal(SIGBUS), "");
#endif
}

// Threads of some runtimes (Rust's, Go's) handle signals on a small alternate stack, and our
// handler runs there (SA_ONSTACK, which Go requires): fetching, decoding and installing a page
// must fit in 8 KiB, guard page below.
TEST_F(FaultOnThreadTest, FaultsOnASmallAlternateStack) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "sanitizer builds use several times the stack (measured: optimized fits 6 KiB, not 4)";
#endif
  capture(8 * kMiB, 51);
  start_server();
  auto r = LazyRestore::start(uri(), kf_, on_thread(false));
  ASSERT_TRUE(r.ok()) << r.error().message();
  const auto* got = static_cast<const std::byte*>((*r)->regions()[0].address);
  constexpr size_t kAltStack = 8192;
  auto* area = static_cast<std::byte*>(::mmap(nullptr, kAltStack + kPage, PROT_READ | PROT_WRITE,
                                               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  ASSERT_NE(area, MAP_FAILED);
  ASSERT_EQ(::mprotect(area, kPage, PROT_NONE), 0);  // the guard: an overflow crashes the test
  std::atomic<size_t> wrong{0};
  std::thread t([&] {
    stack_t ss{};
    ss.ss_sp = area + kPage;
    ss.ss_size = kAltStack;
    if (::sigaltstack(&ss, nullptr) != 0) {
      wrong = ~size_t{0};
      return;
    }
    for (size_t off = 0; off < len_; off += 37 * kPage) {
      if (std::memcmp(got + off, expected_.data() + off, kPage) != 0) ++wrong;
    }
    ss.ss_flags = SS_DISABLE;
    (void)::sigaltstack(&ss, nullptr);
  });
  t.join();
  EXPECT_EQ(wrong.load(), 0u);
  EXPECT_GT((*r)->stats().total().faults, 0u);
  ::munmap(area, kAltStack + kPage);
  ASSERT_TRUE((*r)->finish().ok());
  ::munmap(const_cast<std::byte*>(got), len_);
}

TEST_F(FaultOnThreadTest, LocalSourceIsAClearError) {
  capture(1 * kMiB, 49);
  auto r = LazyRestore::start(dir_.path() + "/snap", kf_, on_thread(false));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::kUnsupported);
  EXPECT_NE(r.error().message().find("page server"), std::string::npos) << r.error().message();
}

}  // namespace
}  // namespace lazymem
