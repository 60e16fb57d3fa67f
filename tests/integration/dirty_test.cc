// DirtyTracker against the real kernel: this process's memory, another process's through the
// uffd it hands over, writes racing with collect(). Every check that matters is a copy kept up
// to date from collect() alone and compared, every byte, with the memory it copies.
#include "lazymem/dirty.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <deque>
#include <fstream>
#include <random>
#include <optional>
#include <set>
#include <thread>
#include <tuple>

#include "../common/huge_pages.h"
#include "agent_client/unix_channel.h"
#include "lazymem/kernel_features.h"
#include "sys/uapi_compat.h"
#include "sys/uffd.h"

namespace lazymem {
namespace {

constexpr size_t kPage = 4096;

// Each test runs with each method (DirtyMethod): the same answers are expected of both.
class DirtyTestBase : public ::testing::Test {
 protected:
  void SetUp() override {
    kf_ = probe_kernel();
    if (!kf_.uffd_usable) GTEST_SKIP() << "userfaultfd unusable: " << kf_.uffd_error;
    if (method_ == DirtyMethod::kKernelMarks && !kf_.has_dirty_marks()) {
      GTEST_SKIP() << "kernel lacks UFFD_FEATURE_WP_ASYNC or PAGEMAP_SCAN (Linux 6.7)";
    }
    if (method_ == DirtyMethod::kWriteFaults && !kf_.has_write_protect_faults()) {
      GTEST_SKIP() << "kernel lacks userfaultfd write-protect faults (Linux 5.13)";
    }
  }
  DirtyTrackerOptions options(pid_t pid = 0) const { return {.pid = pid, .method = method_, .uffd = -1}; }
  Result<std::unique_ptr<DirtyTracker>> track(std::vector<AddressRange> ranges) {
    auto t = DirtyTracker::start(std::move(ranges), kf_, options());
    if (t.ok()) {
      EXPECT_EQ((*t)->method(), method_);
    }
    return t;
  }

  // Anonymous memory of `pages` pages; the first `touched` of every 4 are written (the rest
  // never touched: no page behind them yet).
  std::byte* map(size_t pages, uint64_t seed, int advice = MADV_NOHUGEPAGE) {
    void* p = ::mmap(nullptr, pages * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    EXPECT_NE(p, MAP_FAILED);
    ::madvise(p, pages * kPage, advice);
    auto* b = static_cast<std::byte*>(p);
    std::mt19937_64 rng(seed);
    for (size_t i = 0; i < pages; ++i) {
      if (i % 4 == 3) continue;
      for (size_t off = 0; off < kPage; off += 8) {
        uint64_t v = rng();
        std::memcpy(b + i * kPage + off, &v, 8);
      }
    }
    maps_.push_back({b, pages * kPage});
    return b;
  }
  void TearDown() override {
    for (auto [p, len] : maps_) ::munmap(p, len);
  }

  // The reported ranges as page indexes of the mapping at `base`.
  static std::set<size_t> pages_of(const std::vector<AddressRange>& ranges, const std::byte* base) {
    std::set<size_t> out;
    for (const AddressRange& r : ranges) {
      EXPECT_EQ(r.start % kPage, 0u);
      EXPECT_EQ(r.length % kPage, 0u);
      for (uintptr_t a = r.start; a < r.end(); a += kPage) out.insert((a - reinterpret_cast<uintptr_t>(base)) / kPage);
    }
    return out;
  }

  KernelFeatures kf_;
  DirtyMethod method_ = DirtyMethod::kKernelMarks;
  std::vector<std::pair<std::byte*, size_t>> maps_;
};

class DirtyTest : public DirtyTestBase, public ::testing::WithParamInterface<DirtyMethod> {
 protected:
  void SetUp() override {
    method_ = GetParam();
    DirtyTestBase::SetUp();
  }
};

std::string method_name(DirtyMethod m) { return m == DirtyMethod::kKernelMarks ? "KernelMarks" : "WriteFaults"; }

INSTANTIATE_TEST_SUITE_P(Methods, DirtyTest, ::testing::Values(DirtyMethod::kKernelMarks, DirtyMethod::kWriteFaults),
                         [](const auto& info) { return method_name(info.param); });

TEST_P(DirtyTest, ReportsExactlyThePagesWrittenAndNothingRead) {
  constexpr size_t kPages = 4096;  // 16 MiB
  std::byte* m = map(kPages, 1);
  auto t = track({{reinterpret_cast<uintptr_t>(m), kPages * kPage}});
  ASSERT_TRUE(t.ok()) << t.error().message();
  auto none = (*t)->collect();
  ASSERT_TRUE(none.ok()) << none.error().message();
  EXPECT_TRUE(none->empty()) << none->size() << " ranges reported before any write";

  std::mt19937_64 rng(2);
  for (int round = 0; round < 4; ++round) {
    std::set<size_t> written;
    for (int i = 0; i < 300; ++i) {
      size_t pg = rng() % kPages;  // touched and never-touched pages alike
      m[pg * kPage + rng() % kPage] = static_cast<std::byte>(rng());
      written.insert(pg);
    }
    const volatile std::byte* readable = m;
    for (int i = 0; i < 300; ++i) (void)readable[(rng() % kPages) * kPage];  // reads are not writes
    auto got = (*t)->collect();
    ASSERT_TRUE(got.ok()) << got.error().message();
    EXPECT_EQ(pages_of(*got, m), written) << "round " << round;
    for (size_t i = 1; i < got->size(); ++i) EXPECT_LT((*got)[i - 1].end(), (*got)[i].start) << "not sorted and merged";
  }
  auto after = (*t)->collect();
  ASSERT_TRUE(after.ok());
  EXPECT_TRUE(after->empty());
}

// kAuto takes the kernel's marks where they are, write faults where only those are (before
// 6.7), and says what is missing where neither is (before 5.13).
TEST(DirtyMethodTest, AutoTakesWhatTheKernelHas) {
  const KernelFeatures kf = probe_kernel();
  if (!kf.has_dirty_marks()) GTEST_SKIP() << "kernel lacks UFFD_FEATURE_WP_ASYNC or PAGEMAP_SCAN (Linux 6.7)";
  void* p = ::mmap(nullptr, 16 * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(p, MAP_FAILED);
  const std::vector<AddressRange> ranges = {{reinterpret_cast<uintptr_t>(p), 16 * kPage}};
  auto method = [&](const KernelFeatures& k) {
    auto t = DirtyTracker::start(ranges, k);
    return t.ok() ? std::optional((*t)->method()) : std::nullopt;
  };
  EXPECT_EQ(method(kf), DirtyMethod::kKernelMarks);
  KernelFeatures older = kf;
  older.pagemap_scan = false;  // 6.4-6.6: WP_ASYNC perhaps, no PAGEMAP_SCAN
  EXPECT_EQ(method(older), DirtyMethod::kWriteFaults);
  older.uffd_features &= ~(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED);  // 5.13-6.3
  EXPECT_EQ(method(older), DirtyMethod::kWriteFaults);
  older.uffd_features &= ~UFFD_FEATURE_PAGEFAULT_FLAG_WP;  // before 5.13
  auto none = DirtyTracker::start(ranges, older);
  ASSERT_FALSE(none.ok());
  EXPECT_NE(none.error().message().find("needs Linux 5.13"), std::string::npos) << none.error().message();
  ::munmap(p, 16 * kPage);
}

// The kernel's own writes into tracked memory (read(2) into it), in this process and in another:
// they go through and are reported. With write faults a user-mode-only uffd (as another
// process's used to be opened) fails them with EFAULT instead (found by review).
TEST_P(DirtyTest, TheKernelsWritesGoThroughAndAreReported) {
  constexpr size_t kPages = 16;
  std::byte* m = map(kPages, 10);
  int data[2], go[2], done[2];
  ASSERT_EQ(::pipe2(data, O_CLOEXEC), 0);
  ASSERT_EQ(::pipe2(go, O_CLOEXEC), 0);
  ASSERT_EQ(::pipe2(done, O_CLOEXEC), 0);
  ASSERT_EQ(::write(data[1], "hello", 5), 5);
  {
    auto t = track({{reinterpret_cast<uintptr_t>(m), kPages * kPage}});
    ASSERT_TRUE(t.ok()) << t.error().message();
    ASSERT_EQ(::read(data[0], m + 3 * kPage + 10, 5), 5) << std::strerror(errno);
    auto got = (*t)->collect();
    ASSERT_TRUE(got.ok()) << got.error().message();
    EXPECT_EQ(pages_of(*got, m), std::set<size_t>{3});
  }
  ASSERT_EQ(::write(data[1], "again", 5), 5);
  const pid_t kid = ::fork();
  ASSERT_GE(kid, 0);
  if (kid == 0) {
    ::alarm(20);
    char c;
    if (::read(go[0], &c, 1) != 1) _exit(2);
    const ssize_t n = ::read(data[0], m + 7 * kPage + 20, 5);
    if (::write(done[1], "d", 1) != 1) _exit(3);
    if (::read(go[0], &c, 1) != 1) _exit(4);  // until the parent has looked
    _exit(n == 5 ? 0 : 1);
  }
  auto t = DirtyTracker::start({{reinterpret_cast<uintptr_t>(m), kPages * kPage}}, kf_, options(kid));
  ASSERT_TRUE(t.ok()) << t.error().message();
  ASSERT_EQ(::write(go[1], "g", 1), 1);
  char c;
  ASSERT_EQ(::read(done[0], &c, 1), 1);
  auto got = (*t)->collect();
  ASSERT_TRUE(got.ok()) << got.error().message();
  EXPECT_EQ(pages_of(*got, m), std::set<size_t>{7});
  ASSERT_EQ(::write(go[1], "g", 1), 1);
  int status = 0;
  ASSERT_EQ(::waitpid(kid, &status, 0), kid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "the child's read(2) into tracked memory failed: " << status;
  for (int fd : {data[0], data[1], go[0], go[1], done[0], done[1]}) ::close(fd);
}

// A process tracking its own heap: the tracker's allocations land in tracked memory, and their
// writes fault. With write faults that hung (the thread not started yet, or waiting for the lock
// the faulting code held; found by review); in a child, so a hang ends as SIGALRM.
TEST_P(DirtyTest, AProcessCanTrackItsOwnHeap) {
  const pid_t kid = ::fork();
  ASSERT_GE(kid, 0);
  if (kid == 0) {
    ::alarm(20);
    std::vector<std::unique_ptr<std::vector<char>>> keep;
    for (int i = 0; i < 64; ++i) keep.push_back(std::make_unique<std::vector<char>>(4096, 'x'));  // a heap to track
    uintptr_t start = 0, end = 0;
    std::ifstream maps("/proc/self/maps");
    for (std::string line; std::getline(maps, line);) {
      if (line.find("[heap]") != std::string::npos && std::sscanf(line.c_str(), "%lx-%lx", &start, &end) == 2) break;
    }
    if (start == 0) _exit(77);  // no brk heap: a sanitizer's allocator maps its own
    auto t = DirtyTracker::start({{start, end - start}}, kf_, options());
    if (!t.ok()) _exit(3);
    for (int round = 0; round < 20; ++round) {
      for (auto& v : keep) (*v)[round] = 'y';                         // the heap written
      keep.push_back(std::make_unique<std::vector<char>>(512, 'z'));  // and allocated from
      auto got = (*t)->collect();
      if (!got.ok() || got->empty()) _exit(4);
    }
    _exit(0);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(kid, &status, 0), kid);
  if (WIFEXITED(status) && WEXITSTATUS(status) == 77) GTEST_SKIP() << "no [heap] mapping (a sanitizer's allocator?)";
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
}

// MADV_DONTNEED drops a page and, on anonymous memory, its write-protect mark with it: the page
// now reads as zeros, a change a copy must hear of although nothing was written.
TEST_P(DirtyTest, APageTheKernelDroppedIsReportedChanged) {
  constexpr size_t kPages = 64;
  std::byte* m = map(kPages, 3);
  auto t = track({{reinterpret_cast<uintptr_t>(m), kPages * kPage}});
  ASSERT_TRUE(t.ok()) << t.error().message();
  ASSERT_EQ(::madvise(m + 5 * kPage, 2 * kPage, MADV_DONTNEED), 0);
  auto got = (*t)->collect();
  ASSERT_TRUE(got.ok()) << got.error().message();
  std::set<size_t> pages = pages_of(*got, m);
  EXPECT_TRUE(pages.count(5) && pages.count(6)) << "dropped pages not reported";
  EXPECT_EQ(pages.size(), 2u);
  auto again = (*t)->collect();
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(again->empty()) << "a dropped page is reported once, not at every collect";
  m[5 * kPage] = std::byte{1};  // and written afterwards: reported again
  again = (*t)->collect();
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(pages_of(*again, m), std::set<size_t>{5});
}

// The pre-copy loop a migration runs, with a writer that never stops: a copy kept only from
// collect() must equal the memory once the writer stops and one last collect() is copied. A
// write the tracker re-armed without reporting would leave the copy stale, here. (It did, in
// nearly every run, while one PAGEMAP_SCAN call could fill the kernel's buffer: pagemap_scan.cc.)
class DirtyRaceTest : public DirtyTestBase, public ::testing::WithParamInterface<std::tuple<DirtyMethod, int>> {
 protected:
  void SetUp() override {
    method_ = std::get<0>(GetParam());
    DirtyTestBase::SetUp();
  }
  int advice() const { return std::get<1>(GetParam()); }
};

// This process's anonymous memory in transparent huge pages, KiB.
size_t anon_huge_kib() {
  std::ifstream in("/proc/self/smaps_rollup");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("AnonHugePages:", 0) == 0) return std::stoul(line.substr(14));
  }
  return 0;
}

TEST_P(DirtyRaceTest, WritesRacingWithCollectAreNeverLost) {
  constexpr size_t kPages = 8192;  // 32 MiB
  std::byte* m = map(kPages, 4, advice());
  if (advice() == MADV_HUGEPAGE && anon_huge_kib() == 0) {
    GTEST_SKIP() << "no transparent huge pages were given (THP off, or none free): the small-page run covers the rest";
  }
  auto t = track({{reinterpret_cast<uintptr_t>(m), kPages * kPage / 2},
                  {reinterpret_cast<uintptr_t>(m) + kPages * kPage / 2, kPages * kPage / 2}});
  ASSERT_TRUE(t.ok()) << t.error().message();
  std::vector<std::byte> copy(m, m + kPages * kPage);  // round 0: everything
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> writes{0};
  std::thread writer([&] {
    std::mt19937_64 rng(5);
    for (uint64_t n = 1; !stop.load(std::memory_order_relaxed); ++n) {
      size_t pg = rng() % kPages;
      std::atomic_ref<uint64_t>(*reinterpret_cast<uint64_t*>(m + pg * kPage + (rng() % (kPage / 8)) * 8))
          .store(n, std::memory_order_relaxed);
      if (n % 64 == 0) ::madvise(m + (rng() % kPages) * kPage, kPage, MADV_DONTNEED);
      writes.store(n, std::memory_order_relaxed);
    }
  });
  auto copy_dirty = [&] {
    auto d = (*t)->collect();
    EXPECT_TRUE(d.ok()) << d.error().message();
    if (!d.ok()) return size_t{0};
    size_t pages = 0;
    for (const AddressRange& r : *d) {
      const size_t off = r.start - reinterpret_cast<uintptr_t>(m);
      for (size_t i = 0; i < r.length; i += 8) {  // word by word: the writer stores whole words
        uint64_t v = std::atomic_ref<uint64_t>(*reinterpret_cast<uint64_t*>(m + off + i)).load(std::memory_order_relaxed);
        std::memcpy(copy.data() + off + i, &v, 8);
      }
      pages += r.length / kPage;
    }
    return pages;
  };
  size_t rounds = 0;  // as many as the writer's 100000 writes take (a few hundred here)
  for (; writes.load() < 100000; ++rounds) copy_dirty();
  stop = true;
  writer.join();
  copy_dirty();
  size_t differing = 0;
  for (size_t pg = 0; pg < kPages; ++pg) differing += std::memcmp(copy.data() + pg * kPage, m + pg * kPage, kPage) != 0;
  EXPECT_EQ(differing, 0u) << "pages changed but never reported, after " << rounds << " rounds and " << writes.load()
                           << " writes";
  EXPECT_EQ(copy_dirty(), 0u) << "quiet memory reported dirty";
}

// Small pages, and huge pages where the kernel gives them (it splits what it must to track).
INSTANTIATE_TEST_SUITE_P(PageSizes, DirtyRaceTest,
                         ::testing::Combine(::testing::Values(DirtyMethod::kKernelMarks, DirtyMethod::kWriteFaults),
                                            ::testing::Values(MADV_NOHUGEPAGE, MADV_HUGEPAGE)),
                         [](const auto& info) {
                           return method_name(std::get<0>(info.param)) +
                                  (std::get<1>(info.param) == MADV_HUGEPAGE ? "HugePages" : "SmallPages");
                         });

TEST_P(DirtyTest, SaysWhatIsWrongWithTheRangesOrTheUffd) {
  std::byte* m = map(16, 6);
  const auto at = reinterpret_cast<uintptr_t>(m);
  auto msg = [&](std::vector<AddressRange> r, std::optional<DirtyTrackerOptions> given = std::nullopt) {
    auto t = DirtyTracker::start(std::move(r), kf_, given.value_or(options()));
    return t.ok() ? std::string("started") : t.error().message();
  };
  EXPECT_NE(msg({}).find("no ranges"), std::string::npos);
  EXPECT_NE(msg({{at + 1, kPage}}).find("not page-aligned"), std::string::npos);
  EXPECT_NE(msg({{at, 0}}).find("empty"), std::string::npos);
  EXPECT_NE(msg({{at, 4 * kPage}, {at + kPage, kPage}}).find("overlap"), std::string::npos);
  EXPECT_NE(msg({{at, kPage}}, options(999999999)).find("no process 999999999"), std::string::npos)
      << msg({{at, kPage}}, options(999999999));  // (a range it does not map: migrate_process_test)
  auto plain = sys::Uffd::open(0);  // its handshake asked for no write-protect features
  ASSERT_TRUE(plain.ok());
  DirtyTrackerOptions given = options();
  given.uffd = plain->fd();
  if (method_ == DirtyMethod::kWriteFaults) {
    EXPECT_NE(msg({{at, kPage}}, given).find("opens its own userfaultfd"), std::string::npos) << msg({{at, kPage}}, given);
  } else {
    EXPECT_NE(msg({{at, kPage}}, given).find("opened without UFFD_FEATURE_WP_ASYNC"), std::string::npos);
    given.uffd = STDIN_FILENO;
    EXPECT_NE(msg({{at, kPage}}, given).find("is not a userfaultfd"), std::string::npos);
    // One whose events nobody would read: madvise, munmap or fork of the memory would block.
    auto evented = sys::Uffd::open(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_EVENT_REMOVE,
                                   UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_EVENT_REMOVE);
    ASSERT_TRUE(evented.ok()) << evented.error().message();
    given.uffd = evented->fd();
    EXPECT_NE(msg({{at, kPage}}, given).find("also asks for UFFD_FEATURE_EVENT_"), std::string::npos)
        << msg({{at, kPage}}, given);
  }
  // Memory not mapped, and shared memory (its pages change through its other mappings and its
  // file, which this mapping's write-protect never sees).
  void* hole = ::mmap(nullptr, 2 * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(hole, MAP_FAILED);
  ::munmap(static_cast<std::byte*>(hole) + kPage, kPage);
  EXPECT_NE(msg({{reinterpret_cast<uintptr_t>(hole), 2 * kPage}}).find("is not mapped in this process"),
            std::string::npos);
  ::munmap(hole, kPage);
  void* shared = ::mmap(nullptr, 4 * kPage, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(shared, MAP_FAILED);
  EXPECT_NE(msg({{reinterpret_cast<uintptr_t>(shared), 4 * kPage}}).find("is a shared mapping"), std::string::npos);
  ::munmap(shared, 4 * kPage);
  // Memory mapped afresh over a tracked range has no marks: collect() says so, not "clean".
  auto t = track({{at, 16 * kPage}});
  ASSERT_TRUE(t.ok()) << t.error().message();
  ASSERT_NE(::mmap(m + 4 * kPage, kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0),
            MAP_FAILED);
  m[4 * kPage] = std::byte{1};
  auto got = (*t)->collect();
  ASSERT_FALSE(got.ok());
  EXPECT_NE(got.error().message().find("unmapped and mapped again"), std::string::npos) << got.error().message();
}

// The VmFlags of the mapping holding `addr` (/proc/self/smaps): "um" registered for missing
// faults, "uw" for write-protect.
std::string vm_flags_at(uintptr_t addr) {
  std::ifstream in("/proc/self/smaps");
  bool inside = false;
  for (std::string line; std::getline(in, line);) {
    unsigned long a = 0, b = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx ", &a, &b) == 2) inside = a <= addr && addr < b;
    if (inside && line.rfind("VmFlags:", 0) == 0) return line;
  }
  return "";
}

// Huge-page memory (MAP_HUGETLB, as VMs map guest memory): the kernel's marks report a written
// huge page whole; a range cutting through huge pages, and write-fault tracking (which lifts
// 4 KiB pages: the kernel refused it with a bare EINVAL mid-capture), are refused up front,
// saying what to do.
TEST_P(DirtyTest, HugePageMemoryIsTrackedByWholePagesOrRefusedSayingWhy) {
  testing::HugePages huge(4);
  if (!huge.unavailable().empty()) GTEST_SKIP() << huge.unavailable();
  const size_t len = 4 * testing::kHugePage;
  void* p = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
  if (p == MAP_FAILED) GTEST_SKIP() << "cannot map 4 huge pages: " << std::strerror(errno);
  auto* m = static_cast<std::byte*>(p);
  std::memset(m, 0x5a, len);
  const auto at = reinterpret_cast<uintptr_t>(m);
  if (method_ == DirtyMethod::kWriteFaults) {
    auto t = track({{at, len}});
    ASSERT_FALSE(t.ok());
    EXPECT_EQ(t.error().code(), Errc::kUnsupported);
    EXPECT_NE(t.error().message().find("huge-page memory (2048 KiB pages), which write-fault tracking does not take"),
              std::string::npos)
        << t.error().message();
    EXPECT_NE(t.error().message().find("kernel-marks"), std::string::npos) << t.error().message();
  } else {
    auto cut = track({{at + kPage, testing::kHugePage}});
    ASSERT_FALSE(cut.ok());
    EXPECT_EQ(cut.error().code(), Errc::kInvalidArgument);
    EXPECT_NE(cut.error().message().find("cuts through huge pages (2048 KiB)"), std::string::npos)
        << cut.error().message();
    auto t = track({{at, len}});
    ASSERT_TRUE(t.ok()) << t.error().message();
    auto none = (*t)->collect();
    ASSERT_TRUE(none.ok()) << none.error().message();
    EXPECT_TRUE(none->empty());
    m[2 * testing::kHugePage + 12345] = std::byte{1};  // one byte of page 2
    auto got = (*t)->collect();
    ASSERT_TRUE(got.ok()) << got.error().message();
    ASSERT_EQ(got->size(), 1u);
    EXPECT_EQ((*got)[0].start, at + 2 * testing::kHugePage);
    EXPECT_EQ((*got)[0].length, testing::kHugePage);
  }
  ::munmap(p, len);
}

// Memory a lazy restore's uffd still serves (registered for missing faults there) cannot be
// tracked, and a failed start leaves that registration as it was.
TEST_P(DirtyTest, MemoryAnotherUffdServesIsRefusedAndLeftAsItWas) {
  std::byte* m = map(16, 9);
  const auto at = reinterpret_cast<uintptr_t>(m);
  auto restore_uffd = sys::Uffd::open(0);
  ASSERT_TRUE(restore_uffd.ok());
  ASSERT_TRUE(restore_uffd->register_missing(at + 8 * kPage, 8 * kPage).ok());
  ASSERT_NE(vm_flags_at(at + 8 * kPage).find(" um"), std::string::npos) << vm_flags_at(at + 8 * kPage);
  // Through a uffd the caller keeps open: closing the tracker's copy does not undo its work.
  auto mine = sys::Uffd::open(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED,
                              UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED);
  ASSERT_TRUE(mine.ok());
  DirtyTrackerOptions o = options();
  if (method_ == DirtyMethod::kKernelMarks) o.uffd = mine->fd();  // the other opens its own
  auto t = DirtyTracker::start({{at, 8 * kPage}, {at + 8 * kPage, 8 * kPage}}, kf_, o);
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.error().message().find("registered with another userfaultfd"), std::string::npos) << t.error().message();
  EXPECT_NE(vm_flags_at(at + 8 * kPage).find(" um"), std::string::npos) << "the restore's registration was dropped";
  EXPECT_EQ(vm_flags_at(at).find(" uw"), std::string::npos) << "the range registered before the refusal was left";
}

// Another process's memory, tracked through the uffd it opened and handed over (as a workload
// being migrated would; by write faults, through one the tracker makes it open): its writes and
// drops, round by round, copied with process_vm_readv.
TEST_P(DirtyTest, AnotherProcessTrackedThroughItsUffd) {
  const bool hand_over = method_ == DirtyMethod::kKernelMarks;
  constexpr size_t kPages = 4096;
  std::byte* m = map(kPages, 7);
  int sv[2], cmd[2], ack[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  ASSERT_EQ(::pipe2(cmd, O_CLOEXEC), 0);
  ASSERT_EQ(::pipe2(ack, O_CLOEXEC), 0);
  pid_t kid = ::fork();
  ASSERT_GE(kid, 0);
  if (kid == 0) {
    ::close(cmd[1]);  // the parent's end alone: its close is this loop's end
    auto u = hand_over ? sys::Uffd::open(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED,
                                         UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED)
                       : sys::Uffd::open(0);
    if (!u.ok()) _exit(2);
    const std::byte one{1};
    if (!agent::send_with_fd(sv[1], {&one, 1}, hand_over ? u->fd() : -1).ok()) _exit(3);
    std::mt19937_64 rng(8);
    for (char c; ::read(cmd[0], &c, 1) == 1;) {  // each command: a round of writes and drops
      for (int i = 0; i < 200; ++i) m[(rng() % kPages) * kPage + rng() % kPage] = static_cast<std::byte>(rng() | 1);
      for (int i = 0; i < 5; ++i) ::madvise(m + (rng() % kPages) * kPage, kPage, MADV_DONTNEED);
      if (::write(ack[1], &c, 1) != 1) _exit(4);
    }
    _exit(0);
  }
  ::close(sv[1]);
  ::close(cmd[0]);
  ::close(ack[1]);
  net::FrameBuffer buf;
  std::deque<sys::UniqueFd> fds;
  if (hand_over) {
    while (fds.empty()) ASSERT_TRUE(agent::recv_some(sv[0], buf, fds, 10000).ok());
  } else {
    char ready;
    ASSERT_EQ(::read(sv[0], &ready, 1), 1);
  }
  DirtyTrackerOptions o = options(kid);
  if (hand_over) o.uffd = fds.front().get();
  auto t = DirtyTracker::start({{reinterpret_cast<uintptr_t>(m), kPages * kPage}}, kf_, o);
  ASSERT_TRUE(t.ok()) << t.error().message();
  fds.clear();  // the tracker holds its own duplicate
  std::vector<std::byte> copy(kPages * kPage);
  auto read_child = [&](uintptr_t at, size_t len) {
    iovec local{copy.data() + (at - reinterpret_cast<uintptr_t>(m)), len}, remote{reinterpret_cast<void*>(at), len};
    ASSERT_EQ(::process_vm_readv(kid, &local, 1, &remote, 1, 0), static_cast<ssize_t>(len)) << strerror(errno) << " at " << at;
  };
  read_child(reinterpret_cast<uintptr_t>(m), kPages * kPage);
  for (int round = 0; round < 5; ++round) {
    char c = 'w';
    ASSERT_EQ(::write(cmd[1], &c, 1), 1);
    ASSERT_EQ(::read(ack[0], &c, 1), 1);  // the child is quiet until the next command
    auto d = (*t)->collect();
    ASSERT_TRUE(d.ok()) << d.error().message();
    EXPECT_FALSE(d->empty());
    size_t pages = 0;
    for (const AddressRange& r : *d) {
      read_child(r.start, r.length);
      pages += r.length / kPage;
    }
    EXPECT_LE(pages, 205u) << "more pages reported than the child wrote and dropped";
    std::vector<std::byte> now(kPages * kPage);
    iovec local{now.data(), now.size()}, remote{m, now.size()};
    ASSERT_EQ(::process_vm_readv(kid, &local, 1, &remote, 1, 0), static_cast<ssize_t>(now.size()));
    size_t differing = 0;
    for (size_t pg = 0; pg < kPages; ++pg) differing += std::memcmp(copy.data() + pg * kPage, now.data() + pg * kPage, kPage) != 0;
    EXPECT_EQ(differing, 0u) << "round " << round << ": the child's pages changed but were not reported";
  }
  ::close(cmd[1]);
  int status = 0;
  ASSERT_EQ(::waitpid(kid, &status, 0), kid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  auto gone = (*t)->collect();
  ASSERT_FALSE(gone.ok()) << "collect() on an exited process said nothing";
  EXPECT_EQ(gone.error().code(), Errc::kNotFound);
  EXPECT_NE(gone.error().message().find("has exited"), std::string::npos) << gone.error().message();
  ::close(sv[0]);
  ::close(ack[0]);
}

}  // namespace
}  // namespace lazymem
