// BeforeFork: work that fork() does first, in the parent (pthread_atfork's prepare handler).
//
// Why: a restore under way cannot hand its missing pages to a child. A child's copy of the
// memory either has nobody to serve it (a fault-on-thread restore's handler is the parent's) or
// only the agent (were the agent to die, the kernel would zero-fill every page still missing
// there). So each restore registers a hook that completes it, and fork() runs them all first.
//
// The hooks run under the registry's lock, which fork() then holds across the fork: a handle
// destroyed meanwhile waits for its hook to return, so a hook may use what its handle's owner
// owns. A child starts with no hooks: its parent's restores are not its own (a child made by a
// raw clone() or _Fork(), which run no atfork handlers, included).
//
// Thread-safety: any thread. A hook must not create or destroy a BeforeFork.
#pragma once

#include <cstdint>
#include <functional>

namespace lazymem::sys {

class BeforeFork {
 public:
  BeforeFork() = default;
  // Runs `hook` before every fork() of this process until this handle is destroyed or reset.
  explicit BeforeFork(std::function<void()> hook);
  ~BeforeFork() { reset(); }
  BeforeFork(BeforeFork&& o) noexcept : id_(o.id_) { o.id_ = 0; }
  BeforeFork& operator=(BeforeFork&& o) noexcept;
  BeforeFork(const BeforeFork&) = delete;
  BeforeFork& operator=(const BeforeFork&) = delete;

  // Unregisters the hook; waits for it if a fork is running it.
  void reset();

 private:
  uint64_t id_ = 0;  // 0: none
};

}  // namespace lazymem::sys
