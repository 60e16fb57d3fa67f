// Restoring into huge pages (hugetlbfs, as a Firecracker VM backed by huge pages): the engine
// installs each 2 MiB page whole, from every chunk of it. Every byte compared; faults with
// prefetch off fetch one page and no more; MADV_DONTNEED and mremap during the restore; a page
// that cannot be had fails whole. Each restore runs in a child, so a defect that leaves a
// fault unanswered fails the test instead of hanging it.
#include <gtest/gtest.h>
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <thread>
#include <vector>

#include "../common/huge_pages.h"
#include "../common/manifest_source.h"
#include "../common/test_data.h"
#include "fault/fault_engine.h"
#include "lazymem/kernel_features.h"
#include "lazymem/restore.h"
#include "lazymem/snapshot.h"
#include "source.h"
#include "sys/process_maps.h"
#include "sys/uffd.h"

namespace lazymem {
namespace {

using testing::kHugePage;

// Runs `body` in a child and returns its exit code, or a failure if it did not end within
// 60 s (killed then) or died of a signal.
::testing::AssertionResult exits_zero(const std::function<int()>& body) {
  pid_t pid = ::fork();
  if (pid < 0) return ::testing::AssertionFailure() << "fork: " << std::strerror(errno);
  if (pid == 0) _exit(body());
  int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  pollfd pfd{pidfd, POLLIN, 0};
  const int ready = ::poll(&pfd, 1, 60000);
  ::close(pidfd);
  if (ready == 0) ::kill(pid, SIGKILL);
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (ready == 0) return ::testing::AssertionFailure() << "the child still ran after 60 s: a fault left unanswered?";
  if (WIFSIGNALED(status)) return ::testing::AssertionFailure() << "the child died of signal " << WTERMSIG(status);
  if (WEXITSTATUS(status) != 0) return ::testing::AssertionFailure() << "the child exited " << WEXITSTATUS(status);
  return ::testing::AssertionSuccess();
}

// Huge pages mapped private and anonymous, as Firecracker maps guest memory with huge pages.
std::byte* map_huge(size_t len) {
  void* p = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
  return p == MAP_FAILED ? nullptr : static_cast<std::byte*>(p);
}

class HugePagesTest : public ::testing::Test {
 protected:
  static constexpr size_t kPages = 32;
  static constexpr size_t kLen = kPages * kHugePage;

  void SetUp() override {
    kf_ = probe_kernel();
    if (!kf_.uffd_usable) GTEST_SKIP() << "userfaultfd unusable: " << kf_.uffd_error;
    // The restore's pages, and two more for the mremap test's destination.
    huge_ = std::make_unique<testing::HugePages>(kPages + 2);
    if (!huge_->unavailable().empty()) GTEST_SKIP() << huge_->unavailable();
    std::byte* probe = map_huge(kLen);
    if (probe == nullptr) GTEST_SKIP() << "cannot map " << kPages << " huge pages: " << std::strerror(errno);
    ::munmap(probe, kLen);
    // Mixed content; page 5 all zeros (a page of zero chunks is installed too: no zero page
    // ioctl for huge pages), and in page 2 a zero chunk and a zero 4 KiB page amid data.
    image_.resize(kLen);
    testing::fill_mixed(image_.data(), kLen, 71);
    std::memset(image_.data() + 5 * kHugePage, 0, kHugePage);
    std::memset(image_.data() + 2 * kHugePage + 3 * kDefaultChunkSize, 0, kDefaultChunkSize);
    std::memset(image_.data() + 2 * kHugePage + 9 * 4096, 0, 4096);
    const std::string raw = dir_.path() + "/guest.mem";
    std::ofstream(raw, std::ios::binary).write(reinterpret_cast<const char*>(image_.data()), kLen);
    location_ = dir_.path() + "/vm";
    auto rep = capture_raw_file(location_, raw, {});
    ASSERT_TRUE(rep.ok()) << rep.error().message();
  }

  // In the child: huge pages registered with a uffd and served by an engine of the child's own
  // with `prefetch`; then `body` (its return is the exit code).
  int serve(bool prefetch, const std::function<int(std::byte*, fault::FaultEngine&, fault::SessionId)>& body) {
    std::byte* mem = map_huge(kLen);
    if (mem == nullptr) return 20;
    auto uffd = sys::Uffd::open(UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMAP);
    if (!uffd.ok() || !uffd->register_missing(reinterpret_cast<uintptr_t>(mem), kLen).ok()) return 21;
    auto source = open_chunk_source(location_, RestoreOptions{});
    if (!source.ok()) return 22;
    fault::FaultEngine engine(kf_);
    if (!engine.start().ok()) return 23;
    fault::SessionSpec spec;
    spec.name = "huge";
    spec.uffd = std::move(*uffd);
    spec.source = std::move(*source);
    spec.ranges = {fault::MappedRange{reinterpret_cast<uint64_t>(mem), kLen, 0, 0}};
    spec.page_size = kHugePage;
    spec.pid = ::getpid();
    spec.prefetch = prefetch;
    auto id = engine.add_session(std::move(spec));
    if (!id.ok()) return 24;
    const int rc = body(mem, engine, *id);
    engine.remove_session(*id);
    return rc;
  }

  // Whether page `page` of `mem` holds that page of the image, every byte.
  bool page_matches(const std::byte* mem, size_t page) const {
    return std::memcmp(mem + page * kHugePage, image_.data() + page * kHugePage, kHugePage) == 0;
  }

  KernelFeatures kf_;
  std::unique_ptr<testing::HugePages> huge_;
  testing::ScratchDir dir_;
  std::vector<std::byte> image_;
  std::string location_;
};

TEST_F(HugePagesTest, EveryByteOfEveryPage) {
  EXPECT_TRUE(exits_zero([&] {
    return serve(true, [&](std::byte* mem, fault::FaultEngine& engine, fault::SessionId id) {
      // Out of order, as a guest touches its memory; then all of it.
      for (size_t page : {3, 0, 7, 5}) (void)*reinterpret_cast<volatile char*>(mem + page * kHugePage + 4096 * page);
      for (size_t page = 0; page < kPages; ++page)
        if (!page_matches(mem, page)) return 30 + static_cast<int>(page);
      if (!engine.wait_complete(id, std::chrono::seconds(20)).ok()) return 40;
      auto info = engine.session_info(id);
      if (!info || info->chunks_present != info->chunks_total || info->failed) return 41;
      return 0;
    });
  }));
}

// Faults all over memory while prefetch runs: each moves prefetch to the page after its own,
// and the page prefetch was filling must still be finished first, not left holding a 2 MiB
// buffer until the sweep gets there (one more per fault: as much as guest memory, once).
TEST_F(HugePagesTest, FaultsElsewhereLeaveNoPagesHalfGathered) {
  EXPECT_TRUE(exits_zero([&] {
    return serve(true, [&](std::byte* mem, fault::FaultEngine& engine, fault::SessionId id) {
      std::vector<size_t> order(kPages);
      for (size_t i = 0; i < kPages; ++i) order[i] = i;
      std::shuffle(order.begin(), order.end(), std::mt19937_64(5));
      uint64_t most = 0;
      for (size_t page : order) {
        (void)*reinterpret_cast<volatile char*>(mem + page * kHugePage + 4096 * page);
        if (auto info = engine.session_info(id)) most = std::max(most, info->pages_gathering);
      }
      for (size_t page = 0; page < kPages; ++page)
        if (!page_matches(mem, page)) return 30 + static_cast<int>(page);
      if (!engine.wait_complete(id, std::chrono::seconds(20)).ok()) return 40;
      // A page a fault is on, one whose install waits, the ones prefetch fills (its window spans
      // two), and one the engine had not yet counted gone when asked.
      if (most > 6) return 50 + static_cast<int>(most);
      return 0;
    });
  }));
}

// Without prefetch, a fault brings its page and nothing else: every chunk of that page and no
// other, the page whole at once.
TEST_F(HugePagesTest, AFaultBringsItsWholePageAndNoMore) {
  EXPECT_TRUE(exits_zero([&] {
    return serve(false, [&](std::byte* mem, fault::FaultEngine& engine, fault::SessionId id) {
      (void)*reinterpret_cast<volatile char*>(mem + 3 * kHugePage + 12345);
      // Counted present before the thread was woken.
      auto info = engine.session_info(id);
      if (!info) return 30;
      if (info->chunks_present != kHugePage / kDefaultChunkSize) return 31;
      unsigned char resident[kLen / 4096];
      if (::mincore(mem, kLen, resident) != 0) return 32;
      for (size_t i = 0; i < kLen / 4096; ++i) {
        const bool in_page_3 = i / (kHugePage / 4096) == 3;
        if (static_cast<bool>(resident[i] & 1) != in_page_3) return 33;
      }
      if (!page_matches(mem, 3)) return 34;
      for (size_t page = 0; page < kPages; ++page)
        if (!page_matches(mem, page)) return 40 + static_cast<int>(page);
      return 0;
    });
  }));
}

// Threads fault on one page at once, so the engine reads their faults together; the page (all
// zeros: installed as the first fault is handled) is installed once. The faults read with the
// first used to find the page present and fetch it all again, each of them (for the session's
// last page: after its reader was let go, so that the fetch never went out and failed).
TEST_F(HugePagesTest, FaultsReadTogetherInstallTheirPageOnce) {
  EXPECT_TRUE(exits_zero([&] {
    return serve(false, [&](std::byte* mem, fault::FaultEngine& engine, fault::SessionId id) {
      std::atomic<bool> go{false};
      std::vector<std::thread> threads;
      for (size_t i = 0; i < 8; ++i) {
        threads.emplace_back([&, i] {
          while (!go.load()) {
          }
          (void)*reinterpret_cast<volatile char*>(mem + 5 * kHugePage + 4096 * 7 * i);
        });
      }
      go = true;
      for (auto& t : threads) t.join();
      // A fault after theirs: once it is answered, the engine has handled all of theirs.
      (void)*reinterpret_cast<volatile char*>(mem);
      auto info = engine.session_info(id);
      if (!info) return 30;
      const auto& st = info->stats.regions.at(0);
      if (st.pages_present() != 2 * kHugePage / 4096) return 31;  // pages 5 and 0, once each
      if (info->chunks_present != 2 * kHugePage / kDefaultChunkSize) return 32;
      if (!page_matches(mem, 5) || !page_matches(mem, 0)) return 33;
      return 0;
    });
  }));
}

// The process drops a page (MADV_DONTNEED: zeros from then on) and unmaps two before they are
// restored: the dropped one reads zeros, the rest their bytes. (Not mremap: moving part of a
// private hugetlb mapping leaks its huge page reservations on Linux 6.18, UFFD or not; see
// docs/design-notes.md.)
TEST_F(HugePagesTest, DontneedAndMunmapDuringRestore) {
  if (!kf_.has_uffd_feature(UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP)) {
    GTEST_SKIP() << "userfaultfd lacks REMOVE/UNMAP events";
  }
  EXPECT_TRUE(exits_zero([&] {
    return serve(false, [&](std::byte* mem, fault::FaultEngine& engine, fault::SessionId id) {
      if (::madvise(mem + 1 * kHugePage, kHugePage, MADV_DONTNEED) != 0) return 30;
      if (::munmap(mem + 2 * kHugePage, 2 * kHugePage) != 0) return 31;
      if (!testing::all_zero(mem + 1 * kHugePage, kHugePage)) return 33;
      for (size_t page : {0, 4, 5, 6, 7})
        if (!page_matches(mem, page)) return 40 + static_cast<int>(page);
      engine.set_prefetch(id, true);  // the rest, which lands nowhere: complete all the same
      if (!engine.wait_complete(id, std::chrono::seconds(20)).ok()) return 50;
      return 0;
    });
  }));
}

sigjmp_buf g_bus_jump;
void on_bus(int) { siglongjmp(g_bus_jump, 1); }

// Whether reading `p` raises SIGBUS (with on_bus installed).
bool read_raises_sigbus(const std::byte* p) {
  if (sigsetjmp(g_bus_jump, 1) != 0) return true;
  (void)*reinterpret_cast<const volatile char*>(p);
  return false;
}

// A page one of whose chunks cannot be had fails whole (SIGBUS at the access, never a page with
// a hole of zeros in it), and the session settles; a page of zero chunks alone needs nothing
// fetched and is installed.
TEST_F(HugePagesTest, APageThatCannotBeHadFailsWhole) {
  if (!kf_.has_uffd_poison()) GTEST_SKIP() << "no UFFDIO_POISON: the process would be killed, not told";
  const uint64_t len = 2 * kHugePage;
  const uint32_t per_page = kHugePage / kDefaultChunkSize;
  Manifest m = testing::one_region_manifest("memory", RegionKind::kRawFile, len, 2 * per_page);
  m.regions[0].chunks[per_page + 5] = ChunkInfo{Codec::kRaw, 0, kDefaultChunkSize};  // page 1: one stored chunk
  m.data_length = kDefaultChunkSize;
  EXPECT_TRUE(exits_zero([&] {
    std::byte* mem = map_huge(len);
    if (mem == nullptr) return 20;
    auto uffd = sys::Uffd::open(0);
    if (!uffd.ok() || !uffd->register_missing(reinterpret_cast<uintptr_t>(mem), len).ok()) return 21;
    fault::FaultEngine engine(kf_);
    if (!engine.start().ok()) return 23;
    fault::SessionSpec spec;
    spec.name = "huge";
    spec.uffd = std::move(*uffd);
    spec.source = std::make_shared<testing::ManifestOnlySource>(m, "no reader in this test");
    spec.ranges = {fault::MappedRange{reinterpret_cast<uint64_t>(mem), len, 0, 0}};
    spec.page_size = kHugePage;
    spec.pid = ::getpid();
    auto id = engine.add_session(std::move(spec));
    if (!id.ok()) return 24;
    if (!testing::all_zero(mem, kHugePage)) return 30;
    ::signal(SIGBUS, on_bus);
    for (size_t off : {size_t{0}, size_t{5} * kDefaultChunkSize, kHugePage - 1}) {
      if (!read_raises_sigbus(mem + kHugePage + off)) return 31;  // read something: a page with a hole
    }
    // Settled, failed: nothing of the failed page is left waiting to be installed.
    Status settled = engine.wait_complete(*id, std::chrono::seconds(20), fault::FaultEngine::Wait::kSettled);
    if (settled.ok() || settled.error().code() == Errc::kTimeout) return 32;
    return 0;
  }));
}

// What a huge-page session needs of its ranges and of the snapshot is checked when it is added.
TEST(HugePageSessionTest, WhatCannotBeInstalledWholeIsRefused) {
  KernelFeatures kf;
  fault::FaultEngine engine(kf);
  auto session = [&](uint64_t page_size, uint64_t start, uint64_t len, uint64_t offset, uint32_t chunk_size) {
    Manifest m = testing::one_region_manifest("memory", RegionKind::kRawFile, 8 * kHugePage, 8 * kHugePage / chunk_size);
    m.chunk_size = chunk_size;
    fault::SessionSpec spec;
    spec.source = std::make_shared<testing::ManifestOnlySource>(m, "not opened");
    spec.ranges = {fault::MappedRange{start, len, 0, offset}};
    spec.page_size = page_size;
    return engine.add_session(std::move(spec));
  };
  const uint64_t at = uint64_t{1} << 40;
  auto misaligned_start = session(kHugePage, at + 4096, kHugePage, 0, kDefaultChunkSize);
  ASSERT_FALSE(misaligned_start.ok());
  EXPECT_NE(misaligned_start.error().message().find("not on 2048 KiB page boundaries"), std::string::npos)
      << misaligned_start.error().message();
  EXPECT_FALSE(session(kHugePage, at, kHugePage + 4096, 0, kDefaultChunkSize).ok());  // length
  EXPECT_FALSE(session(kHugePage, at, kHugePage, 65536, kDefaultChunkSize).ok());     // snapshot offset
  auto big_chunks = session(kHugePage, at, kHugePage, 0, 4 << 20);
  ASSERT_FALSE(big_chunks.ok());
  EXPECT_NE(big_chunks.error().message().find("chunks (4096 KiB) are larger than the 2048 KiB pages"),
            std::string::npos)
      << big_chunks.error().message();
  EXPECT_FALSE(session(3000, at, kHugePage, 0, kDefaultChunkSize).ok());
  EXPECT_FALSE(session(uint64_t{1} << 30, at, uint64_t{1} << 30, 0, kDefaultChunkSize).ok());  // past the limit
  EXPECT_TRUE(session(kHugePage, at, 2 * kHugePage, kHugePage, kDefaultChunkSize).ok());
}

// A process's own huge-page memory, captured beside ordinary memory: the snapshot says which
// region was on huge pages, and a lazy restore maps that one on huge pages again (or, asked to,
// on ordinary ones), each through a session of its page size; every byte compared. In a child:
// the restore maps at the captured addresses.
TEST(HugePageRestoreTest, ARegionCapturedFromHugePagesIsRestoredOntoThem) {
  const KernelFeatures kf = probe_kernel();
  if (!kf.uffd_usable) GTEST_SKIP() << "userfaultfd unusable: " << kf.uffd_error;
  if (!kf.has_uffd_feature(UFFD_FEATURE_MISSING_HUGETLBFS)) GTEST_SKIP() << "userfaultfd lacks MISSING_HUGETLBFS";
  testing::HugePages pages(8);
  if (!pages.unavailable().empty()) GTEST_SKIP() << pages.unavailable();
  constexpr size_t kHugeLen = 4 * kHugePage, kSmallLen = 1 << 20;
  for (bool huge_pages : {true, false}) {
    SCOPED_TRACE(huge_pages ? "onto huge pages" : "onto ordinary pages");
    auto capture_and_restore = [&] {
      testing::ScratchDir dir;
      // An aligned address of its own for the huge pages (mmap aligns MAP_HUGETLB memory).
      std::byte* huge = map_huge(kHugeLen);
      auto* small = static_cast<std::byte*>(testing::map_for_capture(kSmallLen, 44));
      if (huge == nullptr || small == nullptr) return 20;
      testing::fill_mixed(huge, kHugeLen, 45);
      std::memset(huge + kHugePage, 0, kHugePage);  // a page of zeros among them
      testing::fill_mixed(small, kSmallLen, 46);
      const std::vector<std::byte> want_huge(huge, huge + kHugeLen), want_small(small, small + kSmallLen);
      CaptureRegion regions[2] = {{"guest", huge, kHugeLen, PROT_READ | PROT_WRITE},
                                  {"heap", small, kSmallLen, PROT_READ | PROT_WRITE}};
      const std::string loc = dir.path() + "/mixed";
      if (!capture_regions(loc, std::span(regions, 2), {}).ok()) return 21;
      auto manifest = read_manifest(loc);
      if (!manifest.ok() || manifest->regions.size() != 2) return 22;
      if (manifest->regions[0].huge_page_size != kHugePage || manifest->regions[1].huge_page_size != 0) return 23;
      ::munmap(huge, kHugeLen);
      ::munmap(small, kSmallLen);
      RestoreOptions o;
      o.huge_pages = huge_pages;
      auto r = LazyRestore::start(loc, kf, o);
      if (!r.ok()) {
        std::fprintf(stderr, "%s\n", r.error().message().c_str());
        return 24;
      }
      const auto* got_huge = static_cast<const std::byte*>((*r)->region("guest")->address);
      const auto* got_small = static_cast<const std::byte*>((*r)->region("heap")->address);
      if (got_huge != huge || got_small != small) return 25;
      // Touched out of order, then all of it.
      for (size_t page : {3, 0, 2}) (void)*reinterpret_cast<const volatile char*>(got_huge + page * kHugePage + 777);
      if (std::memcmp(got_huge, want_huge.data(), kHugeLen) != 0) return 26;
      if (std::memcmp(got_small, want_small.data(), kSmallLen) != 0) return 27;
      if (!(*r)->wait_complete(std::chrono::seconds(20)).ok()) return 28;
      const RestoreStats st = (*r)->stats();
      if (!st.complete || st.failed || st.regions.size() != 2 || st.regions[0].length != kHugeLen ||
          st.regions[0].pages_present() != kHugeLen / 4096 || st.regions[1].pages_present() != kSmallLen / 4096) {
        return 31;
      }
      if (!(*r)->finish().ok()) return 32;
      auto vmas = sys::read_vmas(0, true);
      if (!vmas.ok()) return 29;
      const auto at = reinterpret_cast<uintptr_t>(got_huge);
      const uint64_t size = sys::coverage(*vmas, at, at + kHugeLen).page_size;
      if (size != (huge_pages ? kHugePage : 4096u)) {
        std::fprintf(stderr, "restored on %llu-byte pages\n", static_cast<unsigned long long>(size));
        return 30;
      }
      return 0;
    };
    EXPECT_TRUE(exits_zero(capture_and_restore));
  }
}

// Huge pages the engine cannot gather (chunks larger than the page) are refused before anything
// is mapped, saying how to restore all the same: on ordinary pages, every byte.
TEST(HugePageRestoreTest, WhatHugePagesCannotTakeIsRefusedSayingWhatToDo) {
  const KernelFeatures kf = probe_kernel();
  if (!kf.uffd_usable) GTEST_SKIP() << "userfaultfd unusable: " << kf.uffd_error;
  testing::HugePages pages(2);
  if (!pages.unavailable().empty()) GTEST_SKIP() << pages.unavailable();
  auto body = [&] {
    testing::ScratchDir dir;
    std::byte* huge = map_huge(kHugePage);
    if (huge == nullptr) return 20;
    testing::fill_mixed(huge, kHugePage, 47);
    const std::vector<std::byte> want(huge, huge + kHugePage);
    CaptureRegion region{"guest", huge, kHugePage, PROT_READ | PROT_WRITE};
    CaptureOptions co;
    co.chunk_size = 4 << 20;  // larger than the page
    const std::string loc = dir.path() + "/big-chunks";
    if (!capture_regions(loc, std::span(&region, 1), co).ok()) return 21;
    ::munmap(huge, kHugePage);
    auto refused = LazyRestore::start(loc, kf, {});
    if (refused.ok()) return 22;
    if (refused.error().code() != Errc::kUnsupported ||
        refused.error().message().find("huge_pages = false") == std::string::npos) {
      std::fprintf(stderr, "%s\n", refused.error().message().c_str());
      return 23;
    }
    RestoreOptions small;
    small.huge_pages = false;
    auto r = LazyRestore::start(loc, kf, small);  // the range was left free by the refusal
    if (!r.ok()) {
      std::fprintf(stderr, "%s\n", r.error().message().c_str());
      return 24;
    }
    if (std::memcmp((*r)->region("guest")->address, want.data(), kHugePage) != 0) return 25;
    return (*r)->finish().ok() ? 0 : 26;
  };
  EXPECT_TRUE(exits_zero(body));
}

// The agent checks a VM's memory against the page size it said: /proc/PID/maps tells of unnamed
// anonymous memory (4 KiB pages), smaps of the rest.
TEST(ProcessMapsTest, PageSizesFromMapsAndSmaps) {
  testing::ScratchDir dir;
  const std::string path = dir.path() + "/file";
  std::ofstream(path) << std::string(8192, 'x');
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  void* file = ::mmap(nullptr, 8192, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  void* anon = ::mmap(nullptr, 8192, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(file, MAP_FAILED);
  ASSERT_NE(anon, MAP_FAILED);
  testing::HugePages pages(1);
  std::byte* huge = pages.unavailable().empty() ? map_huge(kHugePage) : nullptr;
  auto page_size = [](const std::vector<sys::Vma>& vmas, const void* p) {
    const auto a = reinterpret_cast<uintptr_t>(p);
    return sys::coverage(vmas, a, a + 4096).page_size;
  };
  auto maps = sys::read_vmas(0);
  auto smaps = sys::read_vmas(0, true);
  ASSERT_TRUE(maps.ok() && smaps.ok());
  EXPECT_EQ(page_size(*maps, anon), 4096u);
  EXPECT_EQ(page_size(*maps, file), 0u);  // not said by maps
  EXPECT_EQ(page_size(*smaps, anon), 4096u);
  EXPECT_EQ(page_size(*smaps, file), 4096u);
  if (huge != nullptr) {
    EXPECT_EQ(page_size(*maps, huge), 0u);
    EXPECT_EQ(page_size(*smaps, huge), kHugePage);
    ::munmap(huge, kHugePage);
  }
  ::munmap(file, 8192);
  ::munmap(anon, 8192);
}

}  // namespace
}  // namespace lazymem
