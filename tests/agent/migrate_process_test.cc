// Migrating a process that does not link liblazymem: the agent makes it open a userfaultfd
// (ptrace, vDSO syscall), tracks its dirty pages through it, pre-copies while it runs, stops it
// with SIGSTOP (or freezes its cgroup) and serves what it wrote since from a copy. The destination (this process)
// restores from the agent with the pre-copy as base, and every byte is compared with the
// stopped process's memory.
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/inotify.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "../common/huge_pages.h"
#include "../common/run_cli.h"
#include "../common/test_data.h"
#include "lazymem/dirty.h"
#include "lazymem/kernel_features.h"
#include "lazymem/migrate.h"
#include "lazymem/restore.h"
#include "sys/cgroup_freeze.h"
#include "sys/process_maps.h"
#include "sys/unique_fd.h"

namespace lazymem {
namespace {

using testing::run_cli;
using testing::ScratchDir;
constexpr size_t kPage = 4096;

std::string env_or_empty(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

char process_state(pid_t pid) {
  std::ifstream in(fmt::format("/proc/{}/stat", pid));
  std::string line;
  std::getline(in, line);
  const size_t close = line.rfind(')');
  return close == std::string::npos || close + 2 >= line.size() ? '?' : line[close + 2];
}

// How many of the process's descriptors are userfaultfds.
int userfaultfds_of(pid_t pid) {
  int n = 0;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(fmt::format("/proc/{}/fd", pid), ec)) {
    if (std::filesystem::read_symlink(e.path(), ec).string().find("userfaultfd") != std::string::npos) ++n;
  }
  return n;
}

// The process whose command line holds `part` (arguments separated by NULs, as in
// /proc/PID/cmdline), or -1.
pid_t pid_of_command(const std::string& part) {
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/proc", ec)) {
    const std::string name = e.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream in(e.path() / "cmdline");
    const std::string cmdline((std::istreambuf_iterator<char>(in)), {});
    if (cmdline.find(part) != std::string::npos) return std::stoi(name);
  }
  return -1;
}

// Waits until the file at `path` holds `text` (a line a command writes there as it goes), for
// at most `timeout_ms`: woken by inotify whenever a file in its directory is written.
bool wait_for_text(const std::string& path, const std::string& text, int timeout_ms = 20000) {
  const sys::UniqueFd watch(::inotify_init1(IN_CLOEXEC));
  if (!watch.valid() ||
      ::inotify_add_watch(watch.get(), std::filesystem::path(path).parent_path().c_str(), IN_CREATE | IN_MODIFY) < 0) {
    return false;
  }
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    std::ifstream in(path);
    if (std::string(std::istreambuf_iterator<char>(in), {}).find(text) != std::string::npos) return true;
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - std::chrono::steady_clock::now());
    pollfd p{watch.get(), POLLIN, 0};
    if (left.count() <= 0 || ::poll(&p, 1, static_cast<int>(left.count())) <= 0) return false;
    char events[4096];
    (void)!::read(watch.get(), events, sizeof events);
  }
}

std::vector<std::byte> read_memory(pid_t pid, uintptr_t at, size_t len) {
  std::vector<std::byte> out(len);
  iovec local{out.data(), len};
  iovec remote{reinterpret_cast<void*>(at), len};
  if (::process_vm_readv(pid, &local, 1, &remote, 1, 0) != static_cast<ssize_t>(len)) out.clear();
  return out;
}


void skip_unless_possible(const KernelFeatures& kf) {
#if !defined(__x86_64__)
  GTEST_SKIP() << "remote syscalls are built for x86_64 only";
#endif
  if (::geteuid() != 0) GTEST_SKIP() << "needs root (ptrace of another process)";
  if (!kf.uffd_usable) GTEST_SKIP() << "userfaultfd unusable: " << kf.uffd_error;
  if (!kf.has_dirty_tracking()) GTEST_SKIP() << "dirty tracking needs Linux 5.13 (userfaultfd write-protect faults)";
}

// A forked child that does as it is told, one command at a time, blocked in read() between
// them (so that the ptrace stop lands in a system call, which must be restarted unharmed):
// 'w' + page: adds 1 to its byte 100; 'v' + page + value: stores the value (4 bytes) at byte
// 100; 'k' + page: read()s a page from the data pipe into it (a write by the kernel); 's':
// answers with the SIGRTMIN count it took as sent (sigqueue, value 42) and the count of others,
// 4 bytes each. Each is acknowledged with one byte. Its memory: `pages` pages at `at`, filled.
// `seccomp_kill`: a seccomp filter kills it if it calls userfaultfd(2).
volatile sig_atomic_t g_signals_right = 0, g_signals_wrong = 0;  // the child's
int g_signal_taken_fd = -1;  // the child's: one byte written per signal taken

void count_signal(int, siginfo_t* info, void*) {
  if (info->si_code == SI_QUEUE && info->si_value.sival_int == 42) g_signals_right = g_signals_right + 1;
  else g_signals_wrong = g_signals_wrong + 1;
  (void)!::write(g_signal_taken_fd, "s", 1);
}

class Obedient {
 public:
  static constexpr size_t kPages = 16;

  explicit Obedient(uintptr_t at, size_t pages = kPages, bool seccomp_kill = false) : at_(at), pages_(pages) {
    int cmd[2], ack[2], data[2], taken[2];
    if (::pipe(cmd) != 0 || ::pipe(ack) != 0 || ::pipe(data) != 0 || ::pipe2(taken, O_NONBLOCK) != 0) return;
    pid_ = ::fork();
    if (pid_ == 0) {
      struct sigaction sa{};
      g_signal_taken_fd = taken[1];
      sa.sa_sigaction = count_signal;
      sa.sa_flags = SA_SIGINFO | SA_RESTART;
      if (::sigaction(SIGRTMIN, &sa, nullptr) != 0) _exit(7);
      if (seccomp_kill) {
        sock_filter filter[] = {
            BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
            BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_userfaultfd, 0, 1),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        };
        sock_fprog prog{static_cast<unsigned short>(std::size(filter)), filter};
        if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || ::prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0) {
          _exit(8);
        }
      }
      auto* m = static_cast<char*>(::mmap(reinterpret_cast<void*>(at), pages * kPage, PROT_READ | PROT_WRITE,
                                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0));
      if (m == MAP_FAILED) _exit(3);
      std::memset(m, 1, pages * kPage);
      for (;;) {
        char c[9];
        if (::read(cmd[0], c, 9) != 9) _exit(0);
        uint32_t index;
        std::memcpy(&index, c + 1, 4);
        if (index >= pages) _exit(6);
        char* page = m + size_t{index} * kPage;
        if (c[0] == 's') {
          const uint32_t counts[2] = {static_cast<uint32_t>(g_signals_right), static_cast<uint32_t>(g_signals_wrong)};
          if (::write(ack[1], counts, sizeof counts) != sizeof counts) _exit(5);
        }
        if (c[0] == 'w') ++page[100];
        if (c[0] == 'v') std::memcpy(page + 100, c + 5, 4);
        if (c[0] == 'k') {
          for (size_t got = 0; got < kPage;) {
            ssize_t n = ::read(data[0], page + got, kPage - got);
            if (n <= 0) _exit(4);
            got += static_cast<size_t>(n);
          }
        }
        if (::write(ack[1], "a", 1) != 1) _exit(5);
      }
    }
    ::close(cmd[0]);
    ::close(ack[1]);
    ::close(data[0]);
    ::close(taken[1]);
    taken_ = taken[0];
    cmd_ = cmd[1];
    ack_ = ack[0];
    data_ = data[1];
  }
  ~Obedient() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    for (int fd : {cmd_, ack_, data_, taken_}) if (fd >= 0) ::close(fd);
  }

  // Sends one command and waits for its acknowledgement; false if the child is gone or broken.
  bool order(char what, uint32_t page, const std::vector<std::byte>& data = {}, uint32_t value = 0) {
    char c[9] = {what};
    std::memcpy(c + 1, &page, 4);
    std::memcpy(c + 5, &value, 4);
    if (::write(cmd_, c, 9) != 9) return false;
    if (!data.empty() && ::write(data_, data.data(), data.size()) != static_cast<ssize_t>(data.size())) return false;
    char a = 0;
    return ::read(ack_, &a, 1) == 1 && a == 'a';
  }
  // The child's signal counts ('s'): taken as sent, and others.
  std::pair<uint32_t, uint32_t> signals() {
    const char c[9] = {'s'};
    uint32_t counts[2] = {};
    char a = 0;
    if (::write(cmd_, c, 9) != 9 || ::read(ack_, counts, sizeof counts) != sizeof counts || ::read(ack_, &a, 1) != 1) {
      return {~0u, ~0u};
    }
    return {counts[0], counts[1]};
  }
  // Waits until the child has taken a signal (its handler ran), at most `timeout_ms`.
  bool signal_taken(int timeout_ms) {
    pollfd p{taken_, POLLIN, 0};
    char c = 0;
    return ::poll(&p, 1, timeout_ms) == 1 && ::read(taken_, &c, 1) == 1;
  }
  pid_t pid() const { return pid_; }
  AddressRange range() const { return {at_, pages_ * kPage}; }

 private:
  uintptr_t at_;
  size_t pages_;
  pid_t pid_ = -1;
  int cmd_ = -1, ack_ = -1, data_ = -1, taken_ = -1;
};

// A forked child, killed and reaped when the test ends however it ends.
struct KilledOnExit {
  pid_t pid;  // <= 0: reaped already
  ~KilledOnExit() {
    if (pid <= 0) return;
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
  }
};

// A cgroup (v2) made for a test, for --freeze; removed when destroyed, which must be after the
// processes in it are gone.
class TestCgroup {
 public:
  TestCgroup() = default;
  TestCgroup(const TestCgroup&) = delete;
  TestCgroup& operator=(const TestCgroup&) = delete;
  ~TestCgroup() {
    if (!dir_.empty()) ::rmdir(dir_.c_str());
  }
  // Makes it (the first time) and moves `pid` into it. Returns why it could not (the test is
  // then skipped), or "".
  std::string add(pid_t pid) {
    if (dir_.empty()) {
      auto mount = sys::cgroup2_mount_point();
      if (!mount.ok()) return mount.error().message();
      static int made = 0;
      const std::string dir = fmt::format("{}/lazymem-test-{}-{}", *mount, ::getpid(), ++made);
      ::rmdir(dir.c_str());  // left by a run that crashed, whose pid this one has
      if (::mkdir(dir.c_str(), 0755) != 0) return fmt::format("cannot make a cgroup ({}): {}", dir, std::strerror(errno));
      dir_ = dir;
    }
    std::ofstream(dir_ + "/cgroup.procs") << pid << "\n";
    if (file("cgroup.procs").find(fmt::format("{}\n", pid)) == std::string::npos) return "cannot move a process into " + dir_;
    return "";
  }
  const std::string& dir() const { return dir_; }
  std::string file(const std::string& name) const {
    std::ifstream in(dir_ + "/" + name);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }

 private:
  std::string dir_;
};

class MigrateProcessTest : public ::testing::Test {
 protected:
  void SetUp() override {
    kf_ = probe_kernel();
    skip_unless_possible(kf_);
  }
  KernelFeatures kf_;
  ScratchDir dir_;
};

// The tracker opens its uffd inside the other process, which goes on unharmed (its blocked
// read() restarted, no descriptor left behind), and sees its writes: user-mode and the kernel's.
TEST_F(MigrateProcessTest, TracksTheDirtyPagesOfAnotherProcess) {
  const auto at = reinterpret_cast<uintptr_t>(testing::map_for_capture(Obedient::kPages * kPage, 61));
  ASSERT_NE(at, 0u);
  ::munmap(reinterpret_cast<void*>(at), Obedient::kPages * kPage);
  Obedient child(at);
  ASSERT_GT(child.pid(), 0);
  ASSERT_TRUE(child.order('w', 0));  // mapped and running
  {
    auto t = DirtyTracker::start({child.range()}, kf_, {.pid = child.pid(), .uffd = -1});
    ASSERT_TRUE(t.ok()) << t.error().message();
    EXPECT_EQ(userfaultfds_of(child.pid()), 0) << "the uffd opened in the process was left open there";
    auto none = (*t)->collect();
    ASSERT_TRUE(none.ok()) << none.error().message();
    EXPECT_TRUE(none->empty()) << "pages reported written before any write";

    ASSERT_TRUE(child.order('w', 3)) << "the child broke after the remote syscalls";
    auto one = (*t)->collect();
    ASSERT_TRUE(one.ok()) << one.error().message();
    ASSERT_EQ(one->size(), 1u);
    EXPECT_EQ((*one)[0], (AddressRange{at + 3 * kPage, kPage}));

    std::vector<std::byte> data(kPage);
    for (size_t i = 0; i < kPage; ++i) data[i] = static_cast<std::byte>(i * 7 + 1);
    ASSERT_TRUE(child.order('k', 9, data));
    auto kernel = (*t)->collect();
    ASSERT_TRUE(kernel.ok()) << kernel.error().message();
    ASSERT_EQ(kernel->size(), 1u) << "a write by the kernel (read() into the page) was not seen";
    EXPECT_EQ((*kernel)[0], (AddressRange{at + 9 * kPage, kPage}));
    EXPECT_EQ(read_memory(child.pid(), at + 9 * kPage, kPage), data);
    auto again = (*t)->collect();
    ASSERT_TRUE(again.ok());
    EXPECT_TRUE(again->empty());
  }
  // Tracking over: the process goes on, and its memory is as it wrote it.
  ASSERT_TRUE(child.order('w', 3));
  auto page3 = read_memory(child.pid(), at + 3 * kPage, kPage);
  ASSERT_EQ(page3.size(), kPage);
  EXPECT_EQ(static_cast<int>(page3[100]), 3);  // 1 from the fill, and two writes
  EXPECT_EQ(process_state(child.pid()), 'S');
}

// Signals sent to the process while the agent borrows one of its threads arrive, each once, with
// the sender's siginfo: none is taken (and lost) by a single step, none re-sent as the agent's.
TEST_F(MigrateProcessTest, SignalsSentMeanwhileArriveIntact) {
#if defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "ThreadSanitizer's runtime holds a signal for its handler as one pending flag: a stream of "
                  "them is coalesced there, so the child's count cannot be checked";
#endif
  const auto at = reinterpret_cast<uintptr_t>(testing::map_for_capture(Obedient::kPages * kPage, 65));
  ASSERT_NE(at, 0u);
  ::munmap(reinterpret_cast<void*>(at), Obedient::kPages * kPage);
  Obedient child(at);
  ASSERT_TRUE(child.order('w', 0));
  std::atomic<bool> done{false};
  std::atomic<uint32_t> sent{0}, refused{0}, lost{0};
  std::thread sender([&] {
    // One at a time, each sent once the last was taken: a queue kept full would exhaust the
    // user's RLIMIT_SIGPENDING, which every process of that user (other tests' timers) draws on.
    while (!done.load()) {
      if (::sigqueue(child.pid(), SIGRTMIN, sigval{.sival_int = 42}) != 0) {
        ++refused;
        break;
      }
      ++sent;
      if (!child.signal_taken(5000)) ++lost;  // held for a remote call takes milliseconds, not seconds
    }
  });
  for (int i = 0; i < 300; ++i) {
    auto t = DirtyTracker::start({child.range()}, kf_, {.pid = child.pid(), .uffd = -1});
    if (!t.ok()) {
      ADD_FAILURE() << "start " << i << ": " << t.error().message();
      break;
    }
  }
  done = true;
  sender.join();
  ASSERT_GT(sent.load(), 0u);
  EXPECT_EQ(refused.load(), 0u) << "the signal queue filled up";
  EXPECT_EQ(lost.load(), 0u) << "signals never taken";
  const std::pair<uint32_t, uint32_t> got = child.signals();
  EXPECT_EQ(got.first, sent.load()) << "signals lost";
  EXPECT_EQ(got.second, 0u) << "signals delivered with a siginfo not the sender's";
}

// A process whose seccomp filter kills it for calling userfaultfd(2) is tracked all the same
// (its filters are suspended for the agent's call, which needs root) and lives on.
TEST_F(MigrateProcessTest, SeccompFilterNeitherStopsNorKillsIt) {
  const auto at = reinterpret_cast<uintptr_t>(testing::map_for_capture(Obedient::kPages * kPage, 66));
  ASSERT_NE(at, 0u);
  ::munmap(reinterpret_cast<void*>(at), Obedient::kPages * kPage);
  Obedient child(at, Obedient::kPages, /*seccomp_kill=*/true);
  ASSERT_TRUE(child.order('w', 0));
  {
    auto t = DirtyTracker::start({child.range()}, kf_, {.pid = child.pid(), .uffd = -1});
    ASSERT_TRUE(t.ok()) << t.error().message();
    ASSERT_TRUE(child.order('w', 5)) << "the process died";
    auto written = (*t)->collect();
    ASSERT_TRUE(written.ok()) << written.error().message();
    ASSERT_EQ(written->size(), 1u);
    EXPECT_EQ((*written)[0], (AddressRange{at + 5 * kPage, kPage}));
  }
  EXPECT_TRUE(child.order('w', 6)) << "the process died";
}

// A process its owner stopped stays stopped after a live capture (nothing sent to it).
TEST_F(MigrateProcessTest, AStoppedProcessIsLeftStopped) {
  const std::string agent = env_or_empty("LAZYMEM_AGENT");
  ASSERT_FALSE(agent.empty()) << "LAZYMEM_AGENT must be set (meson test)";
  const auto at = reinterpret_cast<uintptr_t>(testing::map_for_capture(Obedient::kPages * kPage, 67));
  ASSERT_NE(at, 0u);
  ::munmap(reinterpret_cast<void*>(at), Obedient::kPages * kPage);
  Obedient child(at);
  ASSERT_TRUE(child.order('w', 0));
  ASSERT_EQ(::kill(child.pid(), SIGSTOP), 0);
  siginfo_t si{};  // its parent is told once it has stopped
  ASSERT_EQ(::waitid(P_PID, static_cast<id_t>(child.pid()), &si, WSTOPPED), 0);
  ASSERT_EQ(process_state(child.pid()), 'T');
  auto [out, rc] = run_cli(fmt::format("{} snapshot --pid {} --live --region {:x}-{:x}=heap {}/stopped", agent,
                                       child.pid(), at, at + Obedient::kPages * kPage, dir_.path()));
  EXPECT_EQ(rc, 0) << out;
  EXPECT_EQ(process_state(child.pid()), 'T') << "continued by the capture: its owner had stopped it";
  ::kill(child.pid(), SIGCONT);
  EXPECT_TRUE(child.order('w', 1));
}

// A process whose main thread sleeps uninterruptibly (in vfork(), waiting for its child): another
// of its threads is borrowed, at once, rather than the main thread waited for until the timeout.
TEST_F(MigrateProcessTest, BorrowsAThreadThatCanStop) {
  const auto at = reinterpret_cast<uintptr_t>(testing::map_for_capture(Obedient::kPages * kPage, 68));
  ASSERT_NE(at, 0u);
  ::munmap(reinterpret_cast<void*>(at), Obedient::kPages * kPage);
  int cmd[2], ack[2], vforked[2];
  ASSERT_EQ(::pipe(cmd), 0);
  ASSERT_EQ(::pipe(ack), 0);
  ASSERT_EQ(::pipe(vforked), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    auto* m = static_cast<char*>(::mmap(reinterpret_cast<void*>(at), Obedient::kPages * kPage, PROT_READ | PROT_WRITE,
                                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0));
    if (m == MAP_FAILED) _exit(3);
    std::thread([&] {
      for (char page; ::read(cmd[0], &page, 1) == 1;) {
        ++m[size_t(page) * kPage];
        if (::write(ack[1], "a", 1) != 1) _exit(5);
      }
      _exit(0);
    }).detach();
    for (;;) {
      // The main thread waits for its vfork()ed child, in state D, two seconds at a time. The
      // child says it runs: its parent is then in vfork(), on its way into that wait.
      if (::vfork() == 0) {
        (void)!::write(vforked[1], "v", 1);
        const timespec two{2, 0};
        ::nanosleep(&two, nullptr);
        _exit(0);
      }
    }
  }
  const KilledOnExit reap{child};
  auto order = [&](char page) {
    char a = 0;
    return ::write(cmd[1], &page, 1) == 1 && ::read(ack[0], &a, 1) == 1;
  };
  ASSERT_TRUE(order(0));
  char v = 0;
  ASSERT_EQ(::read(vforked[0], &v, 1), 1) << "the main thread never vfork()ed";
  // From the child's start to the parent's sleep is a few instructions of its vfork(): given
  // the CPU, it is there (the wait itself has no event).
  for (int i = 0; i < 10000 && process_state(child) != 'D'; ++i) ::sched_yield();
  ASSERT_EQ(process_state(child), 'D') << "the main thread is not in uninterruptible sleep";
  const auto started = std::chrono::steady_clock::now();
  auto t = DirtyTracker::start({{at, Obedient::kPages * kPage}}, kf_, {.pid = child, .uffd = -1});
  ASSERT_TRUE(t.ok()) << t.error().message();
  EXPECT_LT(std::chrono::steady_clock::now() - started, std::chrono::seconds(1)) << "the main thread was waited for";
  ASSERT_TRUE(order(3));
  auto written = (*t)->collect();
  ASSERT_TRUE(written.ok()) << written.error().message();
  ASSERT_EQ(written->size(), 1u);
  EXPECT_EQ((*written)[0], (AddressRange{at + 3 * kPage, kPage}));
}

TEST_F(MigrateProcessTest, RefusesRangesTheProcessDoesNotMap) {
  const auto at = reinterpret_cast<uintptr_t>(testing::map_for_capture(Obedient::kPages * kPage, 62));
  ASSERT_NE(at, 0u);
  ::munmap(reinterpret_cast<void*>(at), Obedient::kPages * kPage);
  Obedient child(at);
  ASSERT_TRUE(child.order('w', 0));
  AddressRange beyond{at, 2 * Obedient::kPages * kPage};
  auto t = DirtyTracker::start({beyond}, kf_, {.pid = child.pid(), .uffd = -1});
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.error().message().find("is not mapped in process"), std::string::npos) << t.error().message();
  EXPECT_TRUE(child.order('w', 1)) << "the process was harmed by a refused start";
  auto gone = DirtyTracker::start({child.range()}, kf_, {.pid = 999999999, .uffd = -1});
  ASSERT_FALSE(gone.ok());
}


// `lazymem-agent snapshot --pid --live` while the process writes: a thread of this test has it
// write one page after another (user-mode stores and read()s by the kernel, each numbered, each
// acknowledged before the next) all through the capture. The snapshot must be one moment of
// that sequence: with S the latest write it shows, every page as the writes up to S left it
// (a write the tracking missed shows as a page older than that). Every byte is compared.
// `snapshot --pid` stops the process while its memory is copied: a Ctrl-C then is held until it
// is resumed, and only then ends the agent; the process is never left stopped.
TEST_F(MigrateProcessTest, SnapshotHoldsCtrlCUntilTheProcessGoesOn) {
  const std::string agent = env_or_empty("LAZYMEM_AGENT");
  ASSERT_FALSE(agent.empty()) << "LAZYMEM_AGENT must be set (meson test)";
  constexpr size_t kLen = 512u << 20;  // a copy long enough to be interrupted in
  const auto at = reinterpret_cast<uintptr_t>(testing::map_for_capture(kLen, 70));
  ASSERT_NE(at, 0u);
  ::munmap(reinterpret_cast<void*>(at), kLen);
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    void* m = ::mmap(reinterpret_cast<void*>(at), kLen, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (m == MAP_FAILED) _exit(3);
    std::memset(m, 0x5a, kLen);
    if (::write(ready[1], "r", 1) != 1) _exit(4);
    for (;;) ::pause();
  }
  const KilledOnExit reap{pid};
  ::close(ready[1]);
  char r = 0;
  ASSERT_EQ(::read(ready[0], &r, 1), 1) << "the child did not start";
  ::close(ready[0]);
  const std::string pid_arg = std::to_string(pid), region = fmt::format("{:x}-{:x}=heap", at, at + kLen),
                    target = dir_.path() + "/held";
  const pid_t agent_pid = ::fork();
  ASSERT_GE(agent_pid, 0);
  if (agent_pid == 0) {
    const int null = ::open("/dev/null", O_WRONLY);
    ::dup2(null, STDOUT_FILENO);
    ::dup2(null, STDERR_FILENO);
    ::execl(agent.c_str(), agent.c_str(), "snapshot", "--pid", pid_arg.c_str(), "--region", region.c_str(),
            target.c_str(), nullptr);
    _exit(127);
  }
  KilledOnExit reap_agent{agent_pid};
  // Both are this test's children: the next of them to report is the process stopped by the
  // agent, or the agent ended (left to be reaped below).
  siginfo_t si{};
  ASSERT_EQ(::waitid(P_ALL, 0, &si, WSTOPPED | WEXITED | WNOWAIT), 0) << std::strerror(errno);
  ASSERT_EQ(si.si_pid, pid) << "the agent ended before it stopped the process";
  ASSERT_EQ(si.si_code, CLD_STOPPED);
  ASSERT_EQ(process_state(pid), 'T') << "the agent never stopped the process";
  ASSERT_EQ(::kill(agent_pid, SIGINT), 0);
  int status = 0;
  ASSERT_EQ(::waitpid(agent_pid, &status, 0), agent_pid);
  reap_agent.pid = 0;
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGINT) << "the agent was not ended by the Ctrl-C: "
                                                                    << status;
  EXPECT_NE(process_state(pid), 'T') << "left stopped";
  EXPECT_FALSE(std::filesystem::exists(dir_.path() + "/held")) << "a snapshot was committed";
}

class LiveSnapshotTest : public MigrateProcessTest, public ::testing::WithParamInterface<bool> {};

// With GetParam(), paused by freezing its cgroup (--freeze) rather than SIGSTOP; without, its
// writes tracked by write faults (--tracking write-faults, as before Linux 6.7).
TEST_P(LiveSnapshotTest, OfARunningProcessIsOneCut) {
  const bool freeze = GetParam();
  const std::string agent = env_or_empty("LAZYMEM_AGENT");
  ASSERT_FALSE(agent.empty()) << "LAZYMEM_AGENT must be set (meson test)";
  TestCgroup cgroup;  // destroyed after the child
  constexpr size_t kPages = 16384;  // 64 MiB: a capture long enough to write during
  constexpr size_t kAt = 100;       // where each write puts its number
  const auto at = reinterpret_cast<uintptr_t>(testing::map_for_capture(kPages * kPage, 64));
  ASSERT_NE(at, 0u);
  ::munmap(reinterpret_cast<void*>(at), kPages * kPage);
  Obedient child(at, kPages);
  ASSERT_TRUE(child.order('v', 0, {}, 0));  // running (and page 0 holds "number 0")
  if (freeze) {
    if (const std::string why = cgroup.add(child.pid()); !why.empty()) GTEST_SKIP() << why;
  }
  struct Write {
    uint32_t page;
    bool kernel;
  };
  std::vector<Write> writes;  // writes[n - 1]: write number n
  std::atomic<bool> done{false};
  auto page_of_kernel_write = [](uint32_t n) {
    std::vector<std::byte> data(kPage, static_cast<std::byte>(n * 37));
    std::memcpy(data.data() + kAt, &n, 4);
    return data;
  };
  std::thread writer([&] {
    for (uint32_t x = 12345, n = 1; !done.load(); ++n) {
      x = x * 1103515245u + 12345u;
      const Write w{static_cast<uint32_t>((x >> 8) % kPages), x % 16 == 0};
      writes.push_back(w);
      if (!(w.kernel ? child.order('k', w.page, page_of_kernel_write(n)) : child.order('v', w.page, {}, n))) return;
    }
  });
  auto [out, rc] = run_cli(fmt::format("{} snapshot --pid {} --live {} --region {:x}-{:x}=heap {}/live --json", agent,
                                       child.pid(), freeze ? "--freeze" : "--tracking write-faults", at,
                                       at + kPages * kPage, dir_.path()));
  done = true;
  writer.join();
  ASSERT_EQ(rc, 0) << out;
  auto j = nlohmann::json::parse(out, nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << out;
  EXPECT_GE(j["rounds"].get<unsigned>(), 2u) << out;
  EXPECT_EQ(j["tracking"], freeze && kf_.has_dirty_marks() ? "kernel-marks" : "write-faults") << out;
  EXPECT_GT(j["superseded_bytes"].get<uint64_t>(), 0u) << "nothing was written during the capture: " << out;
  // Asserted: the order below would wait forever on a process left paused.
  ASSERT_NE(process_state(child.pid()), 'T') << "left stopped";
  if (freeze) {
    ASSERT_EQ(cgroup.file("cgroup.freeze"), "0\n") << "left frozen";
  }
  ASSERT_TRUE(child.order('w', 1)) << "the process broke";

  auto r = LazyRestore::start(dir_.path() + "/live", kf_, {});
  ASSERT_TRUE(r.ok()) << r.error().message();
  const auto* got = static_cast<const std::byte*>((*r)->region("heap")->address);
  uint32_t cut = 0;  // S
  for (size_t p = 0; p < kPages; ++p) {
    uint32_t n;
    std::memcpy(&n, got + p * kPage + kAt, 4);
    if (n != 0x01010101u) cut = std::max(cut, n);  // the fill, or a write's number
  }
  ASSERT_GT(cut, 0u);
  ASSERT_LE(cut, writes.size());
  std::vector<std::byte> want(kPages * kPage, std::byte{1});
  std::memset(want.data() + kAt, 0, 4);
  for (uint32_t n = 1; n <= cut; ++n) {
    std::byte* page = want.data() + size_t{writes[n - 1].page} * kPage;
    if (writes[n - 1].kernel) {
      const auto data = page_of_kernel_write(n);
      std::memcpy(page, data.data(), kPage);
    } else {
      std::memcpy(page + kAt, &n, 4);
    }
  }
  size_t bad = 0;
  for (size_t off = 0; off < want.size(); off += kPage) {
    if (std::memcmp(got + off, want.data() + off, kPage) != 0 && bad++ == 0) {
      ADD_FAILURE() << "page " << off / kPage << " is not as write " << cut << " left it";
    }
  }
  EXPECT_EQ(bad, 0u) << "pages differ, of " << kPages << "; the snapshot shows writes up to " << cut << " of "
                     << writes.size();
  ASSERT_TRUE((*r)->finish().ok());
  ::munmap(const_cast<std::byte*>(got), want.size());
}

// The pause waits for a thread in a system call that writes the memory: the child rewrites its
// whole region with one preadv() after another, from two files of different bytes. A signal or
// a freeze takes effect only when such a call returns, so the snapshot must hold one file's
// bytes throughout: a pause that returned before the call did would catch one half-done. Both
// snapshots: live (paused for the last round) and not (paused while its memory is copied).
TEST_P(LiveSnapshotTest, WaitsForASystemCallWritingTheMemory) {
  const bool freeze = GetParam();
  const std::string agent = env_or_empty("LAZYMEM_AGENT");
  ASSERT_FALSE(agent.empty()) << "LAZYMEM_AGENT must be set (meson test)";
  constexpr size_t kLen = 16u << 20;  // one preadv() of it takes milliseconds
  constexpr size_t kIovecs = 1024;
  const auto at = reinterpret_cast<uintptr_t>(testing::map_for_capture(kLen, 62));
  ASSERT_NE(at, 0u);
  ::munmap(reinterpret_cast<void*>(at), kLen);
  TestCgroup cgroup;  // destroyed after the child
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    int files[2];
    for (int i = 0; i < 2; ++i) {
      files[i] = ::memfd_create("pattern", 0);
      std::vector<char> bytes(kLen, static_cast<char>('a' + i));
      if (files[i] < 0 || ::pwrite(files[i], bytes.data(), kLen, 0) != static_cast<ssize_t>(kLen)) _exit(2);
    }
    auto* m = static_cast<char*>(::mmap(reinterpret_cast<void*>(at), kLen, PROT_READ | PROT_WRITE,
                                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0));
    if (m == MAP_FAILED) _exit(3);
    // From the top down: a copy of the region taken from the bottom up while a call is under
    // way meets its front, wherever that is, and holds both files' bytes.
    std::vector<iovec> iov(kIovecs);
    for (size_t i = 0; i < kIovecs; ++i) iov[i] = {m + kLen - (i + 1) * (kLen / kIovecs), kLen / kIovecs};
    if (::write(ready[1], "r", 1) != 1) _exit(4);
    for (unsigned n = 0;; ++n) {
      if (::preadv(files[n % 2], iov.data(), kIovecs, 0) != static_cast<ssize_t>(kLen)) _exit(5);
    }
  }
  ::close(ready[1]);
  char r = 0;
  const bool started = ::read(ready[0], &r, 1) == 1;
  ::close(ready[0]);
  const KilledOnExit reap{pid};
  ASSERT_TRUE(started) << "the child did not start";
  if (freeze) {
    if (const std::string why = cgroup.add(pid); !why.empty()) GTEST_SKIP() << why;
  }
  // Live (paused for the last round) and not (paused while it is copied).
  for (const std::string mode : {"--live", ""}) {
    SCOPED_TRACE("snapshot " + mode);
    const std::string name = dir_.path() + (mode.empty() ? "/paused" : "/live");
    auto [out, rc] = run_cli(fmt::format("{} snapshot --pid {} {} {} --region {:x}-{:x}=heap {} --json", agent, pid,
                                         mode, freeze ? "--freeze" : "", at, at + kLen, name));
    ASSERT_EQ(rc, 0) << out;
    EXPECT_NE(process_state(pid), 'T') << "left stopped";
    if (freeze) {
      EXPECT_EQ(cgroup.file("cgroup.freeze"), "0\n") << "left frozen";
    }

    auto restored = LazyRestore::start(name, kf_, {});
    ASSERT_TRUE(restored.ok()) << restored.error().message();
    const auto* got = static_cast<const char*>((*restored)->region("heap")->address);
    const std::vector<char> want(kLen, got[0]);
    EXPECT_TRUE(got[0] == 'a' || got[0] == 'b') << int{got[0]};
    size_t other = 0;
    for (size_t off = 0; off < kLen; off += kPage) {
      if (std::memcmp(got + off, want.data() + off, kPage) != 0) ++other;
    }
    EXPECT_EQ(other, 0u) << "pages of " << kLen / kPage << " not as the page at 0 (" << got[0]
                         << "): the pause caught a preadv() half-done";
    ASSERT_TRUE((*restored)->finish().ok());
    ::munmap(const_cast<char*>(got), kLen);
  }
}

// Continued (SIGCONT) or thawed by someone during the pause — here by app_state, which runs in
// it — the capture fails rather than store what may be torn.
TEST_P(LiveSnapshotTest, FailsIfThePauseIsUndoneMeanwhile) {
  const bool freeze = GetParam();
  const size_t len = Obedient::kPages * kPage;
  const auto at = reinterpret_cast<uintptr_t>(testing::map_for_capture(len, 69));
  ASSERT_NE(at, 0u);
  ::munmap(reinterpret_cast<void*>(at), len);
  TestCgroup cgroup;  // destroyed after the child
  Obedient child(at);
  ASSERT_TRUE(child.order('w', 0));
  if (freeze) {
    if (const std::string why = cgroup.add(child.pid()); !why.empty()) GTEST_SKIP() << why;
  }
  LiveCaptureOptions live;
  live.pid = child.pid();
  live.freeze_cgroup = freeze;
  live.app_state = [&] {
    if (freeze) std::ofstream(cgroup.dir() + "/cgroup.freeze") << "0\n";
    else ::kill(child.pid(), SIGCONT);
    return std::vector<std::byte>{};
  };
  const CaptureRegion heap{"heap", reinterpret_cast<const void*>(at), len, PROT_READ | PROT_WRITE};
  const char* undone = freeze ? "was thawed during the pause" : "was continued during the pause";
  auto r = capture_regions_live(dir_.path() + "/undone", std::span(&heap, 1), {}, live, kf_);
  ASSERT_FALSE(r.ok()) << "stored what was read from a process that ran meanwhile";
  EXPECT_NE(r.error().message().find(undone), std::string::npos) << r.error().message();
  EXPECT_FALSE(std::filesystem::exists(dir_.path() + "/undone"));
  ASSERT_NE(process_state(child.pid()), 'T');
  ASSERT_TRUE(child.order('w', 1)) << "the process broke";

  // A migration's switch-over: not served.
  MigrationOptions mo;
  mo.precopy = live;
  mo.listen = "127.0.0.1:0";
  auto src = MigrationSource::start(dir_.path() + "/base", std::span(&heap, 1), {}, mo, kf_);
  ASSERT_FALSE(src.ok()) << "served what was read from a process that ran meanwhile";
  EXPECT_NE(src.error().message().find(undone), std::string::npos) << src.error().message();
  ASSERT_NE(process_state(child.pid()), 'T');
  EXPECT_TRUE(child.order('w', 2)) << "the process broke";
}

INSTANTIATE_TEST_SUITE_P(Pause, LiveSnapshotTest, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "Frozen" : "Stopped"; });

// The CLI end to end: lazymem-agent migrate --pid of a process writing without pause.
class MigrateCliTest : public MigrateProcessTest {
 protected:
  static constexpr size_t kLen = 64u << 20;

  void SetUp() override {
    MigrateProcessTest::SetUp();
    if (IsSkipped()) return;
    agent_ = env_or_empty("LAZYMEM_AGENT");
    writer_ = env_or_empty("LAZYMEM_BUSY_WRITER");
    ASSERT_FALSE(agent_.empty() || writer_.empty()) << "LAZYMEM_AGENT and LAZYMEM_BUSY_WRITER must be set (meson test)";
    // An address free here (the destination maps it) and in the agent (its copy goes there).
    at_ = reinterpret_cast<uintptr_t>(testing::map_for_capture(kLen, 63));
    ASSERT_NE(at_, 0u);
    ::munmap(reinterpret_cast<void*>(at_), kLen);
    int out[2];
    ASSERT_EQ(::pipe(out), 0);
    pid_ = ::fork();
    ASSERT_GE(pid_, 0);
    if (pid_ == 0) {
      ::dup2(out[1], STDOUT_FILENO);
      const std::string addr = fmt::format("{:x}", at_), mib = std::to_string(kLen >> 20);
      ::execl(writer_.c_str(), writer_.c_str(), addr.c_str(), mib.c_str(), huge_ ? "huge" : nullptr, nullptr);
      _exit(127);
    }
    ::close(out[1]);
    char ready[6] = {};
    ASSERT_EQ(::read(out[0], ready, 6), 6) << "the busy writer did not start";
    progress_.reset(out[0]);  // then "w" as it goes (kept open: the writer must not get EPIPE)
    ASSERT_EQ(::fcntl(out[0], F_SETFL, O_NONBLOCK), 0);
  }
  void TearDown() override {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }

  // The agent's --json report once the destination has everything: some chunks written after
  // the last round were served from the agent's copy, most came from the pre-copy (no more than
  // `most` from the copy); and the process was killed (the destination runs it now).
  void expect_killed_after_postcopy(FILE* agent, uint64_t most = kLen / kDefaultChunkSize / 2) {
    const std::string report = rest_of(agent);
    ASSERT_EQ(exit_code(agent), 0) << report << stderr_text();
    auto j = nlohmann::json::parse(report, nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << report;
    EXPECT_GT(j["postcopy_chunks"].get<uint64_t>(), 0u) << report;
    EXPECT_LT(j["postcopy_chunks"].get<uint64_t>(), most) << report;
    EXPECT_TRUE(j["destination_said_complete"].get<bool>()) << report;
    EXPECT_EQ(j["process"], "killed");
    int status = 0;
    ASSERT_EQ(::waitpid(pid_, &status, 0), pid_);
    pid_ = -1;
    EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << status;
  }

  // Restores from `source` (with the pre-copy as base) and compares every byte with `memory`.
  void expect_destination_holds(const std::string& source, const std::vector<std::byte>& memory) {
    RestoreOptions ro;
    ro.base = dir_.path() + "/mig";
    auto r = LazyRestore::start(source, kf_, ro);
    ASSERT_TRUE(r.ok()) << r.error().message();
    const auto* got = static_cast<const std::byte*>((*r)->region("heap")->address);
    ASSERT_EQ(reinterpret_cast<uintptr_t>(got), at_);
    for (size_t off = 0; off < kLen; off += kPage) {
      ASSERT_EQ(std::memcmp(got + off, memory.data() + off, kPage), 0) << "page at offset " << off << " differs";
    }
    auto vmas = sys::read_vmas(0, true);
    ASSERT_TRUE(vmas.ok());
    EXPECT_EQ(sys::coverage(*vmas, at_, at_ + kLen).page_size, huge_ ? testing::kHugePage : kPage)
        << "restored on pages of another size than the process had";
    ASSERT_TRUE((*r)->finish().ok());
    ::munmap(const_cast<std::byte*>(got), kLen);
  }

  // Starts `lazymem-agent migrate` for the writer; its stdout is read line by line.
  FILE* start_migrate(const std::string& extra) {
    const std::string cmd = fmt::format("{} migrate --pid {} --region {:x}-{:x}=heap --base {}/mig {} 2>{}/err",
                                        agent_, pid_, at_, at_ + kLen, dir_.path(), extra, dir_.path());
    return ::popen(cmd.c_str(), "r");
  }
  std::string stderr_text() const {
    std::ifstream in(dir_.path() + "/err");
    return std::string(std::istreambuf_iterator<char>(in), {});
  }
  // The location the agent prints once the destination may restore ("source: URI"), or "".
  std::string source_of(FILE* agent) const {
    char line[512] = {};
    if (std::fgets(line, sizeof line, agent) == nullptr) return "";
    const std::string text(line);
    if (text.rfind("source: lazymem://", 0) != 0 || text.back() != '\n') return "";
    return text.substr(8, text.size() - 9);
  }
  static std::string rest_of(FILE* p) {
    std::string out;
    char buf[4096];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
    return out;
  }
  static int exit_code(FILE* p) {
    const int st = ::pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
  }

  std::string agent_, writer_;
  bool huge_ = false;  // the writer's memory on 2 MiB huge pages
  uintptr_t at_ = 0;
  pid_t pid_ = -1;
  sys::UniqueFd progress_;  // the writer's stdout past "ready" (non-blocking)
  TestCgroup cgroup_;  // for --freeze; removed after TearDown has killed the writer
};

// The writer's memory on huge pages: tracked by the kernel's marks (a written huge page whole),
// and the destination restores it onto huge pages again, every byte as the stop left it.
class MigrateHugePagesCliTest : public MigrateCliTest {
 protected:
  void SetUp() override {
    huge_ = true;
    pages_ = std::make_unique<testing::HugePages>(2 * kLen / testing::kHugePage);  // the writer's, the destination's
    if (!pages_->unavailable().empty()) GTEST_SKIP() << pages_->unavailable();
    MigrateCliTest::SetUp();
  }
  std::unique_ptr<testing::HugePages> pages_;
};

TEST_F(MigrateHugePagesCliTest, DestinationHoldsItOnHugePages) {
  if (!kf_.has_dirty_marks()) GTEST_SKIP() << "huge-page memory is tracked by the kernel's marks only (Linux 6.7)";
  FILE* agent = start_migrate("--json --postcopy-timeout-sec 120");
  ASSERT_NE(agent, nullptr);
  const std::string source = source_of(agent);
  ASSERT_FALSE(source.empty()) << stderr_text();
  const std::vector<std::byte> stopped = read_memory(pid_, at_, kLen);
  ASSERT_EQ(stopped.size(), kLen);
  expect_destination_holds(source, stopped);
  if (HasFatalFailure()) return;
  // The writer's scattered writes dirty most huge pages of the first half every round: pre-copy
  // does not converge at 2 MiB, and more is left for post-copy than with 4 KiB pages.
  expect_killed_after_postcopy(agent, kLen / kDefaultChunkSize);
}

// The writer runs three threads: two write, one is blocked in read(); all are stopped.
TEST_F(MigrateCliTest, DestinationHoldsTheProcessMemoryAsTheStopLeftIt) {
  FILE* agent = start_migrate("--json --postcopy-timeout-sec 120");
  ASSERT_NE(agent, nullptr);
  const std::string source = source_of(agent);
  ASSERT_FALSE(source.empty()) << stderr_text();
  EXPECT_EQ(process_state(pid_), 'T') << "the process runs on while its memory is served elsewhere";
  const std::vector<std::byte> stopped = read_memory(pid_, at_, kLen);
  ASSERT_EQ(stopped.size(), kLen);
  expect_destination_holds(source, stopped);
  if (HasFatalFailure()) return;

  expect_killed_after_postcopy(agent);
}

// Its writes tracked by write faults (as before Linux 6.7), said so in the report.
TEST_F(MigrateCliTest, LeaveStoppedLeavesItStopped) {
  FILE* agent = start_migrate("--leave-stopped --tracking write-faults --postcopy-timeout-sec 120");
  ASSERT_NE(agent, nullptr);
  const std::string source = source_of(agent);
  ASSERT_FALSE(source.empty()) << stderr_text();
  RestoreOptions ro;
  ro.base = dir_.path() + "/mig";
  auto r = LazyRestore::start(source, kf_, ro);
  ASSERT_TRUE(r.ok()) << r.error().message();
  ASSERT_TRUE((*r)->wait_complete(std::chrono::seconds(60)).ok());
  ASSERT_TRUE((*r)->finish().ok());
  ::munmap((*r)->region("heap")->address, kLen);
  r->reset();
  const std::string report = rest_of(agent);
  ASSERT_EQ(exit_code(agent), 0) << report << stderr_text();
  EXPECT_NE(report.find("left stopped"), std::string::npos) << report;
  EXPECT_NE(stderr_text().find("writes tracked by write-faults"), std::string::npos) << stderr_text();
  EXPECT_EQ(process_state(pid_), 'T');
  EXPECT_EQ(userfaultfds_of(pid_), 0);
}

// --freeze: the writer, in a cgroup of its own, is frozen instead of stopped. Its parent (this
// test) sees no stop, the destination holds its memory as the freeze left it, and after the
// post-copy it is killed and its cgroup thawed.
TEST_F(MigrateCliTest, FrozenNotStoppedItsParentSeesNothing) {
  if (const std::string why = cgroup_.add(pid_); !why.empty()) GTEST_SKIP() << why;
  FILE* agent = start_migrate("--freeze --json --postcopy-timeout-sec 120");
  ASSERT_NE(agent, nullptr);
  const std::string source = source_of(agent);
  ASSERT_FALSE(source.empty()) << stderr_text();
  EXPECT_NE(cgroup_.file("cgroup.events").find("frozen 1"), std::string::npos) << cgroup_.file("cgroup.events");
  EXPECT_NE(process_state(pid_), 'T') << "stopped with SIGSTOP, not frozen";
  siginfo_t si{};
  ASSERT_EQ(::waitid(P_PID, static_cast<id_t>(pid_), &si, WSTOPPED | WNOHANG | WNOWAIT), 0);
  EXPECT_EQ(si.si_pid, 0) << "its parent was told of a stop";
  const std::vector<std::byte> frozen = read_memory(pid_, at_, kLen);
  ASSERT_EQ(frozen.size(), kLen);
  expect_destination_holds(source, frozen);
  if (HasFatalFailure()) return;

  expect_killed_after_postcopy(agent);
  if (HasFatalFailure()) return;
  EXPECT_EQ(cgroup_.file("cgroup.freeze"), "0\n") << "its cgroup was left frozen";
}

// --freeze with another process in the cgroup: refused before anything is done.
TEST_F(MigrateCliTest, FreezeRefusesACgroupItShares) {
  if (const std::string why = cgroup_.add(pid_); !why.empty()) GTEST_SKIP() << why;
  const pid_t other = ::fork();
  ASSERT_GE(other, 0);
  if (other == 0) {
    ::pause();
    _exit(0);
  }
  const KilledOnExit reap{other};  // before the cgroup is removed
  ASSERT_EQ(cgroup_.add(other), "");
  auto [out, rc] = run_cli(fmt::format("{} migrate --freeze --pid {} --region {:x}-{:x}=heap --base {}/mig", agent_,
                                       pid_, at_, at_ + kLen, dir_.path()));
  EXPECT_EQ(rc, 1) << out;
  EXPECT_NE(out.find(fmt::format("holds processes other than {} ({})", pid_, other)), std::string::npos) << out;
  EXPECT_FALSE(std::filesystem::exists(dir_.path() + "/mig")) << "something was stored";
  EXPECT_EQ(cgroup_.file("cgroup.freeze"), "0\n");
  EXPECT_EQ(userfaultfds_of(pid_), 0);
}

// A process frozen by its owner cannot be made to open a uffd (its threads do not stop for a
// tracer): refused at once with what to do, not after a timeout, and left frozen.
TEST_F(MigrateCliTest, RefusesAFrozenProcessAtOnce) {
  if (const std::string why = cgroup_.add(pid_); !why.empty()) GTEST_SKIP() << why;
  auto frozen = sys::freeze_cgroup(cgroup_.dir(), pid_, std::chrono::seconds(5));  // waits for "frozen 1"
  ASSERT_TRUE(frozen.ok()) << frozen.error().message();
  auto [out, rc] = run_cli(fmt::format("{} migrate --freeze --pid {} --region {:x}-{:x}=heap --base {}/mig", agent_,
                                       pid_, at_, at_ + kLen, dir_.path()));
  EXPECT_EQ(rc, 1) << out;
  EXPECT_NE(out.find(fmt::format("process {} is frozen (cgroup {})", pid_, cgroup_.dir())), std::string::npos) << out;
  EXPECT_FALSE(std::filesystem::exists(dir_.path() + "/mig")) << "something was stored";
  EXPECT_EQ(cgroup_.file("cgroup.freeze"), "1\n") << "thawed";
}

// Ctrl-C while no destination has come: the migration is called off and the process resumed.
TEST_F(MigrateCliTest, InterruptedWhileWaitingCallsItOff) {
  FILE* agent = start_migrate("--postcopy-timeout-sec 120");
  ASSERT_NE(agent, nullptr);
  ASSERT_FALSE(source_of(agent).empty()) << stderr_text();
  ASSERT_EQ(process_state(pid_), 'T');
  using namespace std::string_literals;
  const pid_t agent_pid = pid_of_command("migrate\0--pid\0"s + std::to_string(pid_) + "\0"s);
  ASSERT_GT(agent_pid, 0) << "the agent's process was not found";
  ASSERT_EQ(::kill(agent_pid, SIGINT), 0);
  const std::string out = rest_of(agent);
  EXPECT_EQ(exit_code(agent), 1) << out << stderr_text();
  EXPECT_NE(stderr_text().find("interrupted"), std::string::npos) << stderr_text();
  EXPECT_NE(stderr_text().find(fmt::format("migration called off, process {} continued here", pid_)), std::string::npos)
      << stderr_text();
  EXPECT_NE(process_state(pid_), 'T') << "the process was left stopped";
  EXPECT_EQ(userfaultfds_of(pid_), 0);
}

// Ctrl-C during the pre-copy: it stops before the pause; the process is never stopped and
// nothing is committed.
TEST_F(MigrateCliTest, InterruptedDuringPrecopyNeverStopsIt) {
  // The writer rewrites all 64 MiB nonstop: the pre-copy runs every round it is allowed.
  FILE* agent = start_migrate("--max-rounds 1000 --converged-mib 0");
  ASSERT_NE(agent, nullptr);
  // Its first pass over the memory done (signals blocked since the start), rounds follow.
  ASSERT_TRUE(wait_for_text(dir_.path() + "/err", "pre-copy pass 1: 64.0 MiB stored")) << stderr_text();
  using namespace std::string_literals;
  const pid_t agent_pid = pid_of_command("migrate\0--pid\0"s + std::to_string(pid_) + "\0"s);
  ASSERT_GT(agent_pid, 0) << "the agent's process was not found";
  ASSERT_EQ(::kill(agent_pid, SIGINT), 0);
  const std::string out = rest_of(agent);
  EXPECT_EQ(exit_code(agent), 1) << out << stderr_text();
  EXPECT_NE(stderr_text().find("cancelled before the pause"), std::string::npos) << stderr_text();
  EXPECT_EQ(out.find("source:"), std::string::npos) << out;
  siginfo_t si{};
  ASSERT_EQ(::waitid(P_PID, static_cast<id_t>(pid_), &si, WSTOPPED | WCONTINUED | WNOHANG | WNOWAIT), 0);
  EXPECT_EQ(si.si_pid, 0) << "it was stopped or continued";
  EXPECT_FALSE(std::filesystem::exists(dir_.path() + "/mig")) << "a pre-copy was committed";
  EXPECT_EQ(userfaultfds_of(pid_), 0);
}

// Ctrl-C once a destination restores from the agent: leaving would fail it, so the agent serves
// it to the end (every byte compared) and exits as usual.
TEST_F(MigrateCliTest, InterruptedWhileADestinationRestoresServesItToTheEnd) {
  FILE* agent = start_migrate("--json --postcopy-timeout-sec 120");
  ASSERT_NE(agent, nullptr);
  const std::string source = source_of(agent);
  ASSERT_FALSE(source.empty()) << stderr_text();
  const std::vector<std::byte> stopped = read_memory(pid_, at_, kLen);
  ASSERT_EQ(stopped.size(), kLen);
  RestoreOptions ro;
  ro.base = dir_.path() + "/mig";
  ro.prefetch = false;  // nothing is fetched until touched: the agent cannot be done before the Ctrl-C
  auto r = LazyRestore::start(source, kf_, ro);
  ASSERT_TRUE(r.ok()) << r.error().message();
  using namespace std::string_literals;
  const pid_t agent_pid = pid_of_command("migrate\0--pid\0"s + std::to_string(pid_) + "\0"s);
  ASSERT_GT(agent_pid, 0) << "the agent's process was not found";
  ASSERT_EQ(::kill(agent_pid, SIGINT), 0);
  // Asserted: touching the pages with the agent gone would fail each after the fault deadline.
  ASSERT_TRUE(wait_for_text(dir_.path() + "/err", "serving it to the end")) << stderr_text();
  ASSERT_EQ(::kill(agent_pid, 0), 0) << "the agent left";
  const auto* got = static_cast<const std::byte*>((*r)->region("heap")->address);
  for (size_t off = 0; off < kLen; off += kPage) {
    ASSERT_EQ(std::memcmp(got + off, stopped.data() + off, kPage), 0) << "page at offset " << off << " differs";
  }
  ASSERT_TRUE((*r)->finish().ok());
  ::munmap(const_cast<std::byte*>(got), kLen);
  r->reset();
  expect_killed_after_postcopy(agent);
}

// No destination comes: the migration is called off and the process runs on, here.
TEST_F(MigrateCliTest, CalledOffWhenNoDestinationComes) {
  FILE* agent = start_migrate("--postcopy-timeout-sec 1");
  ASSERT_NE(agent, nullptr);
  const std::string out = rest_of(agent);
  EXPECT_EQ(exit_code(agent), 1) << out << stderr_text();
  EXPECT_NE(stderr_text().find("migration called off, process " + std::to_string(pid_) + " continued here"),
            std::string::npos)
      << stderr_text();
  EXPECT_NE(process_state(pid_), 'T') << "the process was left stopped";
  // The writer says "w" on its stdout every 2^20 writes to its hot set (kLen / 16): between two
  // said after this look, that set was written 2^20 - 1 times since.
  const auto before = read_memory(pid_, at_, kLen / 16);
  char w[256];
  while (::read(progress_.get(), w, sizeof w) > 0) {  // what it said before (non-blocking)
  }
  for (int said = 0; said < 2;) {
    pollfd p{progress_.get(), POLLIN, 0};
    ASSERT_EQ(::poll(&p, 1, 20000), 1) << "the process does not write any more";
    const ssize_t n = ::read(progress_.get(), w, sizeof w);
    ASSERT_GT(n, 0) << "the process does not write any more";
    said += static_cast<int>(n);
  }
  EXPECT_TRUE(read_memory(pid_, at_, kLen / 16) != before) << "the process does not write any more";
  EXPECT_EQ(userfaultfds_of(pid_), 0);
}

TEST_F(MigrateCliTest, RefusesAProcessThatIsNotThere) {
  auto [out, rc] = run_cli(fmt::format("{} migrate --pid 999999999 --region {:x}-{:x} --base {}/x", agent_, at_,
                                       at_ + kLen, dir_.path()));
  EXPECT_EQ(rc, 1) << out;
  EXPECT_NE(out.find("999999999"), std::string::npos) << out;
  EXPECT_FALSE(std::filesystem::exists(dir_.path() + "/x")) << "something was stored for a process that is not there";
}

}  // namespace
}  // namespace lazymem
