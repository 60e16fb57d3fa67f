// Fault engine building blocks: the address map follows munmap/mremap; histogram maths; what
// add_session refuses.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>

#include "../common/manifest_source.h"
#include "fault/address_map.h"
#include "fault/fault_engine.h"
#include "snapshot/chunk_source.h"
#include "sys/cpu_latency.h"
#include "lazymem/stats.h"

namespace lazymem {
namespace {

using fault::AddressMap;
using fault::MappedRange;

TEST(AddressMapTest, FindAndSpans) {
  AddressMap m({{0x20000, 0x10000, 1, 0}, {0x10000, 0x8000, 0, 0x1000}});
  ASSERT_NE(m.find(0x10000), nullptr);
  EXPECT_EQ(m.find(0x10000)->region, 0u);
  EXPECT_EQ(m.find(0x18000), nullptr);
  EXPECT_EQ(m.find(0x2ffff)->region, 1u);
  std::vector<std::pair<uint64_t, uint64_t>> spans;
  m.for_each_span(0, 0, 0x4000, [&](uint64_t a, uint64_t, uint64_t n) { spans.push_back({a, n}); });
  ASSERT_EQ(spans.size(), 1u);
  EXPECT_EQ(spans[0].first, 0x10000u);  // region offset 0x1000 is at 0x10000
  EXPECT_EQ(spans[0].second, 0x3000u);
}

// The gap around an address no range holds: where a grown mapping's zero-fill may go.
TEST(AddressMapTest, NeighboursOfAGap) {
  AddressMap m({{0x20000, 0x10000, 1, 0}, {0x10000, 0x8000, 0, 0}});
  EXPECT_EQ(m.end_before(0x18000), 0x18000u);
  EXPECT_EQ(m.start_after(0x18000), 0x20000u);
  EXPECT_EQ(m.end_before(0x30000), 0x30000u);
  EXPECT_EQ(m.start_after(0x30000), UINT64_MAX);
  EXPECT_EQ(m.end_before(0x8000), 0u);
  EXPECT_EQ(m.start_after(0x8000), 0x10000u);
}

TEST(AddressMapTest, RemoveSplits) {
  AddressMap m({{0x10000, 0x10000, 0, 0}});
  m.remove(0x14000, 0x4000);
  ASSERT_EQ(m.ranges().size(), 2u);
  EXPECT_EQ(m.ranges()[0].length, 0x4000u);
  EXPECT_EQ(m.ranges()[1].start, 0x18000u);
  EXPECT_EQ(m.ranges()[1].region_offset, 0x8000u);
  EXPECT_EQ(m.find(0x15000), nullptr);
}

TEST(AddressMapTest, MoveKeepsRegionOffsets) {
  AddressMap m({{0x10000, 0x10000, 0, 0}});
  m.move(0x18000, 0x80000, 0x8000);
  ASSERT_NE(m.find(0x80000), nullptr);
  EXPECT_EQ(m.find(0x80000)->region_offset, 0x8000u);
  EXPECT_EQ(m.find(0x18000), nullptr);
  EXPECT_NE(m.find(0x17fff), nullptr);
}

TEST(LatencyHistogramTest, Percentiles) {
  LatencyHistogram h;
  auto add = [&](uint64_t us) {
    h.buckets[LatencyHistogram::bucket_of(us)]++;
    h.count++;
    h.sum_us += us;
    h.max_us = std::max(h.max_us, us);
  };
  for (int i = 0; i < 99; ++i) add(10);  // bucket [8,16)
  add(5000);
  EXPECT_EQ(h.percentile_us(50), 16u);
  EXPECT_EQ(h.percentile_us(99), 16u);
  EXPECT_EQ(h.percentile_us(100), 5000u);
  EXPECT_EQ(LatencyHistogram::bucket_of(0), 0u);
  EXPECT_EQ(LatencyHistogram::bucket_of(1), 1u);
  EXPECT_EQ(LatencyHistogram::bucket_of(2), 2u);
  EXPECT_EQ(LatencyHistogram::bucket_of(3), 2u);
}

}  // namespace
}  // namespace lazymem

namespace lazymem {
namespace {

// The system-wide CPU latency limit, as the kernel reports it.
int32_t cpu_latency_limit() {
  int fd = ::open("/dev/cpu_dma_latency", O_RDONLY | O_CLOEXEC);
  int32_t v = -1;
  if (fd >= 0 && ::read(fd, &v, sizeof v) != sizeof v) v = -1;
  if (fd >= 0) ::close(fd);
  return v;
}

TEST(CpuLatencyHoldTest, HeldWhileAskedAndGivenBack) {
  if (::access("/dev/cpu_dma_latency", W_OK) != 0) GTEST_SKIP() << "/dev/cpu_dma_latency not writable (needs root)";
  int32_t before = cpu_latency_limit();
  if (before == 0) GTEST_SKIP() << "something else already holds a 0 us CPU latency request";
  sys::CpuLatencyHold hold;
  EXPECT_TRUE(hold.set(true));
  EXPECT_TRUE(hold.set(true));  // idempotent
  EXPECT_EQ(cpu_latency_limit(), 0);
  EXPECT_FALSE(hold.set(false));
  EXPECT_EQ(cpu_latency_limit(), before);
}

// A source whose manifest was never validated (or a check there that failed): a range the
// region's length covers but its chunks do not is refused, not left for a fault to index past
// the chunk vector.
TEST(FaultEngineTest, RangePastTheRegionsChunksIsRefused) {
  // 256 KiB of chunks for a 1 TiB region
  const Manifest m = testing::one_region_manifest("guest", RegionKind::kRawFile, uint64_t{1} << 40, 4);
  fault::FaultEngine engine(KernelFeatures{});
  auto add = [&](uint64_t region_offset, uint64_t length) {
    fault::SessionSpec spec;
    spec.name = "vm";
    spec.source = std::make_shared<testing::ManifestOnlySource>(m, "unused");
    spec.ranges = {MappedRange{0x7f0000000000, length, 0, region_offset}};
    spec.prefetch = false;
    return engine.add_session(std::move(spec));
  };
  auto far = add(uint64_t{1} << 39, 16 << 20);
  ASSERT_FALSE(far.ok());
  EXPECT_EQ(far.error().code(), Errc::kInvalidArgument);
  EXPECT_NE(far.error().message().find("chunks"), std::string::npos) << far.error().message();
  EXPECT_FALSE(add(0, 4 * kDefaultChunkSize + 4096).ok());  // one page past the last chunk
  // The engine is never started: a session added is only queued, its (invalid) uffd unused.
  auto inside = add(0, 4 * kDefaultChunkSize);
  EXPECT_TRUE(inside.ok()) << inside.error().message();
}

}  // namespace
}  // namespace lazymem
