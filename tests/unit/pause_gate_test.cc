// PauseGate with real threads: a pause returns with every writer parked between two writes, a
// writer that joins during a pause waits it out, and resume lets them all go on.
#include "lazymem/pause_gate.h"

#include <gtest/gtest.h>

#include <array>
#include <atomic>
#include <thread>
#include <vector>

namespace lazymem {
namespace {

struct Writers {
  static constexpr int kThreads = 3;
  PauseGate gate;
  std::atomic<bool> stop{false};
  std::array<std::atomic<uint64_t>, kThreads + 1> counts{};
  std::vector<std::thread> threads;

  // `write_first`: the writer writes before its first checkpoint (enter() alone holds it).
  void start(int i, bool write_first = false) {
    threads.emplace_back([this, i, write_first] {
      gate.enter();
      while (!stop.load(std::memory_order_relaxed)) {
        if (!write_first) gate.checkpoint();
        counts[i].fetch_add(1, std::memory_order_relaxed);  // "a write"
        if (write_first) gate.checkpoint();
      }
      gate.leave();
    });
  }
  // Waits until writer i has written past `than` (it runs).
  void await_past(int i, uint64_t than) {
    while (counts[i].load(std::memory_order_relaxed) <= than) std::this_thread::yield();
  }
  ~Writers() {
    stop = true;
    for (auto& t : threads) t.join();
  }
};

TEST(PauseGateTest, APauseHoldsEveryWriterBetweenTwoWrites) {
  Writers w;
  for (int i = 0; i < Writers::kThreads; ++i) w.start(i);
  for (int i = 0; i < Writers::kThreads; ++i) w.await_past(i, 1000);
  for (int round = 0; round < 20; ++round) {
    w.gate.pause();
    std::array<uint64_t, Writers::kThreads> at{};
    for (int i = 0; i < Writers::kThreads; ++i) at[i] = w.counts[i].load();
    for (int spin = 0; spin < 2000; ++spin) std::this_thread::yield();  // time for a stray write to land
    for (int i = 0; i < Writers::kThreads; ++i) EXPECT_EQ(w.counts[i].load(), at[i]) << "writer " << i << " wrote while paused";
    if (round == 10) {  // joins during a pause: held in enter(), before its first write
      w.start(Writers::kThreads, true);
      for (int spin = 0; spin < 2000; ++spin) std::this_thread::yield();
      EXPECT_EQ(w.counts[Writers::kThreads].load(), 0u) << "a writer joining during a pause wrote";
    }
    w.gate.resume();
    for (int i = 0; i < Writers::kThreads; ++i) w.await_past(i, at[i]);
  }
  w.await_past(Writers::kThreads, 0);  // the late writer runs once resumed
  w.gate.pause();
  const uint64_t late = w.counts[Writers::kThreads].load();
  for (int spin = 0; spin < 2000; ++spin) std::this_thread::yield();
  EXPECT_EQ(w.counts[Writers::kThreads].load(), late) << "the writer that joined later is not held";
  w.gate.resume();
}

TEST(PauseGateTest, APauseWithNoWritersOrAfterTheyLeftReturnsAtOnce) {
  PauseGate gate;
  gate.pause();
  gate.resume();
  std::thread t([&] {
    gate.enter();
    gate.checkpoint();
    gate.leave();
  });
  t.join();
  gate.pause();  // nobody in: returns
  gate.resume();
}

}  // namespace
}  // namespace lazymem
