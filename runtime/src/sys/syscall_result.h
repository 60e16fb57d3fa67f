// One wrapper for every syscall: captures errno at once, retries EINTR, names EAGAIN.
#pragma once

#include <cerrno>
#include <string>

#include "lazymem/result.h"

namespace lazymem::sys {

// A syscall's return value, or the errno it failed with.
struct SysResult {
  long value = 0;
  int err = 0;

  bool ok() const { return err == 0; }
  bool again() const { return err == EAGAIN || err == EWOULDBLOCK; }
  // An Error naming what was attempted; only valid when !ok().
  Error error(const std::string& what) const { return sys_error(what, err); }
};

// Runs `fn` (which returns -1 and sets errno on failure) until it does not fail with EINTR.
template <typename Fn>
SysResult call(Fn&& fn) {
  for (;;) {
    long r = static_cast<long>(fn());
    if (r >= 0) return SysResult{r, 0};
    int e = errno;
    if (e != EINTR) return SysResult{r, e};
  }
}

}  // namespace lazymem::sys
