// RemoteSyscalls: has another process make system calls of our choosing, as CRIU's parasite
// does, but without loading code into it: one of its threads is stopped with ptrace, its
// registers saved, then set up for the call and stepped over a `syscall` instruction of its
// vDSO. Its registers and signal mask are put back before it goes on. What it can see: a system
// call it was blocked in returns as after a signal that has no handler — restarted where the
// kernel restarts such calls (read, write, wait...), EINTR where it never does (epoll_wait,
// semop, sigtimedwait: POSIX allows it, and callers loop). Signals that arrive meanwhile are held
// (all blocked), one it was already taking is delivered after, with its siginfo. Its seccomp
// filters are suspended for the calls (root), so that one refusing a call cannot kill it.
//
// What the agent needs it for: a userfaultfd of a process that does not link liblazymem, to
// track its dirty pages (UFFD_FEATURE_WP_ASYNC needs a uffd of the tracked mm, and only the
// process itself can open one). x86_64 processes only.
//
// Needs ptrace rights over the process (root, or its owner with kernel.yama.ptrace_scope 0 or 1
// as its ancestor) and none of its threads traced already (a debugger, strace).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <memory>

#include "lazymem/result.h"
#include "sys/unique_fd.h"

namespace lazymem::sys {

// Every call, the destructor included, from the thread that attached: ptrace binds a tracee to
// the tracer thread. When that thread exits, the kernel detaches whatever it still traces (a
// thread that never stopped, after attach() timed out): run it on a thread of its own.
class RemoteSyscalls {
 public:
  // Stops one thread of `pid` (the first that is alive, the main thread first). Waits at most
  // `timeout` for it to stop (a thread in uninterruptible sleep stops only when it wakes).
  static Result<RemoteSyscalls> attach(pid_t pid, std::chrono::milliseconds timeout = std::chrono::seconds(5));
  // Puts the thread's registers back and lets it go on (a signal that arrived meanwhile is
  // delivered to it then).
  ~RemoteSyscalls();
  RemoteSyscalls(RemoteSyscalls&& o) noexcept;
  RemoteSyscalls& operator=(RemoteSyscalls&&) = delete;

  // Runs syscall `nr` in the process: its return value as the kernel gives it (-errno on failure).
  // An error only when the call could not be made (the process died, ptrace refused).
  Result<long> call(long nr, long a1 = 0, long a2 = 0, long a3 = 0, long a4 = 0, long a5 = 0, long a6 = 0);

  pid_t pid() const;

  struct Impl;

 private:
  explicit RemoteSyscalls(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// A duplicate, here, of descriptor `fd` of process `pid` (pidfd_getfd, Linux 5.6; close-on-exec).
Result<UniqueFd> take_fd(pid_t pid, int fd);

}  // namespace lazymem::sys
