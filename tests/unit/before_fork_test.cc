// sys::BeforeFork: which hooks fork() runs first, and where.
#include "sys/before_fork.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>

namespace lazymem {
namespace {

// The child's exit status (-1 if it did not exit).
int wait_for(pid_t pid) {
  int status = 0;
  if (pid < 0 || ::waitpid(pid, &status, 0) != pid || !WIFEXITED(status)) return -1;
  return WEXITSTATUS(status);
}

// Forks (fork(): the atfork handlers run) and waits for `child`.
int fork_and_wait(int (*child)()) {
  const pid_t pid = ::fork();
  if (pid == 0) _exit(child());
  return wait_for(pid);
}

// The same with a raw clone(), which runs no atfork handler.
int clone_and_wait(int (*child)()) {
  const pid_t pid = static_cast<pid_t>(::syscall(SYS_clone, SIGCHLD, nullptr, nullptr, nullptr, nullptr));
  if (pid == 0) _exit(child());
  return wait_for(pid);
}

std::atomic<int> g_first{0}, g_second{0};

// fork() runs the live hooks first, in the parent; a destroyed handle's hook no longer runs, a
// moved one's still does, and a child starts with none of its parent's.
TEST(BeforeForkTest, RunsTheLiveHooksInTheParentOnly) {
  sys::BeforeFork first([] { ++g_first; });
  {
    sys::BeforeFork second([] { ++g_second; });
    EXPECT_EQ(fork_and_wait([] { return 0; }), 0);
    EXPECT_EQ(g_first.load(), 1);
    EXPECT_EQ(g_second.load(), 1);
  }
  sys::BeforeFork moved = std::move(first);
  // The child forks too: had it kept the parent's hooks, its g_first would count that fork.
  EXPECT_EQ(fork_and_wait([] { return fork_and_wait([] { return 0; }) == 0 && g_first.load() == 2 ? 0 : 1; }), 0);
  EXPECT_EQ(g_first.load(), 2);
  EXPECT_EQ(g_second.load(), 1);
  // A child made by a raw clone() ran no atfork handler, so it holds a copy of the parent's
  // hooks: its own fork() must not run them (a restore's hook would wait for good on threads
  // the child does not have).
  EXPECT_EQ(clone_and_wait([] { return fork_and_wait([] { return 0; }) == 0 && g_first.load() == 2 ? 0 : 1; }), 0);
  EXPECT_EQ(g_first.load(), 2);
  moved.reset();
  EXPECT_EQ(fork_and_wait([] { return 0; }), 0);
  EXPECT_EQ(g_first.load(), 2);
}

}  // namespace
}  // namespace lazymem
