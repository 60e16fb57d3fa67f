// Restores from two page servers — real lazymem-pageserver processes sharing a store — while
// the servers are stopped, continued, killed and restarted and the snapshot is replaced under
// its name: every restore, by the fault engine or by faulting threads, with prefetch or
// without, gets every byte of the version it began with. The steps run in lockstep with the
// restores' touches, so each one meets faults in flight.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include "../common/spawned_server.h"
#include "net/client.h"
#include "served_snapshot.h"

namespace lazymem {
namespace {

using testing::SpawnedServer;
constexpr size_t kMiB = 1 << 20, kPage = 4096;

// A child process restoring the snapshot (a process restores a snapshot's regions at their
// addresses, once) and touching its pages in a random order, a share at a time as the parent
// says, each compared with its version's bytes. Forked while the test process has no thread
// (the servers are processes of their own).
class Restorer {
 public:
  Restorer(const std::string& location, RestoreOptions o, const KernelFeatures& kf, const std::vector<std::byte>& expected,
           uint64_t seed) {
    int cmd[2], rep[2];
    if (::pipe2(cmd, O_CLOEXEC) != 0 || ::pipe2(rep, O_CLOEXEC) != 0) return;
    pid_ = ::fork();
    if (pid_ == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      for (int fd = 3; fd < 1024; ++fd) {  // other restorers' pipes: each must see its own end
        if (fd != cmd[0] && fd != rep[1]) ::close(fd);
      }
      _exit(run(location, o, kf, expected, seed, cmd[0], rep[1]));
    }
    ::close(cmd[0]);
    ::close(rep[1]);
    cmd_ = cmd[1];
    rep_ = rep[0];
  }
  ~Restorer() {
    if (cmd_ >= 0) ::close(cmd_);
    if (rep_ >= 0) ::close(rep_);
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  bool started() const { return pid_ > 0; }

  // Asks for the next `pages` to be touched (kFinish: the rest, then finish the restore).
  static constexpr uint32_t kFinish = ~0u;
  void ask(uint32_t pages) { (void)!::write(cmd_, &pages, sizeof pages); }
  // The answer: "" when every page touched was right.
  std::string answer() {
    char c = 0;
    pollfd p{rep_, POLLIN, 0};
    if (::poll(&p, 1, 120'000) <= 0) return "no answer in 120 s (a fault left hanging?)";
    if (::read(rep_, &c, 1) == 1 && c == 'k') return "";
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
    if (WIFSIGNALED(status)) return fmt::format("the restoring process died of signal {}", WTERMSIG(status));
    return fmt::format("the restoring process exited with {} ({})", WEXITSTATUS(status),
                       WEXITSTATUS(status) == 3 ? "restore did not start" : WEXITSTATUS(status) == 4 ? "a page was wrong"
                                                                                 : "finish failed");
  }

 private:
  static int run(const std::string& location, RestoreOptions o, const KernelFeatures& kf,
                 const std::vector<std::byte>& expected, uint64_t seed, int cmd, int rep) {
    auto r = LazyRestore::start(location, kf, o);
    if (!r.ok()) {
      std::fprintf(stderr, "restore: %s\n", r.error().message().c_str());
      return 3;
    }
    const auto* got = static_cast<const std::byte*>((*r)->regions()[0].address);
    std::vector<size_t> order;
    for (size_t off = 0; off < expected.size(); off += kPage) order.push_back(off);
    std::shuffle(order.begin(), order.end(), std::mt19937_64(seed));
    size_t next = 0;
    uint32_t pages = 0;
    while (::read(cmd, &pages, sizeof pages) == sizeof pages) {
      for (size_t end = pages == kFinish ? order.size() : std::min(order.size(), next + pages); next < end; ++next) {
        if (std::memcmp(got + order[next], expected.data() + order[next], kPage) != 0) {
          std::fprintf(stderr, "page at %#zx is not its version's\n", order[next]);
          return 4;
        }
      }
      if (pages == kFinish && !(*r)->finish().ok()) return 5;
      (void)!::write(rep, "k", 1);
      if (pages == kFinish) return 0;
    }
    return 6;
  }

  pid_t pid_ = -1;
  int cmd_ = -1, rep_ = -1;
};

class ChaosTest : public testing::ServedSnapshotTest {
 protected:
  void SetUp() override {
    ServedSnapshotTest::SetUp();
    if (IsSkipped()) return;
    const char* bin = std::getenv("LAZYMEM_PAGESERVER");
    if (bin == nullptr) GTEST_SKIP() << "LAZYMEM_PAGESERVER (the server binary) not set: run through meson test";
    binary_ = bin;
    ::signal(SIGPIPE, SIG_IGN);  // a restorer that died is reported, not written to until we die
  }
  std::string binary_;
};

TEST_F(ChaosTest, RestoresOutliveServersStoppedKilledRestartedAndTheSnapshotReplaced) {
  if (!kf_.has_uffd_feature(UFFD_FEATURE_SIGBUS)) GTEST_SKIP() << "userfaultfd lacks UFFD_FEATURE_SIGBUS";
  capture(16 * kMiB, 61);
  const std::vector<std::byte> first = expected_;
  SpawnedServer a(binary_, dir_.path()), b(binary_, dir_.path());
  a.start();
  b.start();
  if (HasFatalFailure()) return;
  const std::string both = fmt::format("lazymem://127.0.0.1:{},127.0.0.1:{}/snap", a.port(), b.port());

  std::vector<std::unique_ptr<Restorer>> rs;
  uint64_t seed = 1;
  auto restore = [&](bool on_thread, bool prefetch, const std::vector<std::byte>& expected) {
    RestoreOptions o;
    o.fault_on_thread = on_thread;
    o.prefetch = prefetch;
    o.fetch_attempts = 6;
    o.fault_deadline = std::chrono::seconds(10);  // a connection's slice of it: 10 s / 7, 1.4 s
    rs.push_back(std::make_unique<Restorer>(both, o, kf_, expected, seed++));
    ASSERT_TRUE(rs.back()->started());
  };
  for (bool on_thread : {false, true})
    for (bool prefetch : {false, true}) restore(on_thread, prefetch, first);
  if (HasFatalFailure()) return;

  // Each step: a change, then every restore touches its next share of pages while it holds
  // (`during`, if given, runs meanwhile).
  const uint32_t share = static_cast<uint32_t>(first.size() / kPage / 8);
  auto step = [&](const char* what, uint32_t pages, const std::function<void()>& during = {}) {
    for (auto& r : rs) r->ask(pages);
    if (during) during();
    for (size_t i = 0; i < rs.size(); ++i) ASSERT_EQ(rs[i]->answer(), "") << what << ", restore " << i;
  };

  step("both servers up: restores read from the first", share);
  if (HasFatalFailure()) return;
  a.stop();  // it accepts and acknowledges, and says nothing: given up on after a slice, not the deadline
  step("first stopped", share);
  a.resume();
  if (HasFatalFailure()) return;
  b.kill();  // restores on the second lose it and go back to the first
  step("second killed", share);
  if (HasFatalFailure()) return;
  b.start();
  if (HasFatalFailure()) return;
  // Another version under the name: the running restores keep theirs (the first server holds it
  // for them; the second, restarted, never opened it and refuses it), a new restore gets the new one.
  capture(16 * kMiB, 62);
  const std::vector<std::byte> second = expected_;
  restore(true, false, second);
  restore(false, false, second);
  if (HasFatalFailure()) return;
  step("snapshot replaced, second restarted", share);
  if (HasFatalFailure()) return;
  // The first stops until the restores have given up on it and gone to the second, which refuses
  // them the old version: they come back to the first, which answers once it runs again.
  auto refusals = [&] {
    auto js = net::server_stats_json(*SnapshotLocation::parse(fmt::format("lazymem://127.0.0.1:{}/x", b.port())), "",
                                     std::chrono::steady_clock::now() + std::chrono::seconds(5));
    return js.ok() ? nlohmann::json::parse(*js).value("errors_not_found", uint64_t{0}) : 0;
  };
  const uint64_t before = refusals();
  a.stop();
  step("first stopped again, second refusing the old version", share, [&] {
    // Both prefetch-less restores of the old version (engine, faulting thread) are refused.
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (refusals() < before + 2 && std::chrono::steady_clock::now() < until) std::this_thread::yield();
    EXPECT_GE(refusals(), before + 2) << "no restore went to the second server and was refused there";
    a.resume();
  });
  if (HasFatalFailure()) return;
  b.kill();
  step("second killed again", share);
  if (HasFatalFailure()) return;
  b.start();
  if (HasFatalFailure()) return;
  step("both up: the rest, and finish", Restorer::kFinish);
}

}  // namespace
}  // namespace lazymem
