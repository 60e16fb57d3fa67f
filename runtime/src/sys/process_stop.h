// Stopping another process for the pause of a live capture or migration of its memory: SIGSTOP,
// then waiting until every one of its threads has stopped (a signal is only a request: a thread
// in the middle of a system call stops when it leaves it, and may write memory until then).
#pragma once

#include <sys/types.h>

#include <chrono>

#include "lazymem/result.h"

namespace lazymem::sys {

// Sends SIGSTOP to `pid` and waits until each of its threads is stopped (or exiting). If one is
// not within `timeout` (in uninterruptible sleep, or a kernel io_uring worker, which never
// stops), the process is continued and the error names that thread.
Status stop_process(pid_t pid, std::chrono::milliseconds timeout);
// Sends SIGCONT.
void continue_process(pid_t pid);

}  // namespace lazymem::sys
