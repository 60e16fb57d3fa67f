// A realistic in-memory workload for demos and benchmarks: an open-addressing hash table of
// customer records in one arena at a fixed address. Every record is derived from its key, so
// a restored table can be checked record by record without a second copy.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

namespace lazymem::example {

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

struct Record {  // 128 bytes, like a row in a cache or a session table
  uint64_t key;   // 0: empty slot
  uint64_t created_unix;
  uint32_t visits;
  uint32_t flags;
  double balance;
  char name[32];
  char email[40];
  char city[24];
};
static_assert(sizeof(Record) == 128);

struct TableHeader {
  uint64_t magic;
  uint64_t seed;
  uint64_t slots;
  uint64_t records;
  uint64_t digest;   // order-independent sum of record hashes
};

inline constexpr uint64_t kTableMagic = 0x4c5a4d4b56544231ULL;  // "LZMKVTB1"

inline const char* const kFirst[] = {"Ada", "Alan", "Barbara", "Claude", "Donald", "Edsger", "Frances", "Grace",
                                     "John", "Ken", "Leslie", "Margaret", "Niklaus", "Radia", "Tony", "Xavier"};
inline const char* const kLast[] = {"Lovelace", "Turing", "Liskov", "Shannon", "Knuth", "Dijkstra", "Allen", "Hopper",
                                    "Backus", "Thompson", "Lamport", "Hamilton", "Wirth", "Perlman", "Hoare", "Leroy"};
inline const char* const kCity[] = {"Amsterdam", "Berlin", "Cambridge", "Dublin", "Edinburgh", "Helsinki",
                                    "Lisbon", "Madrid", "Oslo", "Paris", "Prague", "Vienna"};

inline uint64_t key_of(uint64_t seed, uint64_t i) { return splitmix64(seed ^ (i * 0x100000001b3ULL)) | 1; }

// The record a key stands for.
inline Record make_record(uint64_t key) {
  Record r;
  std::memset(&r, 0, sizeof r);
  uint64_t h = splitmix64(key);
  r.key = key;
  r.created_unix = 1700000000 + (h % 50000000);
  r.visits = static_cast<uint32_t>((h >> 20) % 1000);
  r.flags = static_cast<uint32_t>((h >> 40) & 0x7);
  r.balance = static_cast<double>((h >> 8) % 10000000) / 100.0;
  const char* first = kFirst[h % 16];
  const char* last = kLast[(h >> 4) % 16];
  std::snprintf(r.name, sizeof r.name, "%s %s", first, last);
  std::snprintf(r.email, sizeof r.email, "%s.%s%u@example.org", first, last, static_cast<unsigned>((h >> 50) % 100));
  std::snprintf(r.city, sizeof r.city, "%s", kCity[(h >> 12) % 12]);
  return r;
}

inline uint64_t record_hash(const Record& r) {
  uint64_t h = 0;
  const auto* p = reinterpret_cast<const unsigned char*>(&r);
  for (size_t i = 0; i < sizeof r; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    h = splitmix64(h ^ w);
  }
  return h;
}

class KvTable {
 public:
  // Views `bytes` bytes at `arena` as a table (header + slots).
  KvTable(void* arena, size_t bytes) : hdr_(static_cast<TableHeader*>(arena)), bytes_(bytes) {
    slots_ = reinterpret_cast<Record*>(static_cast<char*>(arena) + 4096);
  }

  static uint64_t slots_for(size_t bytes) { return (bytes - 4096) / sizeof(Record); }

  // Fills the table to `load` (e.g. 0.7) of its slots.
  void fill(uint64_t seed, double load) {
    hdr_->magic = kTableMagic;
    hdr_->seed = seed;
    hdr_->slots = slots_for(bytes_);
    hdr_->records = 0;
    hdr_->digest = 0;
    const uint64_t n = static_cast<uint64_t>(static_cast<double>(hdr_->slots) * load);
    for (uint64_t i = 0; i < n; ++i) add();
  }

  // Inserts the next record (the one key_of(seed, records) stands for), as a service taking a
  // new customer does: its slot, then the header's count and digest.
  void add() {
    Record r = make_record(key_of(hdr_->seed, hdr_->records));
    insert(r);
    hdr_->records += 1;
    hdr_->digest += record_hash(r);
  }

  const Record* find(uint64_t key) const {
    for (uint64_t i = home(key), probes = 0; probes < hdr_->slots; i = next(i), ++probes) {
      if (slots_[i].key == key) return &slots_[i];
      if (slots_[i].key == 0) return nullptr;
    }
    return nullptr;
  }

  // Checks every slot against the record its key stands for, and the totals against the
  // header. Returns an empty string when all is well, else what is wrong.
  std::string verify(uint64_t expect_records, uint64_t expect_digest) const {
    if (hdr_->magic != kTableMagic) return "bad table magic";
    uint64_t count = 0, digest = 0;
    for (uint64_t i = 0; i < hdr_->slots; ++i) {
      const Record& r = slots_[i];
      if (r.key == 0) continue;
      Record want = make_record(r.key);
      if (std::memcmp(&want, &r, sizeof r) != 0) return "record in slot " + std::to_string(i) + " differs";
      ++count;
      digest += record_hash(r);
    }
    if (count != expect_records || count != hdr_->records) return "record count " + std::to_string(count) + " differs";
    if (digest != expect_digest || digest != hdr_->digest) return "table digest differs";
    return {};
  }

  // Checks a table whose inserter was stopped at an arbitrary instruction (SIGSTOP: the agent's
  // `migrate --pid`, which the table does not know of): every record as verify() does, but one
  // insert may be caught in flight (add() writes the slot, then the count, then the digest), its
  // slot partly written. Returns what is wrong, or "" with `records` the records complete.
  std::string verify_stopped(uint64_t& records) const {
    if (hdr_->magic != kTableMagic) return "bad table magic";
    const uint64_t r = hdr_->records, next_key = key_of(hdr_->seed, r);
    const Record next = make_record(next_key);
    uint64_t count = 0, digest = 0;
    bool next_complete = false, partial = false;
    for (uint64_t i = 0; i < hdr_->slots; ++i) {
      const Record& slot = slots_[i];
      const Record whole = slot.key != 0 ? make_record(slot.key) : Record{};
      if (slot.key != 0 && std::memcmp(&slot, &whole, sizeof slot) == 0) {
        ++count;
        digest += record_hash(slot);
        next_complete |= slot.key == next_key;
        continue;
      }
      // Not a whole record: only the next insert's slot, part written (each word its own or zero).
      uint64_t words[16], want[16];
      std::memcpy(words, &slot, sizeof slot);
      std::memcpy(want, &next, sizeof next);
      bool empty = true, part_of_next = true;
      for (int w = 0; w < 16; ++w) {
        empty &= words[w] == 0;
        part_of_next &= words[w] == 0 || words[w] == want[w];
      }
      if (empty) continue;
      if (!part_of_next || partial) return "record in slot " + std::to_string(i) + " differs";
      partial = true;
    }
    const uint64_t d = hdr_->digest;
    records = count;
    if (count == r && digest == d) return {};  // between inserts (or the next one's slot part written)
    if (count == r + 1 && next_complete && digest - record_hash(next) == d) return {};  // slot written, count not yet
    if (r > 0 && count == r) {  // count raised, digest not yet
      const Record last = make_record(key_of(hdr_->seed, r - 1));
      if (digest - record_hash(last) == d) return {};
    }
    return "record count " + std::to_string(count) + " or digest differs from the header's (" + std::to_string(r) +
           " records)";
  }

  const TableHeader& header() const { return *hdr_; }

 private:
  uint64_t home(uint64_t key) const {
    return static_cast<uint64_t>((static_cast<unsigned __int128>(splitmix64(key)) * hdr_->slots) >> 64);
  }
  uint64_t next(uint64_t i) const { return i + 1 == hdr_->slots ? 0 : i + 1; }
  void insert(const Record& r) {
    uint64_t i = home(r.key);
    while (slots_[i].key != 0 && slots_[i].key != r.key) i = next(i);
    slots_[i] = r;
  }

  TableHeader* hdr_;
  size_t bytes_;
  Record* slots_;
};

}  // namespace lazymem::example
