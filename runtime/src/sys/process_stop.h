// Stopping another process for the pause of a live capture or migration of its memory: SIGSTOP,
// then waiting until every one of its threads has stopped (a signal is only a request: a thread
// in the middle of a system call stops when it leaves it, and may write memory until then).
#pragma once

#include <sys/types.h>

#include <chrono>

#include "lazymem/result.h"

namespace lazymem::sys {

// Sends SIGSTOP to `pid` and waits until each of its threads is stopped (or exiting). If one is
// not within `timeout` (in uninterruptible sleep, an io_uring worker, which never stops, or
// stopped by a tracer, which may resume it), the process is continued and the error names that
// thread. True if this stopped it; false if every thread was stopped already (nothing sent:
// its owner stopped it, and continuing it is theirs to do).
//
// Its parent sees the stop and the continue (SIGCHLD, waitpid with WUNTRACED/WCONTINUED), as
// with any job-control stop.
Result<bool> stop_process(pid_t pid, std::chrono::milliseconds timeout);
// That every thread of `pid` is stopped still (or exiting): else an error naming one that runs
// (something continued the process).
Status check_stopped(pid_t pid);
// Sends SIGCONT.
void continue_process(pid_t pid);

}  // namespace lazymem::sys
