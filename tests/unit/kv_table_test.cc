// The example table's check of an image taken at an arbitrary stop of its inserter (the agent's
// migrate --pid): an insert caught at any point of its three writes passes; anything else fails.
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "../../examples/kv_table.h"

namespace lazymem::example {
namespace {

class KvTableTest : public ::testing::Test {
 protected:
  static constexpr size_t kBytes = 1 << 20;
  KvTableTest() : arena_(kBytes), table_(arena_.data(), kBytes) { table_.fill(9, 0.5); }

  std::string check() {
    uint64_t n = 0;
    std::string bad = table_.verify_stopped(n);
    records_ = n;
    return bad;
  }
  // The slot the next insert goes to, found by doing it on a copy.
  Record* next_slot() {
    std::vector<std::byte> copy(arena_);
    KvTable t(copy.data(), kBytes);
    t.add();
    for (size_t off = 4096; off + sizeof(Record) <= kBytes; off += sizeof(Record)) {
      if (std::memcmp(copy.data() + off, arena_.data() + off, sizeof(Record)) != 0) {
        return reinterpret_cast<Record*>(arena_.data() + off);
      }
    }
    return nullptr;
  }
  TableHeader& header() { return *reinterpret_cast<TableHeader*>(arena_.data()); }

  std::vector<std::byte> arena_;
  KvTable table_;
  uint64_t records_ = 0;
};

TEST_F(KvTableTest, BetweenInserts) {
  EXPECT_EQ(check(), "");
  EXPECT_EQ(records_, header().records);
}

TEST_F(KvTableTest, SlotHalfWritten) {
  Record* slot = next_slot();
  ASSERT_NE(slot, nullptr);
  const Record next = make_record(key_of(header().seed, header().records));
  std::memcpy(reinterpret_cast<char*>(slot) + 64, reinterpret_cast<const char*>(&next) + 64, 64);
  EXPECT_EQ(check(), "");
  std::memcpy(slot, &next, 8);  // and the key too: still not whole
  EXPECT_EQ(check(), "");
}

TEST_F(KvTableTest, SlotWrittenCountNotYet) {
  Record* slot = next_slot();
  ASSERT_NE(slot, nullptr);
  *slot = make_record(key_of(header().seed, header().records));
  EXPECT_EQ(check(), "");
  EXPECT_EQ(records_, header().records + 1);
}

TEST_F(KvTableTest, CountRaisedDigestNotYet) {
  const uint64_t digest = header().digest;
  table_.add();
  header().digest = digest;
  EXPECT_EQ(check(), "");
}

TEST_F(KvTableTest, AnythingElseFails) {
  {
    const uint64_t count = header().records;
    header().records = count + 2;
    EXPECT_NE(check(), "");
    header().records = count;
  }
  {
    const uint64_t digest = header().digest;
    header().digest = digest + 1;
    EXPECT_NE(check(), "");
    header().digest = digest;
  }
  {
    // A word of a whole record changed: it is not the next insert's.
    auto* slots = reinterpret_cast<Record*>(arena_.data() + 4096);
    size_t i = 0;
    while (slots[i].key == 0) ++i;
    slots[i].visits ^= 1;
    EXPECT_NE(check(), "");
    slots[i].visits ^= 1;
  }
  {
    // A slot holding part of another record than the next.
    Record* slot = next_slot();
    ASSERT_NE(slot, nullptr);
    const Record other = make_record(key_of(header().seed, header().records + 1));
    std::memcpy(reinterpret_cast<char*>(slot) + 64, reinterpret_cast<const char*>(&other) + 64, 64);
    EXPECT_NE(check(), "");
  }
}

}  // namespace
}  // namespace lazymem::example
