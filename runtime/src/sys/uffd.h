// Uffd: an owned userfaultfd with its negotiated features, and the ioctls the fault engine uses.
//
// Thread-safety: the ioctls (copy, zeropage, wake, poison, register) may be called from any
// thread at once; reading events is done by one thread.
#pragma once

#include <linux/userfaultfd.h>
#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <span>

#include "lazymem/result.h"
#include "sys/unique_fd.h"

namespace lazymem::sys {

// How an install ioctl ended. EEXIST (someone installed it first) and EAGAIN (a mapping change
// is pending; retry after reading events) are normal flow, not errors.
enum class InstallOutcome {
  kDone,      // the whole range was installed
  kExists,    // a page in the range was already present; `bytes` says how far we got before it
  kAgain,     // mapping change pending (mmap_changing; bytes == 0), or a copy that stopped at a
              // page already present (bytes > 0): go on past it
  kGone,      // the range is no longer registered (unmapped / moved): drop the request
  kExited,    // the process (its mm) is gone: nothing will ever be installed again
  kFailed,    // anything else: see error
};

struct InstallResult {
  InstallOutcome outcome = InstallOutcome::kDone;
  size_t bytes = 0;  // bytes installed before the outcome
  int err = 0;
};

class Uffd {
 public:
  Uffd() = default;
  Uffd(UniqueFd fd, uint64_t features) : fd_(std::move(fd)), features_(features) {}

  // Opens a userfaultfd (syscall, then /dev/userfaultfd) and negotiates `wanted` features.
  // Features the kernel lacks are dropped unless they are also in `required`.
  static Result<Uffd> open(uint64_t wanted, uint64_t required = 0, bool nonblocking = true);
  // Opens a userfaultfd of another process, `pid`, which need not cooperate: it is made to call
  // userfaultfd(2) (sys/remote_syscall.h: ptrace, x86_64), the descriptor is taken from it and
  // closed there, and the handshake with `features` (all required) is done here. The uffd acts
  // on that process's memory. `user_mode_only` (UFFD_USER_MODE_ONLY) needs no privilege of that
  // process, and is enough where the kernel resolves faults itself (WP_ASYNC); a uffd whose
  // faults a thread of ours resolves must also take the kernel's own accesses (a read(2) into
  // the memory), or those fail with EFAULT.
  static Result<Uffd> open_in(pid_t pid, uint64_t features, bool user_mode_only = true);
  // Adopts an fd created elsewhere (handed over by SCM_RIGHTS) whose API handshake was done.
  static Uffd adopt(UniqueFd fd, uint64_t features) { return Uffd(std::move(fd), features); }

  int fd() const { return fd_.get(); }
  uint64_t features() const { return features_; }
  bool has(uint64_t feature) const { return (features_ & feature) == feature; }

  // Registers [addr, addr+len) for MISSING faults; returns the ioctls the range supports.
  Result<uint64_t> register_missing(uintptr_t addr, size_t len);
  Status unregister(uintptr_t addr, size_t len);
  // Registers [addr, addr+len) for write-protect tracking (MODE_WP only: a range registered
  // for MISSING faults on this uffd would lose that mode), then write-protects every page of
  // it (unless not `protect`): those present, and with UFFD_FEATURE_WP_UNPOPULATED those never
  // touched too. (Before 6.5 one protect must stay within one mapping.)
  Status register_write_protected(uintptr_t addr, size_t len, bool protect = true);

  // Write-protects [addr, addr+len) (`on`) or lifts it, waking threads waiting on a write-protect
  // fault in it with `wake` (lifting only). kDone, or why not as for an install.
  InstallResult write_protect(uintptr_t addr, size_t len, bool on, bool wake = true);

  InstallResult copy(uintptr_t dst, const void* src, size_t len, bool wake = true);
  InstallResult zeropage(uintptr_t dst, size_t len, bool wake = true);
  // Makes accesses to the range raise SIGBUS (UFFD_FEATURE_POISON, Linux 6.6).
  InstallResult poison(uintptr_t dst, size_t len);
  Status wake(uintptr_t addr, size_t len);
  // Whether the process this uffd serves still has its memory. Side-effect free: asks for a
  // copy from a source the kernel cannot read, which fails (EEXIST, EFAULT, ENOENT) without
  // installing anything unless the mm is gone (ESRCH). `page_addr`: any page-aligned user address.
  bool mm_alive(uintptr_t page_addr);

  // Reads up to out.size() events; returns how many (0 when none are pending, nonblocking fd).
  Result<size_t> read_events(std::span<uffd_msg> out);

  UniqueFd& owned_fd() { return fd_; }

 private:
  UniqueFd fd_;
  uint64_t features_ = 0;
};

// Opens a raw userfaultfd without the API handshake: syscall first, then /dev/userfaultfd.
// The error says exactly which permission is missing and how to grant it.
Result<UniqueFd> open_userfaultfd_fd(bool nonblocking);

}  // namespace lazymem::sys
