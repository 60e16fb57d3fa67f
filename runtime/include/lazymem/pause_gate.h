// PauseGate: the safepoint a live capture needs (capture_regions_live's pause and resume) for
// the threads that write the captured memory.
//
//   lazymem::PauseGate gate;
//   // each writer thread:        gate.enter(); while (...) { gate.checkpoint(); write(); } gate.leave();
//   live.pause = [&] { gate.pause(); };    // returns once every writer is parked in checkpoint()
//   live.resume = [&] { gate.resume(); };
//
// checkpoint() costs one atomic load while no pause is asked for; a writer parks there, between
// two of its writes, never in the middle of one. Thread-safe; one pause at a time.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <mutex>

namespace lazymem {

class PauseGate {
 public:
  // A writer thread joins before its first write (parking at once if a pause is on), and leaves
  // after its last (a pause waits for the writers still in).
  void enter();
  void leave();
  // Between two writes: parks while a pause is on.
  void checkpoint() {
    if (asked_.load(std::memory_order_acquire)) park();
  }
  // Asks every writer to park and waits until each has (or has left).
  void pause();
  void resume();

 private:
  void park();

  std::atomic<bool> asked_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  size_t writers_ = 0, parked_ = 0;
};

}  // namespace lazymem
