// Live migration between two processes: the source (a child, forked before this test starts any
// thread) pre-copies its memory into a store or a page server while a thread keeps writing,
// pauses, and serves the chunks written since from its paused memory; the destination (this
// process) restores lazily from it, with the pre-copy as base. Every byte restored is compared
// with the source's memory as the pause left it. Also across two "hosts" (network namespaces).
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <thread>

#include "../common/test_data.h"
#include "../common/veth_host.h"
#include "served_snapshot.h"
#include "daemon.h"
#include "lazymem/agent_client.h"
#include "lazymem/kernel_features.h"
#include "lazymem/migrate.h"
#include "lazymem/pause_gate.h"
#include "lazymem/restore.h"
#include "lazymem/snapshot.h"
#include "page_server.h"

namespace lazymem {
namespace {

using testing::ScratchDir;
using testing::VethHost;
constexpr size_t kMiB = 1024 * 1024;

// Writes 8-byte words at random places of `m` until destroyed, parkable between two writes.
class Writer {
 public:
  // len 0: no thread (an idle workload).
  Writer(std::byte* m, size_t len) : thread_(len == 0 ? std::thread() : std::thread([this, m, len] { run(m, len); })) {}
  ~Writer() {
    stop_ = true;
    gate.resume();
    if (thread_.joinable()) thread_.join();
  }
  uint64_t writes() const { return writes_.load(); }
  PauseGate gate;

 private:
  void run(std::byte* m, size_t len) {
    gate.enter();
    std::mt19937_64 rng(7);
    for (uint64_t n = 1; !stop_.load(std::memory_order_relaxed); ++n) {
      gate.checkpoint();
      std::memcpy(m + (rng() % (len / 8)) * 8, &n, 8);
      writes_.store(n, std::memory_order_relaxed);
    }
    gate.leave();
  }
  std::atomic<uint64_t> writes_{0};
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

bool write_all(int fd, const void* p, size_t n) {
  const auto* b = static_cast<const char*>(p);
  while (n > 0) {
    ssize_t w = ::write(fd, b, n);
    if (w <= 0) return false;
    b += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

bool read_all(int fd, void* p, size_t n) {
  auto* b = static_cast<char*>(p);
  while (n > 0) {
    ssize_t r = ::read(fd, b, n);
    if (r <= 0) return false;
    b += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

// Source exit codes, so the parent can say what went wrong there.
enum SourceExit { kSourceOk = 0, kSourceStartFailed = 10, kSourcePipe = 11, kSourcePostcopyFailed = 12, kSourceNoNamespace = 13 };

struct SourceSpec {
  size_t len = 32 * kMiB;
  std::string netns;                  // the source's "host": a network namespace ("": this one)
  std::string listen = "127.0.0.1:0";
  bool idle = false;                  // no writer: nothing is written after the pre-copy
  CaptureOptions capture;
  std::chrono::milliseconds postcopy_timeout{60000};
  std::chrono::milliseconds linger{1000};  // MigrationOptions::linger
};

// The source: the child's whole life. Reads "<base>\n" (where to pre-copy, once the test has it
// ready), sends "<location>\n", the region's bytes as the pause left them and the number of
// chunks left at the source, then serves until the destination has everything.
[[noreturn]] void run_source(const SourceSpec& spec, int in, int out) {
  if (!spec.netns.empty()) {
    int ns = ::open(("/var/run/netns/" + spec.netns).c_str(), O_RDONLY | O_CLOEXEC);
    if (ns < 0 || ::setns(ns, CLONE_NEWNET) != 0) _exit(kSourceNoNamespace);
  }
  std::string base;
  for (char c; read_all(in, &c, 1) && c != '\n';) base += c;
  const KernelFeatures kf = probe_kernel();
  void* p = testing::map_for_capture(spec.len, 31);
  if (p == nullptr) _exit(kSourceStartFailed);
  auto* m = static_cast<std::byte*>(p);
  testing::fill_mixed(m, spec.len, 31);
  Writer writer(m + spec.len / 4, spec.idle ? 0 : spec.len / 2);  // the middle half is written throughout
  while (!spec.idle && writer.writes() < 10000) std::this_thread::yield();
  MigrationOptions mo;
  mo.listen = spec.listen;
  mo.linger = spec.linger;
  mo.precopy.max_rounds = 3;
  mo.precopy.pause = [&] { writer.gate.pause(); };
  mo.precopy.resume = [&] { writer.gate.resume(); };
  mo.precopy.app_state = [&] {
    const uint64_t n = writer.writes();
    std::vector<std::byte> s(8);
    std::memcpy(s.data(), &n, 8);
    return s;
  };
  CaptureRegion region{"heap", p, spec.len, PROT_READ | PROT_WRITE};
  auto src = MigrationSource::start(base, std::span(&region, 1), spec.capture, mo, kf);
  if (!src.ok()) {
    std::fprintf(stderr, "source: %s\n", src.error().message().c_str());
    _exit(kSourceStartFailed);
  }
  const std::string line = (*src)->location() + "\n";
  if (!write_all(out, line.data(), line.size()) || !write_all(out, m, spec.len)) _exit(kSourcePipe);
  const MigrationReport& rep = (*src)->report();
  if (!write_all(out, &rep.postcopy_chunks, 8)) _exit(kSourcePipe);
  auto done = (*src)->wait_postcopy(spec.postcopy_timeout);
  if (!done.ok()) {
    std::fprintf(stderr, "source: %s\n", done.error().message().c_str());
    _exit(kSourcePostcopyFailed);
  }
  _exit(kSourceOk);
}

class MigrateTest : public ::testing::Test {
 protected:
  void SetUp() override {
    kf_ = probe_kernel();
    if (!kf_.uffd_usable) GTEST_SKIP() << "userfaultfd unusable: " << kf_.uffd_error;
    if (!kf_.has_dirty_tracking()) GTEST_SKIP() << "dirty tracking needs Linux 5.13 (userfaultfd write-protect faults)";
  }
  void TearDown() override {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    if (from_source_ >= 0) ::close(from_source_);
    if (to_source_ >= 0) ::close(to_source_);
    if (server_) server_->stop();
    if (server_thread_.joinable()) server_thread_.join();
  }

  // Forks the source, first: this process has no thread of the test's yet.
  void fork_source(const SourceSpec& spec) {
    int out[2], in[2];
    ASSERT_EQ(::pipe2(out, O_CLOEXEC), 0);
    ASSERT_EQ(::pipe2(in, O_CLOEXEC), 0);
    pid_ = ::fork();
    ASSERT_GE(pid_, 0);
    if (pid_ == 0) {
      ::close(out[0]);
      ::close(in[1]);
      run_source(spec, in[0], out[1]);
    }
    ::close(out[1]);
    ::close(in[0]);
    from_source_ = out[0];
    to_source_ = in[1];
    len_ = spec.len;
  }

  // A page server on `host` serving the test's store: where a pre-copy can go.
  std::string start_page_server(const std::string& host, const std::string& token = "") {
    pageserver::ServerOptions o;
    o.store_dir = dir_.path();
    o.host = host;
    o.token = token;
    auto s = pageserver::PageServer::listen(o);
    if (!s.ok()) {
      ADD_FAILURE() << s.error().message();
      return "";
    }
    server_ = std::move(*s);
    server_thread_ = std::thread([this] { (void)server_->run(); });
    return fmt::format("lazymem://{}:{}/app", host, server_->port());
  }

  // Tells the source where to pre-copy, and reads what it says once it has switched over.
  void migrate_to(const std::string& base, const std::string& source_host = "127.0.0.1") {
    const std::string line = base + "\n";
    ASSERT_TRUE(write_all(to_source_, line.data(), line.size()));
    for (char c; read_all(from_source_, &c, 1) && c != '\n';) location_ += c;
    ASSERT_EQ(location_.rfind("lazymem://" + source_host + ":", 0), 0u)
        << "source said '" << location_ << "' (exit " << source_exit() << ")";
    expected_.resize(len_);
    ASSERT_TRUE(read_all(from_source_, expected_.data(), len_));
    ASSERT_TRUE(read_all(from_source_, &postcopy_chunks_, 8));
  }

  int source_exit() {
    int status = 0;
    if (pid_ <= 0 || ::waitpid(pid_, &status, 0) != pid_) return -1;
    pid_ = 0;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }

  void restore_and_compare(const std::string& base, RestoreOptions ro = {});

  static void expect_equal(const std::byte* got, const std::vector<std::byte>& want) {
    for (size_t off = 0; off < want.size(); off += 4096) {
      if (std::memcmp(got + off, want.data() + off, 4096) != 0) FAIL() << "page at offset " << off << " differs";
    }
  }

  KernelFeatures kf_;
  ScratchDir dir_;
  pid_t pid_ = 0;
  int from_source_ = -1, to_source_ = -1;
  size_t len_ = 0;
  std::unique_ptr<pageserver::PageServer> server_;
  std::thread server_thread_;
  std::string location_;
  std::vector<std::byte> expected_;
  uint64_t postcopy_chunks_ = 0;
};

// Restores from the source with the base and checks every byte and the state blob; then the
// source, whose post-copy is over, exits 0.
void MigrateTest::restore_and_compare(const std::string& base, RestoreOptions ro) {
  ro.base = base;
  auto r = LazyRestore::start(location_, kf_, ro);
  ASSERT_TRUE(r.ok()) << r.error().message();
  ASSERT_EQ((*r)->regions().size(), 1u);
  expect_equal(static_cast<const std::byte*>((*r)->region("heap")->address), expected_);
  EXPECT_EQ((*r)->app_state().size(), 8u);
  ASSERT_TRUE((*r)->finish().ok());
  ::munmap((*r)->region("heap")->address, len_);
  r->reset();
  EXPECT_EQ(source_exit(), kSourceOk) << "the source did not see the post-copy finish";
}

TEST_F(MigrateTest, DestinationHoldsTheSourceMemoryAsThePauseLeftIt) {
  // Ended by the destination saying it holds every page (through the reader that routes between
  // base and source), not by the linger: no test outlasts this one.
  SourceSpec spec;
  spec.linger = std::chrono::hours(1);
  spec.postcopy_timeout = std::chrono::seconds(30);
  fork_source(spec);
  migrate_to(dir_.path() + "/app");
  EXPECT_GT(postcopy_chunks_, 0u) << "nothing was left at the source: the writer did not race the switch-over";
  restore_and_compare(dir_.path() + "/app");
}

// Nothing written since the pre-copy: nothing is left at the source, which must still wait for
// the destination to read its manifest (the only copy, with the state blob) before it goes.
TEST_F(MigrateTest, IdleSourceWaitsForTheDestination) {
  SourceSpec spec;
  spec.idle = true;
  fork_source(spec);
  migrate_to(dir_.path() + "/app");
  EXPECT_EQ(postcopy_chunks_, 0u);
  int status = 0;
  EXPECT_EQ(::waitpid(pid_, &status, WNOHANG), 0) << "the source left before the destination came";
  restore_and_compare(dir_.path() + "/app");
}

// The source gone while the base holds everything still to come (nothing was written after the
// pre-copy): its connection failing fails nothing of the base's, and the restore completes.
TEST_F(MigrateTest, SourceGoneFailsNothingTheBaseHolds) {
  SourceSpec spec;
  spec.idle = true;
  fork_source(spec);
  migrate_to(dir_.path() + "/app");
  RestoreOptions ro;
  ro.base = dir_.path() + "/app";
  ro.fetch_attempts = 1;
  ro.fault_deadline = std::chrono::milliseconds(2000);
  ro.prefetch = false;  // nothing is fetched before the source is gone; wait_complete() then fetches it all
  auto r = LazyRestore::start(location_, kf_, ro);
  ASSERT_TRUE(r.ok()) << r.error().message();
  ::kill(pid_, SIGKILL);
  ASSERT_EQ(source_exit(), 128 + SIGKILL);
  Status done = (*r)->wait_complete(std::chrono::seconds(60));
  ASSERT_TRUE(done.ok()) << done.error().message();
  EXPECT_FALSE((*r)->stats().failed);
  expect_equal(static_cast<const std::byte*>((*r)->region("heap")->address), expected_);
  ASSERT_TRUE((*r)->finish().ok());
  ::munmap((*r)->region("heap")->address, len_);
}

// Two "hosts": the source in a network namespace pre-copies over a veth pair to a page server
// on this side, and the destination (this side) restores from it across the pair.
TEST_F(MigrateTest, BetweenTwoHostsThroughAPageServer) {
  VethHost host;
  if (std::string why = host.create(); !why.empty()) GTEST_SKIP() << why;
  if (HasFailure()) return;
  // Off loopback, the paused memory is served only to who knows the token (the page server's too).
  const std::string token = "a token both hosts were given";
  const std::string token_file = dir_.path() + "/token";
  { std::ofstream(token_file) << token; }
  SourceSpec spec;
  spec.netns = host.ns;
  spec.listen = host.far() + ":0";
  spec.capture.token_file = token_file;
  fork_source(spec);
  const std::string base = start_page_server(host.near(), token);
  ASSERT_FALSE(base.empty());
  migrate_to(base, host.far());
  RestoreOptions ro;
  ro.token_file = token_file;
  restore_and_compare(base, ro);
}

// A pre-copy written in format 1 (one zstd frame per chunk, for readers older than v2), to a
// page server: the destination decodes the base's chunks whole and the source's raw ones, and
// the two kinds of entry route apart as in v2.
TEST_F(MigrateTest, FormatOneBaseThroughAPageServer) {
  SourceSpec spec;
  spec.capture.format_version = 1;
  fork_source(spec);
  const std::string base = start_page_server("127.0.0.1");
  ASSERT_FALSE(base.empty());
  migrate_to(base);
  EXPECT_GT(postcopy_chunks_, 0u) << "nothing was left at the source: the writer did not race the switch-over";
  auto m = read_manifest(dir_.path() + "/app");
  ASSERT_TRUE(m.ok()) << m.error().message();
  EXPECT_EQ(m->format_version, 1u);
  size_t whole_frames = 0;
  for (const auto& c : m->regions.at(0).chunks) whole_frames += c.codec == Codec::kZstd;
  EXPECT_GT(whole_frames, 0u) << "the base holds no format-1 chunk";
  restore_and_compare(base);
}

// The source dies during post-copy: the destination's accesses to the pages it held fail with
// SIGBUS within the fault deadline, never hang, never get a wrong page; the pre-copied ones
// were all there.
TEST_F(MigrateTest, SourceDyingDuringPostcopyFailsTheAccessesVisibly) {
  fork_source({});
  migrate_to(dir_.path() + "/app");
  int ready[2], go[2];
  ASSERT_EQ(::pipe2(ready, O_CLOEXEC), 0);
  ASSERT_EQ(::pipe2(go, O_CLOEXEC), 0);
  const pid_t dest = ::fork();
  ASSERT_GE(dest, 0);
  if (dest == 0) {  // the destination: what it touches before the source dies must be right
    RestoreOptions ro;
    ro.base = dir_.path() + "/app";
    ro.prefetch = false;
    ro.fault_deadline = std::chrono::milliseconds(2000);
    ro.fetch_attempts = 1;
    auto r = LazyRestore::start(location_, ro);
    if (!r.ok()) _exit(20);
    const auto* m = static_cast<const std::byte*>((*r)->region("heap")->address);
    const size_t at = len_ / 2;  // in the written half: its chunk came from the source
    if (std::memcmp(m + at, expected_.data() + at, 4096) != 0) _exit(21);
    char c = 1;
    if (::write(ready[1], &c, 1) != 1 || ::read(go[0], &c, 1) != 1) _exit(22);
    for (size_t off = 0; off < len_; off += 4096) {
      if (std::memcmp(m + off, expected_.data() + off, 4096) != 0) _exit(23);  // a wrong page
    }
    _exit(24);  // every page came: the source's death went unnoticed
  }
  ::close(ready[1]);
  ::close(go[0]);
  char c;
  ASSERT_EQ(::read(ready[0], &c, 1), 1) << "the destination could not restore or got a wrong page";
  ::kill(pid_, SIGKILL);
  ASSERT_EQ(source_exit(), 128 + SIGKILL);
  const auto killed_at = std::chrono::steady_clock::now();
  ASSERT_EQ(::write(go[1], &c, 1), 1);
  int status = 0;
  ASSERT_EQ(::waitpid(dest, &status, 0), dest);
  EXPECT_TRUE(testing::died_of_sigbus(status));
  EXPECT_LT(std::chrono::steady_clock::now() - killed_at, std::chrono::seconds(20)) << "the access waited far past its deadline";
  ::close(ready[0]);
  ::close(go[1]);
}

// The destination restores through the agent (which owns the uffd and serves the faults), the
// pre-copy as its base: every byte as the pause left it; the source sees the post-copy end
// once the restored process has exited.
TEST_F(MigrateTest, DestinationRestoresThroughTheAgent) {
  fork_source({});
  // The agent in a process of its own, forked while this one has no other thread.
  const std::string socket = dir_.path() + "/agent.sock";
  int ready[2];
  ASSERT_EQ(::pipe2(ready, O_CLOEXEC), 0);
  const pid_t agent = ::fork();
  ASSERT_GE(agent, 0);
  if (agent == 0) {
    ::close(ready[0]);
    agent::DaemonOptions o;
    o.socket_path = socket;
    auto d = agent::Daemon::start(o, kf_);
    if (!d.ok()) _exit(3);
    char c = 1;
    (void)!::write(ready[1], &c, 1);
    (void)(*d)->run();
    _exit(0);
  }
  ::close(ready[1]);
  char c;
  ASSERT_EQ(::read(ready[0], &c, 1), 1) << "lazymem-agent did not start";
  ::close(ready[0]);
  migrate_to(dir_.path() + "/app");
  const pid_t dest = ::fork();
  ASSERT_GE(dest, 0);
  if (dest == 0) {
    AgentRestoreOptions ao;
    ao.base = dir_.path() + "/app";
    auto r = AgentRestore::start(socket, location_, ao);
    if (!r.ok()) {
      std::fprintf(stderr, "destination: %s\n", r.error().message().c_str());
      _exit(20);
    }
    const auto* m = static_cast<const std::byte*>((*r)->region("heap")->address);
    for (size_t off = 0; off < len_; off += 4096) {
      if (std::memcmp(m + off, expected_.data() + off, 4096) != 0) _exit(21);
    }
    _exit((*r)->wait_complete().ok() ? 0 : 22);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(dest, &status, 0), dest);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "destination status " << status;
  EXPECT_EQ(source_exit(), kSourceOk) << "the source did not see the post-copy finish";
  ::kill(agent, SIGTERM);
  ::waitpid(agent, nullptr, 0);
}

// Serving the paused memory off loopback without a token is refused before anything is done.
TEST_F(MigrateTest, NoTokenOffLoopbackIsRefused) {
  int dummy = 0;
  CaptureRegion region{"heap", &dummy, 4096, PROT_READ | PROT_WRITE};
  MigrationOptions mo;
  mo.listen = "0.0.0.0:0";
  mo.advertise = "src.example";
  mo.precopy.pause = [] {};
  mo.precopy.resume = [] {};
  auto src = MigrationSource::start(dir_.path() + "/app", std::span(&region, 1), {}, mo, kf_);
  ASSERT_FALSE(src.ok());
  EXPECT_NE(src.error().message().find("without a token"), std::string::npos) << src.error().message();
  EXPECT_FALSE(std::filesystem::exists(dir_.path() + "/app")) << "something was stored before the refusal";
}

// A destination that keeps its restore (as a service does, never finish()ing it): once complete,
// its connection to the source closes, and the source is done.
TEST_F(MigrateTest, CompleteRestoreLetsTheSourceGoWithoutFinish) {
  SourceSpec spec;
  spec.postcopy_timeout = std::chrono::seconds(20);
  fork_source(spec);
  migrate_to(dir_.path() + "/app");
  RestoreOptions ro;
  ro.base = dir_.path() + "/app";
  auto r = LazyRestore::start(location_, kf_, ro);
  ASSERT_TRUE(r.ok()) << r.error().message();
  ASSERT_TRUE((*r)->wait_complete(std::chrono::seconds(60)).ok());
  EXPECT_EQ(source_exit(), kSourceOk) << "the source did not see the destination hang up";
  expect_equal(static_cast<const std::byte*>((*r)->region("heap")->address), expected_);
  ASSERT_TRUE((*r)->finish().ok());
  ::munmap((*r)->region("heap")->address, len_);
}

// Nobody restores: the source says so when its time is up.
TEST_F(MigrateTest, SourceGivesUpWhenTheDestinationNeverComes) {
  SourceSpec spec;
  spec.postcopy_timeout = std::chrono::milliseconds(300);
  fork_source(spec);
  migrate_to(dir_.path() + "/app");
  EXPECT_EQ(source_exit(), kSourcePostcopyFailed);
}

// A base that is not the one the source's snapshot was made from is refused, not mixed in.
TEST_F(MigrateTest, ForeignBaseIsRefused) {
  fork_source({});
  migrate_to(dir_.path() + "/app");
  void* p = testing::map_for_capture(4 * kMiB, 5);
  ASSERT_NE(p, nullptr);
  testing::fill_mixed(static_cast<std::byte*>(p), 4 * kMiB, 5);
  CaptureRegion other{"heap", p, 4 * kMiB, PROT_READ | PROT_WRITE};
  ASSERT_TRUE(capture_regions(dir_.path() + "/other", std::span(&other, 1), {}).ok());
  ::munmap(p, 4 * kMiB);
  RestoreOptions ro;
  ro.base = dir_.path() + "/other";
  auto r = LazyRestore::start(location_, kf_, ro);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message().find("is not an earlier version of"), std::string::npos) << r.error().message();
}

// Called off before any destination came: the workload runs here again, and no destination can
// restore it any more.
TEST_F(MigrateTest, AbortBeforeAnyDestinationResumesTheWorkload) {
  constexpr size_t kLen = 4 * kMiB;
  void* p = testing::map_for_capture(kLen, 41);
  ASSERT_NE(p, nullptr);
  auto* m = static_cast<std::byte*>(p);
  testing::fill_mixed(m, kLen, 41);
  {
    Writer writer(m, kLen);
    while (writer.writes() < 1000) std::this_thread::yield();
    MigrationOptions mo;
    mo.listen = "127.0.0.1:0";
    mo.precopy.pause = [&] { writer.gate.pause(); };
    mo.precopy.resume = [&] { writer.gate.resume(); };
    CaptureRegion region{"heap", p, kLen, PROT_READ | PROT_WRITE};
    auto src = MigrationSource::start(dir_.path() + "/app", std::span(&region, 1), {}, mo, kf_);
    ASSERT_TRUE(src.ok()) << src.error().message();
    const uint64_t parked = writer.writes();
    ASSERT_TRUE((*src)->abort().ok());
    while (writer.writes() == parked) std::this_thread::yield();  // it writes again (a hang: the test's timeout)
    EXPECT_FALSE(read_manifest((*src)->location()).ok()) << "the source still serves after the abort";
    EXPECT_FALSE((*src)->abort().ok());
  }
  ::munmap(p, kLen);
}

// Once a destination has read the manifest, the migration cannot be called off: the workload may
// be running there.
TEST_F(MigrateTest, AbortAfterADestinationReadTheManifestIsRefused) {
  constexpr size_t kLen = 4 * kMiB;
  void* p = testing::map_for_capture(kLen, 42);
  ASSERT_NE(p, nullptr);
  testing::fill_mixed(static_cast<std::byte*>(p), kLen, 42);
  {
    PauseGate gate;
    bool resumed = false;
    MigrationOptions mo;
    mo.listen = "127.0.0.1:0";
    mo.precopy.pause = [&] { gate.pause(); };
    mo.precopy.resume = [&] { resumed = true; };
    CaptureRegion region{"heap", p, kLen, PROT_READ | PROT_WRITE};
    auto src = MigrationSource::start(dir_.path() + "/app", std::span(&region, 1), {}, mo, kf_);
    ASSERT_TRUE(src.ok()) << src.error().message();
    ASSERT_TRUE(read_manifest((*src)->location()).ok());
    Status a = (*src)->abort();
    ASSERT_FALSE(a.ok());
    EXPECT_EQ(a.error().code(), Errc::kExists);
    EXPECT_NE(a.error().message().find("two copies would run"), std::string::npos) << a.error().message();
    EXPECT_FALSE(resumed);
  }
  ::munmap(p, kLen);
}

}  // namespace
}  // namespace lazymem
