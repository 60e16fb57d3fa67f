// In-process lazy restore: every byte restored equals every byte captured, in every access
// pattern; stats match what was touched; bad snapshots fail cleanly with nothing installed.
#include <gtest/gtest.h>
#include <poll.h>
#include <setjmp.h>
#include <sys/syscall.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <filesystem>
#include <mutex>
#include <csignal>
#include <cstring>
#include <fstream>
#include <random>
#include <thread>

#include "../common/manifest_source.h"
#include "../common/test_data.h"
#include "lazymem/kernel_features.h"
#include "lazymem/pause_gate.h"
#include "lazymem/restore.h"
#include "lazymem/snapshot.h"
#include "fault/fault_engine.h"
#include "source.h"
#include "sys/uffd.h"
#include "sys/uapi_compat.h"

namespace lazymem {
namespace {

using testing::ScratchDir;

constexpr size_t kMiB = 1024 * 1024;

class RestoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    kf_ = probe_kernel();
    if (!kf_.uffd_usable) GTEST_SKIP() << "userfaultfd unusable: " << kf_.uffd_error;
  }

  // Captures `len` bytes of mixed content from a fresh mapping, keeps a copy for comparison,
  // and unmaps the original so the restore can take its address.
  // A live capture racing a writer, restored and compared with the memory as the pause found it.
  void live_capture_holds_the_memory_as_it_was(const KernelFeatures& features);

  void capture(size_t len, uint64_t seed, const std::string& name, CaptureOptions opts = {}) {
    void* p = testing::map_for_capture(len, seed);
    ASSERT_NE(p, nullptr);
    testing::fill_mixed(static_cast<std::byte*>(p), len, seed);
    expected_.assign(static_cast<std::byte*>(p), static_cast<std::byte*>(p) + len);
    addr_ = p;
    len_ = len;
    CaptureRegion region{"heap", p, len, PROT_READ | PROT_WRITE};
    opts.app_state = {std::byte{'o'}, std::byte{'k'}};
    auto report = capture_regions(dir_.path() + "/" + name, std::span(&region, 1), opts);
    ASSERT_TRUE(report.ok()) << report.error().message();
    ASSERT_EQ(report->total_bytes, len);
    ::munmap(p, len);
  }

  std::string location(const std::string& name) const { return dir_.path() + "/" + name; }

  // Corrupts snapshot `name`'s first chunk (a stored one: seed 1 begins with text) in the middle.
  void flip_a_bit_in_chunk_0(const std::string& name) {
    auto m = read_manifest(location(name));
    ASSERT_TRUE(m.ok()) << m.error().message();
    const ChunkInfo& c0 = m->regions[0].chunks[0];
    ASSERT_NE(c0.codec, Codec::kZero);
    std::fstream f(location(name) + "/data", std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(c0.offset + c0.stored_length / 2));
    char ch;
    f.get(ch);
    f.seekp(static_cast<std::streamoff>(c0.offset + c0.stored_length / 2));
    f.put(static_cast<char>(ch ^ 0x10));
  }

  static void expect_equal(const std::byte* got, const std::vector<std::byte>& want) {
    for (size_t off = 0; off < want.size(); off += 4096) {
      if (std::memcmp(got + off, want.data() + off, 4096) != 0) {
        FAIL() << "page at offset " << off << " differs";
      }
    }
  }

  KernelFeatures kf_;
  ScratchDir dir_;
  std::vector<std::byte> expected_;
  void* addr_ = nullptr;
  size_t len_ = 0;
};

TEST_F(RestoreTest, SequentialTouchRestoresEveryByte) {
  capture(256 * kMiB, 1, "seq");
  RestoreOptions opts;
  opts.prefetch = false;
  auto r = LazyRestore::start(location("seq"), kf_, opts);
  ASSERT_TRUE(r.ok()) << r.error().message();
  const RestoredRegion* heap = (*r)->region("heap");
  ASSERT_NE(heap, nullptr);
  ASSERT_EQ(heap->address, addr_);
  const auto* got = static_cast<const std::byte*>(heap->address);
  expect_equal(got, expected_);
  EXPECT_EQ((*r)->app_state().size(), 2u);

  // Every chunk was touched by one thread, in order: one fault per chunk once the engine sees
  // the scan (the first chunk's page goes in alone and its next page faults too), and every page
  // installed by a fault or as a zero page. Counted just after the install that lets the thread
  // go on: read once the engine is done (every chunk was asked for: nothing is prefetched).
  ASSERT_TRUE((*r)->wait_complete().ok());
  RegionStats t = (*r)->stats().total();
  EXPECT_GE(t.faults, len_ / kDefaultChunkSize);
  EXPECT_LE(t.faults, len_ / kDefaultChunkSize + 1);
  EXPECT_EQ(t.pages_fault + t.pages_zero, len_ / 4096);
  EXPECT_EQ(t.pages_prefetch, 0u);
  EXPECT_EQ(t.latency.count, t.faults);
  EXPECT_EQ(t.bytes_decompressed, t.pages_fault * 4096);
  ASSERT_TRUE((*r)->finish().ok());
  ::munmap(heap->address, heap->length);
}

TEST_F(RestoreTest, RandomTouchWithPrefetchRestoresEveryByte) {
  capture(256 * kMiB, 2, "rand");
  auto r = LazyRestore::start(location("rand"), kf_);
  ASSERT_TRUE(r.ok()) << r.error().message();
  const auto* got = static_cast<const std::byte*>((*r)->region("heap")->address);
  std::mt19937_64 rng(7);
  const size_t pages = len_ / 4096;
  for (int i = 0; i < 20000; ++i) {
    size_t pg = rng() % pages;
    ASSERT_EQ(std::memcmp(got + pg * 4096, expected_.data() + pg * 4096, 4096), 0) << "page " << pg;
  }
  ASSERT_TRUE((*r)->wait_complete().ok());
  expect_equal(got, expected_);
  RegionStats t = (*r)->stats().total();
  EXPECT_EQ(t.pages_present(), pages);  // each page installed exactly once
  ASSERT_TRUE((*r)->finish().ok());
  ::munmap(const_cast<std::byte*>(got), len_);
}

TEST_F(RestoreTest, FourThreadsTouchingAtOnce) {
  capture(256 * kMiB, 3, "threads");
  RestoreOptions opts;
  opts.prefetch = false;
  auto r = LazyRestore::start(location("threads"), kf_, opts);
  ASSERT_TRUE(r.ok()) << r.error().message();
  const auto* got = static_cast<const std::byte*>((*r)->region("heap")->address);
  std::atomic<size_t> bad{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    // Interleaved and overlapping: every thread touches every page, starting at different points,
    // so many threads fault on the same chunk at once.
    threads.emplace_back([&, t] {
      const size_t pages = len_ / 4096;
      for (size_t i = 0; i < pages; ++i) {
        size_t pg = (i + static_cast<size_t>(t) * pages / 4) % pages;
        if (std::memcmp(got + pg * 4096, expected_.data() + pg * 4096, 4096) != 0) ++bad;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0u);
  ASSERT_TRUE((*r)->wait_complete().ok());  // the last install counted (it lags the wake-up)
  RegionStats t = (*r)->stats().total();
  EXPECT_EQ(t.pages_fault + t.pages_zero, len_ / 4096);  // each chunk fetched once
  EXPECT_GE(t.faults, len_ / kDefaultChunkSize);
  ASSERT_TRUE((*r)->finish().ok());
  ::munmap(const_cast<std::byte*>(got), len_);
}

TEST_F(RestoreTest, SmallChunksAndPreadEngine) {
  CaptureOptions co;
  co.chunk_size = 4096;
  co.zstd_level = 3;
  capture(16 * kMiB, 4, "small", co);
  RestoreOptions opts;
  opts.force_pread = true;
  opts.direct_io = false;
  auto r = LazyRestore::start(location("small"), kf_, opts);
  ASSERT_TRUE(r.ok()) << r.error().message();
  const auto* got = static_cast<const std::byte*>((*r)->region("heap")->address);
  expect_equal(got, expected_);
  ASSERT_TRUE((*r)->finish().ok());
  ::munmap(const_cast<std::byte*>(got), len_);
}

// Snapshots written before format 2 (one zstd frame per chunk) still restore lazily.
TEST_F(RestoreTest, FormatOneSnapshotRestores) {
  CaptureOptions co;
  co.format_version = 1;
  capture(64 * kMiB, 6, "v1", co);
  auto m = read_manifest(location("v1"));
  ASSERT_TRUE(m.ok());
  ASSERT_EQ(m->format_version, 1u);
  RestoreOptions opts;
  opts.prefetch = false;
  auto r = LazyRestore::start(location("v1"), kf_, opts);
  ASSERT_TRUE(r.ok()) << r.error().message();
  const auto* got = static_cast<const std::byte*>((*r)->region("heap")->address);
  expect_equal(got, expected_);
  ASSERT_TRUE((*r)->finish().ok());
  ::munmap(const_cast<std::byte*>(got), len_);
}

// A thread writing one word after another into memory being captured live, parked at the
// capture's pause through `gate` (its checkpoint is between two words).
class BusyWriter {
 public:
  BusyWriter(std::byte* m, size_t len) : thread_([this, m, len] { run(m, len); }) {}
  ~BusyWriter() {
    stop_ = true;
    thread_.join();
  }
  // Waits until it has written `n` words (it is running, not only started).
  void await_writes(uint64_t n) {
    std::unique_lock lk(mu_);
    cv_.wait(lk, [&] { return writes_ >= n; });
  }
  uint64_t writes() {
    std::lock_guard lk(mu_);
    return writes_;
  }

  PauseGate gate;

 private:
  void run(std::byte* m, size_t len) {
    gate.enter();
    std::mt19937_64 rng(9);
    for (uint64_t n = 1; !stop_.load(std::memory_order_relaxed); ++n) {
      gate.checkpoint();
      if (n % 1024 == 0) {
        std::lock_guard lk(mu_);
        writes_ = n;
        cv_.notify_all();
      }
      const uint64_t v = n;
      std::memcpy(m + (rng() % (len / 8)) * 8, &v, 8);
    }
    gate.leave();
  }

  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t writes_ = 0;
  std::atomic<bool> stop_{false};
  std::thread thread_;  // last: it starts running at construction, with the members above made
};

// Captured while a thread keeps writing: the snapshot holds the memory as it was during the
// pause, every byte, although most of it was stored before and chunks were stored again.
// The process grows a restored mapping (mremap), in place and then moving it: the new tails read
// zeros, as new memory does, and every snapshot page still comes back where the mapping now is.
// The tail's first touch used to be poisoned (SIGBUS): the kernel keeps a grown tail registered
// and tells nobody.
TEST_F(RestoreTest, AGrownMappingReadsZerosPastTheSnapshot) {
  capture(8 * kMiB, 9, "grow");
  RestoreOptions opts;
  opts.prefetch = false;
  auto r = LazyRestore::start(location("grow"), kf_, opts);
  ASSERT_TRUE(r.ok()) << r.error().message();
  auto* base = static_cast<std::byte*>((*r)->region("heap")->address);
  ASSERT_EQ(std::memcmp(base, expected_.data(), 4096), 0);
  auto expect_zeros = [](const std::byte* p, size_t len) {
    for (size_t off = 0; off < len; off += 4096) {
      ASSERT_TRUE(testing::all_zero(p + off, 4096)) << off;
    }
  };
  // In place: capture addresses lie gigabytes apart, so the space after the region is free.
  ASSERT_EQ(::mremap(base, 8 * kMiB, 12 * kMiB, 0), base) << std::strerror(errno);
  expect_zeros(base + 9 * kMiB, 3 * kMiB);  // touched before the region's last snapshot pages
  base[9 * kMiB] = std::byte{0x5a};
  // Moved and grown again: the snapshot pages (most not yet fetched) and the first tail go along.
  void* spot = ::mmap(nullptr, 16 * kMiB, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(spot, MAP_FAILED);
  void* moved = ::mremap(base, 12 * kMiB, 16 * kMiB, MREMAP_MAYMOVE | MREMAP_FIXED, spot);
  ASSERT_EQ(moved, spot) << std::strerror(errno);
  auto* mv = static_cast<std::byte*>(moved);
  expect_zeros(mv + 12 * kMiB, 4 * kMiB);
  EXPECT_EQ(mv[9 * kMiB], std::byte{0x5a});
  mv[9 * kMiB] = std::byte{0};
  expect_zeros(mv + 8 * kMiB, 4 * kMiB);
  for (size_t off = 0; off < 8 * kMiB; off += 4096) {
    ASSERT_EQ(std::memcmp(mv + off, expected_.data() + off, 4096), 0) << "snapshot page at " << off;
  }
  ASSERT_TRUE((*r)->finish().ok());
  ::munmap(mv, 16 * kMiB);
}

TEST_F(RestoreTest, LiveCaptureHoldsTheMemoryAsItWasDuringThePause) {
  if (!kf_.has_dirty_marks()) GTEST_SKIP() << "kernel lacks UFFD_FEATURE_WP_ASYNC or PAGEMAP_SCAN (Linux 6.7)";
  live_capture_holds_the_memory_as_it_was(kf_);
}

// The same on a kernel as before 6.7 (no WP_ASYNC, no PAGEMAP_SCAN): tracked by write faults.
TEST_F(RestoreTest, LiveCaptureBeforeLinux67TracksByWriteFaults) {
  if (!kf_.has_write_protect_faults()) GTEST_SKIP() << "kernel lacks userfaultfd write-protect faults (Linux 5.13)";
  KernelFeatures older = kf_;
  older.uffd_features &= ~(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED);
  older.pagemap_scan = false;
  ASSERT_FALSE(older.has_dirty_marks());
  live_capture_holds_the_memory_as_it_was(older);
}

void RestoreTest::live_capture_holds_the_memory_as_it_was(const KernelFeatures& features) {
  constexpr size_t kLen = 64 * kMiB;
  void* p = testing::map_for_capture(kLen, 21);
  ASSERT_NE(p, nullptr);
  auto* m = static_cast<std::byte*>(p);
  testing::fill_mixed(m, kLen, 21);
  CaptureReport report;
  std::vector<std::byte> expected_state;
  {
    BusyWriter writer(m + kLen / 2, kLen / 2);  // the upper half: the lower one is written below only
    writer.await_writes(10000);
    LiveCaptureOptions live;
    live.max_rounds = 3;
    live.converged_bytes = 0;  // every round, so that chunks are stored again and again
    live.pause = [&] {
      writer.gate.pause();
      expected_.assign(m, m + kLen);  // what the last round stores
    };
    live.resume = [&] { writer.gate.resume(); };
    std::vector<std::byte> state_at_pause;
    live.app_state = [&] {  // the writer's count, as the pause found it
      const uint64_t n = writer.writes();
      state_at_pause.assign(reinterpret_cast<const std::byte*>(&n), reinterpret_cast<const std::byte*>(&n) + 8);
      return state_at_pause;
    };
    // Also, deterministically: behind the first pass, pages of the lower half it has stored
    // already are written (its progress is reported on the capturing thread, every 256 chunks).
    CaptureOptions opts;
    bool wrote_behind = false;
    opts.progress = [&](uint64_t done, uint64_t) {
      if (wrote_behind) return;
      for (size_t off = 0; off + 4096 <= std::min<uint64_t>(done, kLen / 2); off += 4 * 4096) m[off + 100] = std::byte{0x5a};
      wrote_behind = true;
    };
    CaptureRegion region{"heap", p, kLen, PROT_READ | PROT_WRITE};
    auto r = capture_regions_live(location("live"), std::span(&region, 1), opts, live, features);
    ASSERT_TRUE(r.ok()) << r.error().message();
    report = *r;
    expected_state = state_at_pause;
    EXPECT_TRUE(wrote_behind);
    EXPECT_GT(writer.writes(), 10000u);
  }
  EXPECT_EQ(report.total_bytes, kLen);
  // The first pass, up to three rounds (one that finds nothing written ends them: the writer may
  // not have been scheduled in a short one), the paused one.
  EXPECT_GE(report.rounds, 3u);
  EXPECT_LE(report.rounds, 5u);
  EXPECT_GT(report.superseded_bytes, 0u) << "nothing was stored again: the writer did not race the capture";
  ::munmap(p, kLen);
  auto r = LazyRestore::start(location("live"), kf_);
  ASSERT_TRUE(r.ok()) << r.error().message();
  expect_equal(static_cast<const std::byte*>((*r)->region("heap")->address), expected_);
  EXPECT_EQ((*r)->app_state(), expected_state) << "the state blob is not the one taken during the pause";
  EXPECT_EQ(expected_state.size(), 8u);
  ASSERT_TRUE((*r)->finish().ok());
  ::munmap((*r)->region("heap")->address, kLen);
}

// The same with three regions given out of address order (two adjacent, one past a hole, odd
// lengths), 4 KiB chunks and format 1: every chunk stored again lands in its own region's place.
TEST_F(RestoreTest, LiveCaptureOfSeveralRegionsInFormatOneWithSmallChunks) {
  if (!kf_.has_dirty_tracking()) GTEST_SKIP() << "dirty tracking needs Linux 5.13 (userfaultfd write-protect faults)";
  constexpr size_t kA = 3 * kMiB + 12 * 1024, kB = kMiB, kHole = 64 * 1024, kC = 2 * kMiB + 4096;
  void* p = testing::map_for_capture(kA + kB + kHole + kC, 23);
  ASSERT_NE(p, nullptr);
  auto* base = static_cast<std::byte*>(p);
  testing::fill_mixed(base, kA + kB + kHole + kC, 23);
  ASSERT_EQ(::munmap(base + kA + kB, kHole), 0);
  std::byte* c = base + kA + kB + kHole;
  const CaptureRegion regions[] = {{"c", c, kC, PROT_READ | PROT_WRITE},
                                   {"a", base, kA, PROT_READ | PROT_WRITE},
                                   {"b", base + kA, kB, PROT_READ | PROT_WRITE}};
  std::vector<std::byte> want_ab, want_c;
  {
    BusyWriter writer(c, kC);  // region c, nonstop
    CaptureOptions opts;
    opts.chunk_size = 4096;
    opts.format_version = 1;
    unsigned calls = 0;
    opts.progress = [&](uint64_t done, uint64_t) {  // during the first pass, in a and b: behind it and ahead
      if (++calls % 2 == 0) return;
      for (size_t off = 0; off < kA + kB; off += 5 * 4096) base[off + calls] = static_cast<std::byte>(calls);
      (void)done;
    };
    LiveCaptureOptions live;
    live.max_rounds = 2;
    live.converged_bytes = 0;
    live.pause = [&] {
      writer.gate.pause();
      want_ab.assign(base, base + kA + kB);
      want_c.assign(c, c + kC);
    };
    live.resume = [&] { writer.gate.resume(); };
    auto r = capture_regions_live(location("multi"), regions, opts, live, kf_);
    ASSERT_TRUE(r.ok()) << r.error().message();
    EXPECT_GT(r->superseded_bytes, 0u);
    EXPECT_EQ(r->total_bytes, kA + kB + kC);
  }
  ::munmap(base, kA + kB);
  ::munmap(c, kC);
  auto r = LazyRestore::start(location("multi"), kf_);
  ASSERT_TRUE(r.ok()) << r.error().message();
  ASSERT_EQ((*r)->region("a")->address, base);
  ASSERT_EQ((*r)->region("c")->address, c);
  expect_equal(base, want_ab);
  expect_equal(c, want_c);
  ASSERT_TRUE((*r)->finish().ok());
  for (const auto& reg : (*r)->regions()) ::munmap(reg.address, reg.length);
}

TEST_F(RestoreTest, LiveCaptureWithoutPauseIsRefused) {
  void* p = testing::map_for_capture(kMiB, 22);
  ASSERT_NE(p, nullptr);
  CaptureRegion region{"heap", p, kMiB, PROT_READ | PROT_WRITE};
  auto r = capture_regions_live(location("nopause"), std::span(&region, 1), {}, {}, kf_);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message().find("needs pause and resume"), std::string::npos) << r.error().message();
  EXPECT_FALSE(std::filesystem::exists(location("nopause")));
  ::munmap(p, kMiB);
}

TEST_F(RestoreTest, AddressTakenFailsWithNothingMapped) {
  capture(4 * kMiB, 5, "taken");
  void* squatter = ::mmap(addr_, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
  ASSERT_EQ(squatter, addr_);
  auto r = LazyRestore::start(location("taken"), kf_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::kExists);
  EXPECT_NE(r.error().message().find("already mapped"), std::string::npos) << r.error().message();
  ::munmap(squatter, 4096);
  // Nothing of the snapshot was left mapped behind.
  void* probe = ::mmap(addr_, len_, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
  EXPECT_EQ(probe, addr_);
  ::munmap(probe, len_);
}

TEST_F(RestoreTest, MissingSnapshotIsAClearError) {
  auto r = LazyRestore::start(location("nope"), kf_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::kNotFound);
  EXPECT_NE(r.error().message().find("not found"), std::string::npos) << r.error().message();
}

// A flipped bit in a chunk: the fault fails visibly (SIGBUS from UFFDIO_POISON), the page is
// never installed from bad bytes. Runs in a child, which the poison kills.
TEST_F(RestoreTest, FlippedBitInChunkPoisonsInsteadOfInstalling) {
  if (!kf_.has_uffd_poison()) GTEST_SKIP() << "kernel lacks UFFDIO_POISON (Linux 6.6)";
  capture(4 * kMiB, 1, "flip");  // seed 1: first block is text → zstd chunks
  flip_a_bit_in_chunk_0("flip");
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    RestoreOptions opts;
    opts.prefetch = false;
    auto r = LazyRestore::start(location("flip"), kf_, opts);
    if (!r.ok()) _exit(3);
    volatile const char* p = static_cast<const char*>((*r)->region("heap")->address);
    // Second chunk is fine.
    if (std::memcmp(const_cast<const char*>(p) + kDefaultChunkSize, expected_.data() + kDefaultChunkSize, 4096) != 0) _exit(4);
    ::signal(SIGBUS, SIG_DFL);  // sanitizers install their own handler; we want the plain death
    (void)p[0];                 // must raise SIGBUS, never return wrong bytes
    _exit(5);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(status)) << "child exited with " << WEXITSTATUS(status);
  EXPECT_EQ(WTERMSIG(status), SIGBUS);
}

// One corrupt chunk must not cost the others: finish() used to return at the first failure and
// close the uffd while most chunks were still absent, and the kernel zero-filled them.
TEST_F(RestoreTest, FinishAfterOneBadChunkRestoresEveryOtherPage) {
  if (!kf_.has_uffd_poison()) GTEST_SKIP() << "kernel lacks UFFDIO_POISON (Linux 6.6)";
  capture(64 * kMiB, 1, "onebad");  // seed 1: first block is text → zstd chunks
  flip_a_bit_in_chunk_0("onebad");
  RestoreOptions opts;
  opts.prefetch = false;  // nothing fetched yet when finish() begins
  auto r = LazyRestore::start(location("onebad"), kf_, opts);
  ASSERT_TRUE(r.ok()) << r.error().message();
  const auto* got = static_cast<const std::byte*>((*r)->region("heap")->address);
  Status s = (*r)->finish();
  EXPECT_FALSE(s.ok()) << "a corrupt chunk went unreported";
  // Chunk 0 is poisoned (SIGBUS: FlippedBitInChunkPoisonsInsteadOfInstalling); every page after
  // it must be the captured one.
  size_t wrong = 0;
  for (size_t off = kDefaultChunkSize; off < len_; off += 4096) {
    wrong += std::memcmp(got + off, expected_.data() + off, 4096) != 0;
  }
  EXPECT_EQ(wrong, 0u) << "of " << (len_ - kDefaultChunkSize) / 4096 << " pages after the bad chunk";
  ::munmap(const_cast<std::byte*>(got), len_);
}

// A page let go with MADV_FREE and reclaimed after the restore is complete, where the uffd
// does not ask for REMOVE events (an agent's client chooses its uffd's features): no event says
// so, the page faults again and gets the snapshot's bytes back (design notes: "MADV_FREE"). A
// complete session has let its reader go: the fetch used to wait for none and fail at its
// deadline (SIGBUS). In a child: the failure poisons the page.
TEST_F(RestoreTest, APageReclaimedAfterTheRestoreIsCompleteIsFetchedAgain) {
  capture(4 * kMiB, 1, "reclaimed");  // seed 1: text first, no zero page there
  ASSERT_FALSE(testing::all_zero(expected_.data() + 5 * 4096, 4096));
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    auto* p = static_cast<std::byte*>(::mmap(nullptr, len_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (p == MAP_FAILED) _exit(10);
    auto uffd = sys::Uffd::open(0);
    if (!uffd.ok() || !uffd->register_missing(reinterpret_cast<uintptr_t>(p), len_).ok()) _exit(11);
    auto source = open_chunk_source(location("reclaimed"), RestoreOptions{});
    if (!source.ok()) _exit(12);
    fault::EngineOptions eo;
    eo.demand_deadline = std::chrono::seconds(5);
    fault::FaultEngine engine(kf_, eo);
    if (!engine.start().ok()) _exit(13);
    fault::SessionSpec spec;
    spec.name = "reclaimed";
    spec.uffd = std::move(*uffd);
    spec.source = std::move(*source);
    spec.ranges = {fault::MappedRange{reinterpret_cast<uint64_t>(p), len_, 0, 0}};
    spec.pid = ::getpid();
    spec.prefetch = true;
    auto id = engine.add_session(std::move(spec));
    if (!id.ok()) _exit(14);
    if (!engine.wait_complete(*id, std::chrono::seconds(20)).ok()) _exit(15);
    std::byte* page = p + 5 * 4096;
    if (::madvise(page, 4096, MADV_FREE) != 0 || ::madvise(page, 4096, MADV_PAGEOUT) != 0) _exit(16);
    unsigned char resident = 1;
    if (::mincore(page, 4096, &resident) != 0) _exit(17);
    if (resident & 1) _exit(77);  // kept: nothing to test
    if (std::memcmp(page, expected_.data() + 5 * 4096, 4096) != 0) _exit(18);
    engine.remove_session(*id);
    _exit(0);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status)) << "the child died of signal " << WTERMSIG(status);
  if (WEXITSTATUS(status) == 77) GTEST_SKIP() << "the kernel kept the freed page (MADV_PAGEOUT)";
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

// A session fetches only the regions its ranges map: a restore serves each page size through a
// session of its own, and each used to fetch (and decode) the whole snapshot, the other's
// regions landing nowhere.
TEST_F(RestoreTest, ASessionFetchesOnlyTheRegionsItMaps) {
  void* a = testing::map_for_capture(2 * kMiB, 14);
  void* b = testing::map_for_capture(2 * kMiB, 15);
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  testing::fill_mixed(static_cast<std::byte*>(a), 2 * kMiB, 14);
  testing::fill_mixed(static_cast<std::byte*>(b), 2 * kMiB, 15);
  const std::vector<std::byte> want(static_cast<std::byte*>(a), static_cast<std::byte*>(a) + 2 * kMiB);
  CaptureRegion regions[2] = {{"a", a, 2 * kMiB, PROT_READ | PROT_WRITE}, {"b", b, 2 * kMiB, PROT_READ | PROT_WRITE}};
  ASSERT_TRUE(capture_regions(location("two"), std::span(regions, 2), {}).ok());
  ::munmap(a, 2 * kMiB);
  ::munmap(b, 2 * kMiB);
  auto* p = static_cast<std::byte*>(::mmap(nullptr, 2 * kMiB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  ASSERT_NE(p, MAP_FAILED);
  auto uffd = sys::Uffd::open(UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP);
  ASSERT_TRUE(uffd.ok()) << uffd.error().message();
  ASSERT_TRUE(uffd->register_missing(reinterpret_cast<uintptr_t>(p), 2 * kMiB).ok());
  auto source = open_chunk_source(location("two"), RestoreOptions{});
  ASSERT_TRUE(source.ok()) << source.error().message();
  fault::FaultEngine engine(kf_);
  ASSERT_TRUE(engine.start().ok());
  fault::SessionSpec spec;
  spec.name = "region a only";
  spec.uffd = std::move(*uffd);
  spec.source = std::move(*source);
  spec.ranges = {fault::MappedRange{reinterpret_cast<uint64_t>(p), 2 * kMiB, 0, 0}};
  spec.pid = ::getpid();
  auto id = engine.add_session(std::move(spec));
  ASSERT_TRUE(id.ok()) << id.error().message();
  ASSERT_TRUE(engine.wait_complete(*id, std::chrono::seconds(20)).ok());
  auto info = engine.session_info(*id);
  ASSERT_TRUE(info.has_value());
  EXPECT_GT(info->stats.regions[0].bytes_fetched, 0u);
  EXPECT_EQ(info->stats.regions[1].bytes_fetched, 0u) << "fetched a region no range maps";
  EXPECT_EQ(info->stats.regions[1].pages_present(), 0u);
  EXPECT_EQ(std::memcmp(p, want.data(), 2 * kMiB), 0);
  engine.remove_session(*id);
  ::munmap(p, 2 * kMiB);
}

// A snapshot of no regions restores to nothing, and is complete at once: a session with nothing
// to fetch was never marked complete (no chunk ever came to say so), and finish() waited for
// good.
TEST_F(RestoreTest, ASnapshotOfNoRegionsRestoresToNothing) {
  ASSERT_TRUE(capture_regions(location("none"), {}, {}).ok());
  auto r = LazyRestore::start(location("none"), kf_, {});
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_TRUE((*r)->regions().empty());
  EXPECT_TRUE((*r)->wait_complete(std::chrono::seconds(10)).ok());
  EXPECT_TRUE((*r)->finish().ok());
}

// A zero chunk's UFFDIO_ZEROPAGE meets EAGAIN while the process has a REMOVE event queued
// (madvise DONTNEED on another region). It used to be dropped: prefetch's cursor had passed it
// and the restore never completed; a thread faulting on it slept for good.
class ZeroChunksDuringMadviseTest : public RestoreTest {
 protected:
  static constexpr size_t kHeap = 256 * kMiB, kScratch = 16 * kMiB;

  void SetUp() override {
    RestoreTest::SetUp();
    if (IsSkipped()) return;
    void* hp = testing::map_for_capture(kHeap, 12);
    void* sp = testing::map_for_capture(kScratch, 13);
    ASSERT_NE(hp, nullptr);
    ASSERT_NE(sp, nullptr);
    std::memset(sp, 0x11, kScratch);
    static_cast<char*>(hp)[kHeap - 1] = 1;  // all zero chunks but the last
    CaptureRegion regions[2] = {{"heap", hp, kHeap, PROT_READ | PROT_WRITE}, {"scratch", sp, kScratch, PROT_READ | PROT_WRITE}};
    auto rep = capture_regions(location("z"), std::span(regions, 2), {});
    ASSERT_TRUE(rep.ok()) << rep.error().message();
    ::munmap(hp, kHeap);
    ::munmap(sp, kScratch);
  }

  // One REMOVE event per page: the engine meets a pending mapping change again and again.
  static void drop_pages(char* scratch) {
    for (size_t off = 0; off < kScratch; off += 4096) ::madvise(scratch + off, 4096, MADV_DONTNEED);
  }

  // With the defect, faults on the heap still install its chunks one by one: let a test that
  // failed end rather than hang in finish().
  static void rescue(const char* heap) {
    for (size_t off = 0; off < kHeap; off += kDefaultChunkSize) (void)static_cast<const volatile char*>(heap)[off];
  }
};

TEST_F(ZeroChunksDuringMadviseTest, PrefetchInstallsEveryZeroChunk) {
  RestoreOptions opts;
  opts.prefetch = false;  // turned on by wait_complete(), while the pages are dropped
  auto r = LazyRestore::start(location("z"), kf_, opts);
  ASSERT_TRUE(r.ok()) << r.error().message();
  auto* heap = static_cast<char*>((*r)->region("heap")->address);
  auto* scratch = static_cast<char*>((*r)->region("scratch")->address);
  std::thread dropper([&] { drop_pages(scratch); });
  Status s = (*r)->wait_complete(std::chrono::seconds(60));
  dropper.join();
  EXPECT_TRUE(s.ok()) << s.error().message();
  if (!s.ok()) rescue(heap);
  ASSERT_TRUE((*r)->finish().ok());
  for (size_t off = 0; off + 1 < kHeap; off += 4096) ASSERT_EQ(heap[off], 0) << off;
  EXPECT_EQ(heap[kHeap - 1], 1);
  ::munmap(heap, kHeap);
  ::munmap(scratch, kScratch);
}

TEST_F(ZeroChunksDuringMadviseTest, FaultingThreadIsWoken) {
  RestoreOptions opts;
  opts.prefetch = false;  // only the faults install the heap's chunks
  auto r = LazyRestore::start(location("z"), kf_, opts);
  ASSERT_TRUE(r.ok()) << r.error().message();
  auto* heap = static_cast<char*>((*r)->region("heap")->address);
  auto* scratch = static_cast<char*>((*r)->region("scratch")->address);
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  std::thread dropper([&] { drop_pages(scratch); });
  std::thread toucher([&] {
    for (size_t off = 0; off < kHeap; off += kDefaultChunkSize) (void)static_cast<volatile char*>(heap)[off];
    std::lock_guard lock(mu);
    done = true;
    cv.notify_all();
  });
  dropper.join();
  bool woken;
  {
    std::unique_lock lock(mu);
    woken = cv.wait_for(lock, std::chrono::seconds(60), [&] { return done; });
  }
  EXPECT_TRUE(woken) << "a thread faulting on a zero chunk was never woken";
  if (!woken) (void)(*r)->wait_complete(std::chrono::seconds(60));  // prefetch's sweep wakes it
  toucher.join();
  ASSERT_TRUE((*r)->finish().ok());
  ::munmap(heap, kHeap);
  ::munmap(scratch, kScratch);
}

// A session whose chunk reader cannot be opened (out of descriptors) used to keep its uffd out
// of the engine's epoll set: the process's next munmap waited forever for someone to read the
// UNMAP event, as did its faults. Now its events are read, zero chunks are installed, and a
// fault on a stored chunk is poisoned. In a child: the defect hangs it, not the test.
sigjmp_buf g_bus_jump;
void on_bus(int) { siglongjmp(g_bus_jump, 1); }

TEST(FaultEngineSessionTest, SessionWithoutReaderReadsItsEvents) {
  KernelFeatures kf = probe_kernel();
  if (!kf.uffd_usable) GTEST_SKIP() << "userfaultfd unusable: " << kf.uffd_error;
  if (!kf.has_uffd_feature(UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMOVE)) {
    GTEST_SKIP() << "userfaultfd lacks UNMAP/REMOVE events";
  }
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    const size_t len = 16 * kDefaultChunkSize;
    Manifest m = testing::one_region_manifest("heap", RegionKind::kProcess, len, 16);
    m.data_length = 8 * kDefaultChunkSize;
    auto& chunks = m.regions[0].chunks;  // the first half zero chunks, the second stored ones
    for (uint32_t c = 8; c < 16; ++c) chunks[c] = ChunkInfo{Codec::kRaw, uint64_t{c - 8} * kDefaultChunkSize, kDefaultChunkSize};
    auto* p = static_cast<char*>(::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (p == MAP_FAILED) _exit(10);
    auto uffd = sys::Uffd::open(UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMOVE);
    if (!uffd.ok() || !uffd->register_missing(reinterpret_cast<uintptr_t>(p), len).ok()) _exit(11);
    fault::EngineOptions eo;
    eo.kill_on_failure = false;  // without UFFDIO_POISON the stored chunk is not touched below
    fault::FaultEngine engine(kf, eo);
    if (!engine.start().ok()) _exit(12);
    fault::SessionSpec spec;
    spec.name = "no-reader";
    spec.uffd = std::move(*uffd);
    spec.source = std::make_shared<testing::ManifestOnlySource>(m, "out of descriptors");
    spec.ranges = {fault::MappedRange{reinterpret_cast<uint64_t>(p), len, 0, 0}};
    spec.pid = ::getpid();
    if (!engine.add_session(std::move(spec)).ok()) _exit(13);
    if (::madvise(p + 15 * kDefaultChunkSize, kDefaultChunkSize, MADV_DONTNEED) != 0) _exit(16);  // a REMOVE event
    if (static_cast<volatile char*>(p)[4096] != 0) _exit(14);  // a zero chunk: a fault answered
    if (kf.has_uffd_poison()) {
      ::signal(SIGBUS, on_bus);
      if (sigsetjmp(g_bus_jump, 1) == 0) {
        (void)static_cast<volatile char*>(p)[9 * kDefaultChunkSize];  // stored: cannot be had
        _exit(15);
      }
    }
    if (::munmap(p, len) != 0) _exit(17);  // an UNMAP event
    _exit(0);
  }
  // Bounded: with the defect the child waits in munmap (or in its first fault) for good.
  int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  ASSERT_GE(pidfd, 0);
  pollfd pfd{pidfd, POLLIN, 0};
  int ready = ::poll(&pfd, 1, 20000);
  ::close(pidfd);
  if (ready == 0) ::kill(pid, SIGKILL);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  EXPECT_NE(ready, 0) << "the child still waits 20 s on: a fault or munmap nobody answers";
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
      << (WIFSIGNALED(status) ? "signal " + std::to_string(WTERMSIG(status)) : "exit " + std::to_string(WEXITSTATUS(status)));
}

// Without the right to use userfaultfd, the error says which right is missing and how to get it.
TEST(RestorePermissionTest, UnprivilegedUserGetsActionableError) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to switch to an unprivileged user";
  int pipefd[2];
  ASSERT_EQ(::pipe(pipefd), 0);
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::close(pipefd[0]);
    if (::setgid(65534) != 0 || ::setuid(65534) != 0) _exit(2);
    KernelFeatures kf = probe_kernel(ProbeOptions{"/tmp"});
    std::string msg = kf.uffd_usable ? "usable" : kf.uffd_error;
    (void)!::write(pipefd[1], msg.data(), msg.size());
    _exit(0);
  }
  ::close(pipefd[1]);
  std::string msg;
  char buf[512];
  ssize_t n;
  while ((n = ::read(pipefd[0], buf, sizeof buf)) > 0) msg.append(buf, static_cast<size_t>(n));
  ::close(pipefd[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  if (msg == "usable") GTEST_SKIP() << "this machine lets unprivileged users use userfaultfd";
  EXPECT_NE(msg.find("vm.unprivileged_userfaultfd"), std::string::npos) << msg;
  EXPECT_NE(msg.find("/dev/userfaultfd"), std::string::npos) << msg;
}

}  // namespace
}  // namespace lazymem
