#include "lazymem/pause_gate.h"

namespace lazymem {

void PauseGate::enter() {
  {
    std::lock_guard lk(mu_);
    ++writers_;
  }
  checkpoint();  // a pause is on: this writer waits it out before its first write
}

void PauseGate::leave() {
  std::lock_guard lk(mu_);
  --writers_;
  cv_.notify_all();  // a pause may be waiting for this one
}

void PauseGate::park() {
  std::unique_lock lk(mu_);
  if (!asked_.load(std::memory_order_relaxed)) return;  // resumed before we got the lock
  ++parked_;
  cv_.notify_all();
  cv_.wait(lk, [&] { return !asked_.load(std::memory_order_relaxed); });
  --parked_;
}

void PauseGate::pause() {
  std::unique_lock lk(mu_);
  asked_.store(true, std::memory_order_release);
  cv_.wait(lk, [&] { return parked_ == writers_; });
}

void PauseGate::resume() {
  {
    std::lock_guard lk(mu_);
    asked_.store(false, std::memory_order_release);
  }
  cv_.notify_all();
}

}  // namespace lazymem
