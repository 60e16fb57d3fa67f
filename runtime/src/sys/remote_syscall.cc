// RemoteSyscalls: ptrace, a saved register set, and a `syscall` instruction of the vDSO.
#include "sys/remote_syscall.h"

#include <fmt/format.h>
#include <signal.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "sys/cgroup_freeze.h"

namespace lazymem::sys {

#if defined(__x86_64__)

namespace {

using Clock = std::chrono::steady_clock;
constexpr unsigned long long kUserCs64 = 0x33;  // the code segment of 64-bit user mode

// The threads of `pid` to borrow, best first: those that will stop at once (not in
// uninterruptible sleep), the main thread first among them. Not those exiting (state Z or X), nor
// io_uring's workers (kernel threads in its group, which cannot be traced).
std::vector<pid_t> live_threads(pid_t pid) {
  struct Thread {
    pid_t tid;
    bool sleeping_hard;
  };
  std::vector<Thread> found;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(fmt::format("/proc/{}/task", pid), ec)) {
    pid_t tid = 0;
    try {
      tid = static_cast<pid_t>(std::stol(e.path().filename().string()));
    } catch (const std::exception&) {
      continue;
    }
    std::ifstream stat(e.path() / "stat");
    std::string line;
    std::getline(stat, line);
    const size_t open = line.find('('), close = line.rfind(')');
    if (open == std::string::npos || close == std::string::npos || close + 2 >= line.size()) continue;
    const char state = line[close + 2];
    const std::string name = line.substr(open + 1, close - open - 1);
    if (state == 'Z' || state == 'X' || name.rfind("iou-", 0) == 0) continue;
    found.push_back({tid, state == 'D'});
  }
  std::sort(found.begin(), found.end(), [pid](const Thread& a, const Thread& b) {
    if (a.sleeping_hard != b.sleeping_hard) return !a.sleeping_hard;
    if ((a.tid == pid) != (b.tid == pid)) return a.tid == pid;
    return a.tid < b.tid;
  });
  std::vector<pid_t> out;
  for (const Thread& t : found) out.push_back(t.tid);
  return out;
}

// The process's seccomp mode (Seccomp: in /proc/PID/status): 0 none, 1 strict, 2 filters.
int seccomp_mode(pid_t pid) {
  std::ifstream status(fmt::format("/proc/{}/status", pid));
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("Seccomp:", 0) == 0) return std::atoi(line.c_str() + 8);
  }
  return 0;
}

// Waits for tracee `tid` to stop; its wait status.
Result<int> wait_stopped(pid_t tid, std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  auto pause = std::chrono::microseconds(20);
  for (;;) {
    int st = 0;
    const pid_t r = ::waitpid(tid, &st, __WALL | WNOHANG);
    if (r == tid) {
      if (WIFSTOPPED(st)) return st;
      return Error(Errc::kNotFound, fmt::format("thread {} exited while stopped for a remote syscall", tid));
    }
    if (r < 0 && errno != EINTR) return sys_error(fmt::format("waiting for thread {} to stop", tid), errno);
    if (Clock::now() >= deadline) {
      return Error(Errc::kTimeout, fmt::format("thread {} did not stop within {} ms (in uninterruptible sleep: "
                                               "state D in /proc/{}/stat?)",
                                               tid, timeout.count(), tid));
    }
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::microseconds(2000));
  }
}

// A signal-delivery stop (the thread about to take a signal; the stop our interrupt or a single
// step's trap causes is an event stop, or a SIGTRAP delivery): its signal, else 0.
int signal_delivery_stop(int status) { return (status >> 16) == 0 ? WSTOPSIG(status) : 0; }

// The address of a `syscall` instruction (0f 05) in the process's vDSO: any occurrence of those
// two bytes executes as one, aligned or not.
Result<uintptr_t> find_syscall_instruction(pid_t pid) {
  std::ifstream maps(fmt::format("/proc/{}/maps", pid));
  for (std::string line; std::getline(maps, line);) {
    if (line.find("[vdso]") == std::string::npos) continue;
    uintptr_t start = 0, end = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx", &start, &end) != 2 || end <= start || end - start > (1u << 20)) break;
    std::vector<unsigned char> text(end - start);
    iovec local{text.data(), text.size()};
    iovec remote{reinterpret_cast<void*>(start), text.size()};
    if (::process_vm_readv(pid, &local, 1, &remote, 1, 0) != static_cast<ssize_t>(text.size())) {
      return sys_error(fmt::format("reading the vDSO of process {}", pid), errno);
    }
    static constexpr unsigned char kSyscall[] = {0x0f, 0x05};
    auto at = std::search(text.begin(), text.end(), std::begin(kSyscall), std::end(kSyscall));
    if (at != text.end()) return start + static_cast<uintptr_t>(at - text.begin());
    break;
  }
  return Error(Errc::kUnsupported, fmt::format("process {} has no vDSO with a syscall instruction to borrow "
                                               "(booted with vdso=0?)",
                                               pid));
}

}  // namespace

struct RemoteSyscalls::Impl {
  pid_t pid = 0;
  pid_t tid = 0;
  user_regs_struct saved{};
  uint64_t saved_mask = 0;   // the thread's signal mask: all blocked while we use it
  bool mask_set = false;
  siginfo_t taken{};         // a signal the thread was about to take when it stopped: it still gets it,
  int taken_signal = 0;      // with its siginfo (sender, value) intact
  bool restop = false;       // SIGSTOP arrived meanwhile (it cannot be blocked): sent again after
  uintptr_t syscall_at = 0;
  bool stopped = false;  // seized and in a ptrace stop: detach puts the registers back first
  std::chrono::milliseconds timeout{5000};

  ~Impl() {
    if (!stopped) return;
    // Nothing to report from here: if the thread died, there is nobody to give anything back to.
    (void)::ptrace(PTRACE_SETREGS, tid, nullptr, &saved);
    if (mask_set) (void)::ptrace(PTRACE_SETSIGMASK, tid, reinterpret_cast<void*>(sizeof saved_mask), &saved_mask);
    // Detaching from a signal-delivery stop (the first one, or our last single step's SIGTRAP)
    // delivers the signal given, with the siginfo set here.
    if (taken_signal != 0) (void)::ptrace(PTRACE_SETSIGINFO, tid, nullptr, &taken);
    (void)::ptrace(PTRACE_DETACH, tid, nullptr, reinterpret_cast<void*>(static_cast<uintptr_t>(taken_signal)));
    if (restop) (void)::kill(pid, SIGSTOP);
  }
};

RemoteSyscalls::RemoteSyscalls(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
RemoteSyscalls::RemoteSyscalls(RemoteSyscalls&& o) noexcept = default;
RemoteSyscalls::~RemoteSyscalls() = default;
pid_t RemoteSyscalls::pid() const { return impl_->pid; }

Result<RemoteSyscalls> RemoteSyscalls::attach(pid_t pid, std::chrono::milliseconds timeout) {
  if (pid <= 0) return Error(Errc::kInvalidArgument, fmt::format("no process {}", pid));
  const std::vector<pid_t> threads = live_threads(pid);
  if (threads.empty()) return Error(Errc::kNotFound, fmt::format("no process {} (or it is exiting)", pid));
  // A frozen cgroup's thread stops for a tracer but does not run the call until thawed: said
  // now, not after a timeout.
  if (auto cgroup = cgroup_of(pid); cgroup.ok()) {
    if (auto frozen = cgroup_frozen(*cgroup); frozen.ok() && *frozen) {
      return Error(Errc::kInvalidArgument,
                   fmt::format("process {} is frozen (cgroup {}): it must run while its tracking is set up; thaw it "
                               "(echo 0 > cgroup.freeze, there or in the cgroup above it that was frozen). A live "
                               "capture or migration pauses it for the last round itself",
                               pid, *cgroup));
    }
  }
  auto impl = std::make_unique<Impl>();
  impl->pid = pid;
  impl->timeout = timeout;
  // With the process's seccomp filters suspended while it is traced (root: CAP_SYS_ADMIN), so
  // that a filter refusing userfaultfd(2) neither fails the call nor kills the process.
  bool seccomp_suspended = true;
  for (pid_t tid : threads) {
    long r = ::ptrace(PTRACE_SEIZE, tid, nullptr, reinterpret_cast<void*>(uintptr_t{PTRACE_O_SUSPEND_SECCOMP}));
    if (r != 0 && errno == EPERM) {
      seccomp_suspended = false;
      r = ::ptrace(PTRACE_SEIZE, tid, nullptr, nullptr);
    }
    if (r != 0) {
      if (errno == ESRCH) continue;  // that thread exited meanwhile: try the next
      if (errno == EPERM) {
        return Error(Errc::kPermission,
                     fmt::format("not allowed to ptrace process {}: run as root (or as its owner with "
                                 "kernel.yama.ptrace_scope=0), and not while a debugger or strace traces it",
                                 pid),
                     EPERM);
      }
      return sys_error(fmt::format("ptrace(PTRACE_SEIZE) of thread {} of process {}", tid, pid), errno);
    }
    impl->tid = tid;
    break;
  }
  if (impl->tid == 0) return Error(Errc::kNotFound, fmt::format("process {} exited", pid));
  if (::ptrace(PTRACE_INTERRUPT, impl->tid, nullptr, nullptr) != 0) {
    return sys_error(fmt::format("ptrace(PTRACE_INTERRUPT) of thread {}", impl->tid), errno);
  }
  // Not stopped yet: a seized thread that is running cannot be detached. It is detached when the
  // thread that seized it exits (sys::Uffd::open_in runs all this on a thread of its own).
  LAZYMEM_ASSIGN_OR_RETURN(int st, wait_stopped(impl->tid, timeout));
  impl->stopped = true;
  if (int sig = signal_delivery_stop(st); sig != 0) {
    // Already taken off the queue: keep it, siginfo and all, for the detach to deliver.
    if (::ptrace(PTRACE_GETSIGINFO, impl->tid, nullptr, &impl->taken) == 0) impl->taken_signal = sig;
  }
  // Every signal blocked while we use the thread: one arriving stays queued for it instead of
  // being taken (and lost) at a single step. SIGKILL and SIGSTOP cannot be blocked.
  if (::ptrace(PTRACE_GETSIGMASK, impl->tid, reinterpret_cast<void*>(sizeof impl->saved_mask), &impl->saved_mask) != 0) {
    return sys_error(fmt::format("ptrace(PTRACE_GETSIGMASK) of thread {}", impl->tid), errno);
  }
  const uint64_t all = ~uint64_t{0};
  if (::ptrace(PTRACE_SETSIGMASK, impl->tid, reinterpret_cast<void*>(sizeof all), &all) != 0) {
    return sys_error(fmt::format("ptrace(PTRACE_SETSIGMASK) of thread {}", impl->tid), errno);
  }
  impl->mask_set = true;
  if (!seccomp_suspended && seccomp_mode(pid) != 0) {
    return Error(Errc::kPermission,
                 fmt::format("process {} runs under seccomp, which may refuse userfaultfd(2) or kill it for trying; "
                             "its filters can be suspended for the call only with CAP_SYS_ADMIN: run the agent as root",
                             pid));
  }
  if (::ptrace(PTRACE_GETREGS, impl->tid, nullptr, &impl->saved) != 0) {
    return sys_error(fmt::format("ptrace(PTRACE_GETREGS) of thread {}", impl->tid), errno);
  }
  if (impl->saved.cs != kUserCs64) {
    return Error(Errc::kUnsupported, fmt::format("process {} runs 32-bit code: only 64-bit processes are supported", pid));
  }
  LAZYMEM_ASSIGN_OR_RETURN(impl->syscall_at, find_syscall_instruction(pid));
  return RemoteSyscalls(std::move(impl));
}

Result<long> RemoteSyscalls::call(long nr, long a1, long a2, long a3, long a4, long a5, long a6) {
  Impl& im = *impl_;
  user_regs_struct regs = im.saved;
  regs.rax = static_cast<unsigned long long>(nr);
  // Not inside a syscall as far as the kernel's restart logic goes: the call the thread was
  // interrupted in is restarted from the saved registers, not folded into ours.
  regs.orig_rax = static_cast<unsigned long long>(-1);
  regs.rdi = static_cast<unsigned long long>(a1);
  regs.rsi = static_cast<unsigned long long>(a2);
  regs.rdx = static_cast<unsigned long long>(a3);
  regs.r10 = static_cast<unsigned long long>(a4);
  regs.r8 = static_cast<unsigned long long>(a5);
  regs.r9 = static_cast<unsigned long long>(a6);
  regs.rip = im.syscall_at;
  if (::ptrace(PTRACE_SETREGS, im.tid, nullptr, &regs) != 0) {
    return sys_error(fmt::format("ptrace(PTRACE_SETREGS) of thread {}", im.tid), errno);
  }
  // One step runs the instruction. A stop before it (an event stop still pending from our
  // interrupt, or a restarted call that rewound to it) steps again.
  for (int attempt = 0; attempt < 16; ++attempt) {
    if (::ptrace(PTRACE_SINGLESTEP, im.tid, nullptr, nullptr) != 0) {
      return sys_error(fmt::format("ptrace(PTRACE_SINGLESTEP) of thread {}", im.tid), errno);
    }
    auto st = wait_stopped(im.tid, im.timeout);
    if (!st.ok()) {
      im.stopped = false;  // gone, or running somewhere we did not send it
      return std::move(st).error().wrap(fmt::format("remote syscall {} in process {}", nr, im.pid));
    }
    const int sig = signal_delivery_stop(*st);
    if (sig == SIGSYS) {
      // A seccomp filter trapped the call (it was not made): the signal is ours, not delivered.
      return Error(Errc::kPermission, fmt::format("a seccomp filter of process {} refused syscall {}", im.pid, nr));
    }
    if (sig == SIGSTOP) im.restop = true;  // the only signal that gets through the mask
    if (::ptrace(PTRACE_GETREGS, im.tid, nullptr, &regs) != 0) {
      return sys_error(fmt::format("ptrace(PTRACE_GETREGS) of thread {}", im.tid), errno);
    }
    if (regs.rip == im.syscall_at + 2) return static_cast<long>(regs.rax);
    if (regs.rip != im.syscall_at) {
      return Error(Errc::kIo, fmt::format("remote syscall {} in process {}: the thread went to {:#x}, not "
                                          "past the syscall instruction at {:#x}",
                                          nr, im.pid, regs.rip, im.syscall_at));
    }
  }
  return Error(Errc::kTimeout, fmt::format("remote syscall {} in process {}: interrupted 16 times in a row", nr, im.pid));
}

#else  // !__x86_64__

struct RemoteSyscalls::Impl {};
RemoteSyscalls::RemoteSyscalls(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
RemoteSyscalls::RemoteSyscalls(RemoteSyscalls&& o) noexcept = default;
RemoteSyscalls::~RemoteSyscalls() = default;
pid_t RemoteSyscalls::pid() const { return 0; }
Result<RemoteSyscalls> RemoteSyscalls::attach(pid_t, std::chrono::milliseconds) {
  return Error(Errc::kUnsupported, "remote syscalls (another process's userfaultfd) are built for x86_64 only");
}
Result<long> RemoteSyscalls::call(long, long, long, long, long, long, long) {
  return Error(Errc::kUnsupported, "remote syscalls are built for x86_64 only");
}

#endif

Result<UniqueFd> take_fd(pid_t pid, int fd) {
  UniqueFd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  if (!pidfd.valid()) return sys_error(fmt::format("pidfd_open of process {}", pid), errno);
  UniqueFd taken(static_cast<int>(::syscall(SYS_pidfd_getfd, pidfd.get(), fd, 0)));
  if (!taken.valid()) return sys_error(fmt::format("pidfd_getfd of descriptor {} of process {}", fd, pid), errno);
  return taken;
}

}  // namespace lazymem::sys
