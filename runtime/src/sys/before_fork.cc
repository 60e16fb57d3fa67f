// BeforeFork: work that fork() does first, in the parent.
#include "sys/before_fork.h"

#include <pthread.h>

#include <map>
#include <mutex>

namespace lazymem::sys {
namespace {

struct Registry {
  std::mutex mu;  // held while the hooks run, and across fork()
  uint64_t next_id = 1;
  std::map<uint64_t, std::function<void()>> hooks;
};

Registry& registry() {
  static Registry* r = new Registry();  // never destroyed: a fork may come during exit
  return *r;
}

void prepare() {
  Registry& r = registry();
  r.mu.lock();
  for (auto& [id, hook] : r.hooks) hook();
}

void in_parent() { registry().mu.unlock(); }

void in_child() {
  Registry& r = registry();
  r.hooks.clear();
  r.mu.unlock();
}

}  // namespace

BeforeFork::BeforeFork(std::function<void()> hook) {
  static std::once_flag once;
  std::call_once(once, [] { ::pthread_atfork(prepare, in_parent, in_child); });
  Registry& r = registry();
  std::lock_guard lock(r.mu);
  id_ = r.next_id++;
  r.hooks.emplace(id_, std::move(hook));
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
  r.hooks.erase(id_);  // gone already in a forked child: nothing
  id_ = 0;
}

}  // namespace lazymem::sys
