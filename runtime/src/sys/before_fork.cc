// BeforeFork: work that fork() does first, in the parent.
#include "sys/before_fork.h"

#include <pthread.h>
#include <unistd.h>

#include <map>
#include <mutex>

namespace lazymem::sys {
namespace {

struct Registry {
  std::mutex mu;  // held while the hooks run, and across fork()
  uint64_t next_id = 1;
  std::map<uint64_t, std::function<void()>> hooks;
  pid_t owner = ::getpid();  // whose hooks these are

  // The hooks, once sure they are this process's: a child made without fork() (a raw clone(),
  // _Fork()) ran no atfork handler, and holds a copy of its parent's, whose restores are not
  // its own (their threads did not come along: a hook would wait on them for good). (mu)
  std::map<uint64_t, std::function<void()>>& mine() {
    if (owner != ::getpid()) {
      hooks.clear();
      owner = ::getpid();
    }
    return hooks;
  }
};

Registry& registry() {
  static Registry* r = new Registry();  // never destroyed: a fork may come during exit
  return *r;
}

void prepare() {
  Registry& r = registry();
  r.mu.lock();
  for (auto& [id, hook] : r.mine()) hook();
}

void in_parent() { registry().mu.unlock(); }

void in_child() {
  Registry& r = registry();
  r.mine();  // a new pid: the parent's hooks are dropped
  r.mu.unlock();
}

}  // namespace

BeforeFork::BeforeFork(std::function<void()> hook) {
  static std::once_flag once;
  std::call_once(once, [] { ::pthread_atfork(prepare, in_parent, in_child); });
  Registry& r = registry();
  std::lock_guard lock(r.mu);
  id_ = r.next_id++;
  r.mine().emplace(id_, std::move(hook));
}

BeforeFork& BeforeFork::operator=(BeforeFork&& o) noexcept {
  if (this != &o) {
    reset();
    id_ = o.id_;
    o.id_ = 0;
  }
  return *this;
}

void BeforeFork::reset() {
  if (id_ == 0) return;
  Registry& r = registry();
  std::lock_guard lock(r.mu);
  r.mine().erase(id_);  // gone already in a child: nothing
  id_ = 0;
}

}  // namespace lazymem::sys
