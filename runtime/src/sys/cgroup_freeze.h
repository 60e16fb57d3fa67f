// Pausing another process with the cgroup v2 freezer instead of SIGSTOP, for the pause of a live
// capture or migration of its memory. A frozen process is not told: its parent sees no stop and
// no continue (no SIGCHLD, nothing for waitpid's WUNTRACED), a supervisor does not react, and a
// thread in a system call is frozen when it leaves it, as with SIGSTOP. The cgroup must hold the
// process alone: everything in it is frozen.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <string>

#include "lazymem/result.h"

namespace lazymem::sys {

// Where this mount namespace has the cgroup2 filesystem mounted.
Result<std::string> cgroup2_mount_point();

// The cgroup v2 directory of `pid`: its "0::" entry in /proc/PID/cgroup, under this mount
// namespace's cgroup2 mount. An error says what is missing (no cgroup2 mount, the root cgroup,
// which cannot be frozen).
Result<std::string> cgroup_of(pid_t pid);

// That `dir` is a cgroup v2 directory that can be frozen and holds `pid` and nothing else: no
// other process, none in a cgroup below it. Else an error naming what else is there.
Status check_freezable_alone(const std::string& dir, pid_t pid);

// Whether `dir` is frozen now (by its own cgroup.freeze or an ancestor's).
Result<bool> cgroup_frozen(const std::string& dir);

// Freezes `dir` and waits until every thread in it is frozen. If that takes longer than
// `timeout` (a thread in uninterruptible sleep freezes only when it leaves it), the cgroup is
// thawed and the error says so. True if this froze it; false if it was frozen already (its owner
// froze it, and thawing it is theirs to do). `pid` is the process in it, to report its exit.
Result<bool> freeze_cgroup(const std::string& dir, pid_t pid, std::chrono::milliseconds timeout);
// That `dir` is frozen still: else an error (something thawed it).
Status check_frozen(const std::string& dir);
// Thaws `dir`.
void thaw_cgroup(const std::string& dir);

}  // namespace lazymem::sys
