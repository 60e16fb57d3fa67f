// Snapshot format: round trips, and every kind of damage gives one clear error.
#include <gtest/gtest.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <tuple>

#include <malloc.h>

#include "../common/manifest_source.h"
#include "../common/test_data.h"
#include "lazymem/restore.h"
#include "lazymem/snapshot.h"
#include "snapshot/chunk_codec.h"
#include "snapshot/manifest.h"
#include "snapshot/read_chunks.h"
#include "snapshot/snapshot_reader.h"
#include "snapshot/store.h"

namespace lazymem {
namespace {

using testing::ScratchDir;

class SnapshotFormatTest : public ::testing::Test {
 protected:
  void SetUp() override {
    len_ = 8 * 1024 * 1024;
    mem_ = static_cast<std::byte*>(::mmap(nullptr, len_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    ASSERT_NE(mem_, MAP_FAILED);
    testing::fill_mixed(mem_, len_, 11);
  }
  void TearDown() override { ::munmap(mem_, len_); }

  std::string capture(const std::string& name, uint32_t format = 2) {
    CaptureRegion r{"heap", mem_, len_, PROT_READ | PROT_WRITE};
    CaptureOptions o;
    o.format_version = format;
    o.app_state = {std::byte{1}, std::byte{2}, std::byte{3}};
    auto rep = capture_regions(dir_.path() + "/" + name, std::span(&r, 1), o);
    EXPECT_TRUE(rep.ok()) << rep.error().message();
    return dir_.path() + "/" + name;
  }

  static void patch(const std::string& path, size_t offset, const void* bytes, size_t n) {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(offset));
    f.write(static_cast<const char*>(bytes), static_cast<std::streamsize>(n));
  }

  ScratchDir dir_;
  std::byte* mem_ = nullptr;
  size_t len_ = 0;
};

// Decodes every chunk of a snapshot from its data file and compares it with memory.
void expect_every_chunk_decodes(const std::string& loc, const std::byte* mem, Codec compressed) {
  auto m = read_manifest(loc);
  ASSERT_TRUE(m.ok()) << m.error().message();
  ASSERT_EQ(m->regions.size(), 1u);
  EXPECT_EQ(m->regions[0].start_address, reinterpret_cast<uint64_t>(mem));
  EXPECT_EQ(m->app_state.size(), 3u);
  size_t zero = 0, raw = 0, packed = 0;
  for (const auto& c : m->regions[0].chunks) {
    zero += c.codec == Codec::kZero;
    raw += c.codec == Codec::kRaw;
    packed += c.codec == compressed;
  }
  EXPECT_GT(zero, 0u);
  EXPECT_GT(raw, 0u);
  EXPECT_EQ(zero + raw + packed, m->regions[0].chunks.size());
  EXPECT_GT(packed, 0u);
  EXPECT_EQ(m->dictionary.empty(), compressed == Codec::kZstd);

  std::vector<std::byte> data;
  {
    std::ifstream f(loc + "/data", std::ios::binary);
    std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    data.resize(bytes.size());
    std::memcpy(data.data(), bytes.data(), bytes.size());
  }
  auto dict = snapshot::DecodeDictionary::load(m->dictionary);
  ASSERT_TRUE(dict.ok());
  snapshot::ChunkLayout layout{m->regions[0].page_size, *dict ? (*dict)->get() : nullptr};
  snapshot::ChunkDecoder dec;
  std::vector<std::byte> out(kDefaultChunkSize);
  for (size_t c = 0; c < m->regions[0].chunks.size(); ++c) {
    const ChunkInfo& ci = m->regions[0].chunks[c];
    std::span<const std::byte> stored(data.data() + ci.offset, ci.stored_length);
    uint32_t n = m->chunk_length(0, c);
    ASSERT_TRUE(dec.decode(ci, stored, std::span(out.data(), n), layout).ok()) << "chunk " << c;
    ASSERT_EQ(std::memcmp(out.data(), mem + c * kDefaultChunkSize, n), 0) << "chunk " << c;
  }
}

TEST_F(SnapshotFormatTest, RoundTripEveryChunk) {
  std::string loc = capture("rt");
  auto m = read_manifest(loc);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->format_version, 2u);
  expect_every_chunk_decodes(loc, mem_, Codec::kZstdPages);
}

// Format 1 (one zstd frame per chunk) is still written on request and read.
TEST_F(SnapshotFormatTest, RoundTripFormatOne) {
  std::string loc = capture("v1", 1);
  std::ifstream f(loc + "/manifest", std::ios::binary);
  char header[12];
  f.read(header, sizeof header);
  uint32_t version;
  std::memcpy(&version, header + 8, 4);
  EXPECT_EQ(version, 1u);
  expect_every_chunk_decodes(loc, mem_, Codec::kZstd);
}

TEST_F(SnapshotFormatTest, PageFramesInAFormatOneManifestAreRejected) {
  std::string loc = capture("mixed");
  auto m = read_manifest(loc);
  ASSERT_TRUE(m.ok());
  m->format_version = 1;
  Status s = snapshot::validate_manifest(*m);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.error().message().find("format 1"), std::string::npos) << s.error().message();
}

TEST_F(SnapshotFormatTest, CorruptManifestIsRejected) {
  std::string loc = capture("corrupt");
  uint8_t junk = 0xff;
  patch(loc + "/manifest", snapshot::kManifestHeaderSize + 40, &junk, 1);
  auto m = read_manifest(loc);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.error().code(), Errc::kCorrupt);
  EXPECT_NE(m.error().message().find("checksum"), std::string::npos) << m.error().message();
}

TEST_F(SnapshotFormatTest, ForeignFileIsRejected) {
  std::string loc = capture("foreign");
  std::ofstream(loc + "/manifest", std::ios::trunc) << "this is a text file, not a manifest\n";
  auto m = read_manifest(loc);
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.error().message().find("not a lazymem snapshot"), std::string::npos) << m.error().message();
}

TEST_F(SnapshotFormatTest, FutureVersionIsRejected) {
  std::string loc = capture("future");
  uint32_t v = snapshot::kFormatVersion + 1;
  patch(loc + "/manifest", 8, &v, 4);
  auto m = read_manifest(loc);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.error().code(), Errc::kUnsupported);
  EXPECT_NE(m.error().message().find("upgrade lazymem"), std::string::npos) << m.error().message();
}

TEST_F(SnapshotFormatTest, TruncatedManifestIsRejected) {
  std::string loc = capture("tman");
  std::filesystem::resize_file(loc + "/manifest", 100);
  auto m = read_manifest(loc);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.error().code(), Errc::kCorrupt);
}

TEST_F(SnapshotFormatTest, TruncatedDataFileIsRejectedAtOpen) {
  std::string loc = capture("tdata");
  auto size = std::filesystem::file_size(loc + "/data");
  std::filesystem::resize_file(loc + "/data", size / 2);
  auto parsed = SnapshotLocation::parse(loc);
  ASSERT_TRUE(parsed.ok());
  auto snap = snapshot::LocalSnapshot::open(*parsed);
  ASSERT_FALSE(snap.ok());
  EXPECT_NE(snap.error().message().find("truncated"), std::string::npos) << snap.error().message();
}

TEST_F(SnapshotFormatTest, ManifestWithChunkOutsideDataIsRejected) {
  Manifest m;
  RegionInfo r;
  r.name = "x";
  r.start_address = 0x10000000;
  r.length = kDefaultChunkSize;
  r.chunks.push_back(ChunkInfo{Codec::kRaw, 100, kDefaultChunkSize, 1});
  m.regions.push_back(r);
  m.data_length = 4096;
  auto bytes = snapshot::encode_manifest(m);
  auto d = snapshot::decode_manifest(bytes, "test");
  ASSERT_FALSE(d.ok());
  EXPECT_NE(d.error().message().find("outside the data file"), std::string::npos) << d.error().message();
}

TEST_F(SnapshotFormatTest, FailedCaptureLeavesNothing) {
  CaptureRegion bad{"heap", mem_ + 1, 4096, PROT_READ};
  auto rep = capture_regions(dir_.path() + "/bad", std::span(&bad, 1), {});
  ASSERT_FALSE(rep.ok());
  for (const auto& e : std::filesystem::directory_iterator(dir_.path())) ADD_FAILURE() << "left behind: " << e.path();
}

TEST_F(SnapshotFormatTest, ExistingNameIsRefusedUnlessReplacing) {
  capture("dup");
  CaptureRegion r{"heap", mem_, 4096 * 4, PROT_READ};
  auto again = capture_regions(dir_.path() + "/dup", std::span(&r, 1), {});
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.error().code(), Errc::kExists);
  CaptureOptions o;
  o.replace = true;
  auto replaced = capture_regions(dir_.path() + "/dup", std::span(&r, 1), o);
  ASSERT_TRUE(replaced.ok()) << replaced.error().message();
  auto m = read_manifest(dir_.path() + "/dup");
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->regions[0].length, 4096u * 4);
  auto list = snapshot::list_store(dir_.path());
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->size(), 1u);
  EXPECT_EQ((*list)[0].name, "dup");
  EXPECT_EQ((*list)[0].format_version, 2u);
  for (const auto& e : std::filesystem::directory_iterator(dir_.path())) {
    EXPECT_EQ(e.path().filename(), "dup") << "left behind by the replacement";
  }
}

// Only a snapshot is ever deleted as one. A replacing capture or a removal aimed at anything else
// (somebody's directory, a whole store named by mistake, a lone file called "manifest") is
// refused and leaves it whole; a damaged snapshot (its manifest gone, its data cut short) is
// listed as damaged and can be removed or replaced.
TEST_F(SnapshotFormatTest, OnlySnapshotsAreReplacedOrRemoved) {
  namespace fs = std::filesystem;
  fs::create_directories(dir_.path() + "/proj/src");
  std::ofstream(dir_.path() + "/proj/manifest") << "not ours";
  std::ofstream(dir_.path() + "/proj/src/main.c") << "int main() {}";
  fs::create_directories(dir_.path() + "/notes");
  std::ofstream(dir_.path() + "/notes/manifest") << "a text file";
  const std::string store = capture("inner_store/a").substr(0, dir_.path().size() + 12);
  ASSERT_EQ(store, dir_.path() + "/inner_store");
  CaptureRegion r{"heap", mem_, 4096 * 4, PROT_READ};
  CaptureOptions replace;
  replace.replace = true;
  for (const std::string target : {"proj", "notes", "inner_store"}) {
    auto rep = capture_regions(dir_.path() + "/" + target, std::span(&r, 1), replace);
    ASSERT_FALSE(rep.ok()) << target;
    EXPECT_NE(rep.error().message().find("is not a lazymem snapshot"), std::string::npos) << rep.error().message();
    Status rm = snapshot::remove_snapshot(*SnapshotLocation::in_store(dir_.path(), target));
    ASSERT_FALSE(rm.ok()) << target;
    EXPECT_NE(rm.error().message().find("not removing it"), std::string::npos) << rm.error().message();
  }
  EXPECT_TRUE(fs::exists(dir_.path() + "/proj/src/main.c"));
  EXPECT_TRUE(fs::exists(dir_.path() + "/notes/manifest"));
  EXPECT_TRUE(fs::exists(store + "/a/data"));
  // A snapshot given where a store belongs: said so, nothing written inside it.
  auto nested = capture_regions(store + "/a/b", std::span(&r, 1), {});
  ASSERT_FALSE(nested.ok());
  EXPECT_NE(nested.error().message().find("is a snapshot, not a store"), std::string::npos) << nested.error().message();
  EXPECT_FALSE(snapshot::list_store(store + "/a").ok());

  capture("cut");
  capture("headless");
  fs::resize_file(dir_.path() + "/cut/data", 100);
  fs::remove(dir_.path() + "/headless/manifest");
  auto list = snapshot::list_store(dir_.path());
  ASSERT_TRUE(list.ok()) << list.error().message();
  std::map<std::string, std::string> damage;
  for (const auto& s : *list) damage[s.name] = s.damage;
  EXPECT_EQ(damage.size(), 2u) << "foreign directories are not listed";
  EXPECT_NE(damage["cut"].find("is 100 bytes; its manifest needs"), std::string::npos) << damage["cut"];
  EXPECT_NE(damage["headless"].find("manifest"), std::string::npos) << damage["headless"];
  auto fresh = capture_regions(dir_.path() + "/cut", std::span(&r, 1), replace);
  ASSERT_TRUE(fresh.ok()) << fresh.error().message();
  ASSERT_TRUE(snapshot::remove_snapshot(*SnapshotLocation::in_store(dir_.path(), "headless")).ok());
  list = snapshot::list_store(dir_.path());
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->size(), 1u);
  EXPECT_EQ((*list)[0].name, "cut");
  EXPECT_EQ((*list)[0].damage, "");
}

// A listing through a ListingCache says what one without says, and reads a manifest again only
// when its file changed: replaced, rewritten in place, or removed and captured again. A damaged
// manifest is reported on every listing, read once.
TEST_F(SnapshotFormatTest, ListingCacheReadsOnlyChangedManifests) {
  capture("a");
  capture("b");
  snapshot::ListingCache cache;
  auto same_as_uncached = [&] {
    auto cached = snapshot::list_store(dir_.path(), &cache);
    auto plain = snapshot::list_store(dir_.path());
    EXPECT_TRUE(cached.ok() && plain.ok());
    EXPECT_EQ(cached->size(), plain->size());
    for (size_t i = 0; i < std::min(cached->size(), plain->size()); ++i) {
      const auto &x = (*cached)[i], &y = (*plain)[i];
      EXPECT_EQ(std::tie(x.name, x.total_bytes, x.stored_bytes, x.regions, x.created_unix_ns, x.format_version, x.damage),
                std::tie(y.name, y.total_bytes, y.stored_bytes, y.regions, y.created_unix_ns, y.format_version, y.damage))
          << x.name;
    }
    return *cached;
  };
  same_as_uncached();
  same_as_uncached();
  EXPECT_EQ(cache.manifest_reads(), 2u);
  CaptureRegion r{"heap", mem_, 4096 * 2, PROT_READ};
  CaptureOptions replace;
  replace.replace = true;
  ASSERT_TRUE(capture_regions(dir_.path() + "/a", std::span(&r, 1), replace).ok());
  EXPECT_EQ(same_as_uncached()[0].total_bytes, 4096u * 2);
  EXPECT_EQ(cache.manifest_reads(), 3u);
  // One byte of a's manifest changed in place: damaged, said on every listing, read once.
  const std::string manifest = dir_.path() + "/a/" + snapshot::kManifestFile;
  const auto size = std::filesystem::file_size(manifest);
  char last = 0;
  std::ifstream(manifest, std::ios::binary).seekg(static_cast<std::streamoff>(size - 1)).get(last);
  last ^= 0x5a;
  patch(manifest, size - 1, &last, 1);
  EXPECT_NE(same_as_uncached()[0].damage, "");
  EXPECT_NE(same_as_uncached()[0].damage, "");
  EXPECT_EQ(cache.manifest_reads(), 4u);
  // Removed, then captured again under its name: read again.
  ASSERT_TRUE(snapshot::remove_snapshot(*SnapshotLocation::in_store(dir_.path(), "b")).ok());
  EXPECT_EQ(same_as_uncached().size(), 1u);
  capture("b");
  EXPECT_EQ(same_as_uncached().size(), 2u);
  EXPECT_EQ(cache.manifest_reads(), 5u);
}

// A removal takes the name away at once; what dead writers and removers left (their temporary
// directories) is collected, what live ones are working on is not.
TEST_F(SnapshotFormatTest, RemovalAndLeftoversOfDeadProcesses) {
  capture("gone");
  capture("keep");
  auto gone = SnapshotLocation::parse(dir_.path() + "/gone");
  ASSERT_TRUE(gone.ok());
  ASSERT_TRUE(snapshot::remove_snapshot(*gone).ok());
  Status again = snapshot::remove_snapshot(*gone);
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.error().code(), Errc::kNotFound);
  auto list = snapshot::list_store(dir_.path());
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->size(), 1u);
  EXPECT_EQ((*list)[0].name, "keep");

  pid_t dead = ::fork();
  ASSERT_GE(dead, 0);
  if (dead == 0) ::_exit(0);
  ASSERT_EQ(::waitpid(dead, nullptr, 0), dead);
  const std::vector<std::string> collected = {fmt::format(".a.tmp-{}-0", dead), fmt::format(".b.rm-{}-3", dead)};
  const std::vector<std::string> kept = {fmt::format(".a.tmp-{}-1", ::getpid()), ".c.tmp-1-0", ".d.rm-x-0", "keep",
                                         fmt::format(".e.tmp-+{}-0", dead), fmt::format(".f.tmp-{}-1z", dead),
                                         fmt::format(".g.old-{}-0", dead), fmt::format(".tmp-{}-0", dead)};
  // Made a while ago: a directory made within the last minute may be a writer elsewhere (another
  // host, another pid namespace) that has not locked its data file yet.
  auto backdate = [&](const std::string& d) {
    const timespec two_minutes_ago[2] = {{::time(nullptr) - 120, 0}, {::time(nullptr) - 120, 0}};
    ASSERT_EQ(::utimensat(AT_FDCWD, (dir_.path() + "/" + d).c_str(), two_minutes_ago, 0), 0) << d;
  };
  // A capture collects what dead writers left, as a starting server does.
  ASSERT_TRUE(std::filesystem::create_directory(dir_.path() + "/" + collected[0]));
  capture("more");
  EXPECT_TRUE(std::filesystem::exists(dir_.path() + "/" + collected[0])) << "a directory just made was collected";
  backdate(collected[0]);
  capture("more2");
  EXPECT_FALSE(std::filesystem::exists(dir_.path() + "/" + collected[0])) << "a capture left a dead writer's leftover";
  // A writer whose pid means nothing here (another host sharing the store, another pid
  // namespace): its data file is locked while it writes. A sink of ours holds it, renamed as theirs.
  const std::string elsewhere = fmt::format(".h.tmp-{}-0", dead);
  auto writer = snapshot::open_local_sink(*SnapshotLocation::in_store(dir_.path(), "h"), false);
  ASSERT_TRUE(writer.ok()) << writer.error().message();
  for (const auto& d : collected) {
    ASSERT_TRUE(std::filesystem::create_directory(dir_.path() + "/" + d));
    backdate(d);
  }
  for (const auto& d : kept) {
    std::filesystem::create_directories(dir_.path() + "/" + d + "/sub");
    backdate(d);
  }
  std::string own;
  for (const auto& e : std::filesystem::directory_iterator(dir_.path())) {
    if (e.path().filename().string().starts_with(".h.tmp-")) own = e.path().string();
  }
  ASSERT_FALSE(own.empty());
  std::filesystem::rename(own, dir_.path() + "/" + elsewhere);  // named as by the other writer
  backdate(elsewhere);  // locked: kept however old
  EXPECT_EQ(snapshot::gc_leftovers(dir_.path()), collected.size());
  for (const auto& d : collected) EXPECT_FALSE(std::filesystem::exists(dir_.path() + "/" + d)) << d;
  for (const auto& d : kept) EXPECT_TRUE(std::filesystem::exists(dir_.path() + "/" + d)) << d;
  EXPECT_TRUE(std::filesystem::exists(dir_.path() + "/" + elsewhere)) << "an upload in progress was deleted";
  (*writer)->abort();  // its directory is gone from under it: nothing to clean, the lock goes
  std::filesystem::create_directory(dir_.path() + "/" + elsewhere);
  std::ofstream(dir_.path() + "/" + elsewhere + "/" + snapshot::kDataFile) << "half";
  backdate(elsewhere);
  EXPECT_EQ(snapshot::gc_leftovers(dir_.path()), 1u) << "a dead writer's unlocked data file is kept";
  EXPECT_FALSE(std::filesystem::exists(dir_.path() + "/" + elsewhere));
}

// verify_snapshot reads every stored chunk and names each damaged one (not only the first).
TEST_F(SnapshotFormatTest, VerifyNamesEveryDamagedChunk) {
  for (uint32_t format : {1u, 2u}) {
    SCOPED_TRACE(format);
    const std::string loc = capture("v" + std::to_string(format), format);
    auto m = read_manifest(loc);
    ASSERT_TRUE(m.ok());
    std::vector<uint32_t> stored;
    for (uint32_t c = 0; c < m->regions[0].chunks.size(); ++c) {
      if (m->regions[0].chunks[c].codec != Codec::kZero) stored.push_back(c);
    }
    ASSERT_GE(stored.size(), 3u);
    auto clean = verify_snapshot(loc);
    ASSERT_TRUE(clean.ok()) << clean.error().message();
    EXPECT_EQ(clean->chunks, stored.size());
    EXPECT_TRUE(clean->damaged.empty());
    const std::vector<uint32_t> hit = {stored[1], stored.back()};
    for (uint32_t c : hit) {
      const ChunkInfo& ci = m->regions[0].chunks[c];
      const char flip = 0x5a;
      patch(loc + "/data", ci.offset + ci.stored_length / 2, &flip, 1);
    }
    auto rep = verify_snapshot(loc);
    ASSERT_TRUE(rep.ok()) << rep.error().message();
    EXPECT_EQ(rep->chunks, stored.size());
    ASSERT_EQ(rep->damaged.size(), hit.size());
    for (size_t i = 0; i < hit.size(); ++i) {
      EXPECT_NE(rep->damaged[i].find("chunk " + std::to_string(hit[i]) + " "), std::string::npos) << rep->damaged[i];
    }
  }
}

TEST_F(SnapshotFormatTest, RawMemoryFileRoundTrip) {
  // A VM's guest memory image: captured by offset, restored (eagerly here) anywhere.
  std::string file = dir_.path() + "/guest.mem";
  {
    std::ofstream f(file, std::ios::binary);
    f.write(reinterpret_cast<const char*>(mem_), static_cast<std::streamsize>(len_));
  }
  CaptureOptions o;
  o.chunk_size = 16 * 1024;
  auto rep = capture_raw_file(dir_.path() + "/vm", file, o);
  ASSERT_TRUE(rep.ok()) << rep.error().message();
  auto m = read_manifest(dir_.path() + "/vm");
  ASSERT_TRUE(m.ok()) << m.error().message();
  ASSERT_EQ(m->regions.size(), 1u);
  EXPECT_EQ(m->regions[0].kind, RegionKind::kRawFile);
  EXPECT_EQ(m->regions[0].length, len_);
  auto restored = restore_eager(dir_.path() + "/vm");
  ASSERT_TRUE(restored.ok()) << restored.error().message();
  EXPECT_EQ(std::memcmp((*restored)[0].address, mem_, len_), 0);
  ::munmap((*restored)[0].address, (*restored)[0].length);

  std::ofstream(dir_.path() + "/odd.mem") << "not a page multiple";
  auto odd = capture_raw_file(dir_.path() + "/odd", dir_.path() + "/odd.mem", o);
  ASSERT_FALSE(odd.ok());
  EXPECT_NE(odd.error().message().find("multiple"), std::string::npos) << odd.error().message();
}

TEST(ChunkCodecTest, ChecksumMismatchIsCorrupt) {
  std::vector<std::byte> in(kDefaultChunkSize);
  testing::fill_mixed(in.data(), in.size(), 1);  // text → zstd
  snapshot::ChunkEncoder enc(1, kDefaultChunkSize);
  auto e = enc.encode(in);
  ASSERT_TRUE(e.ok());
  ASSERT_EQ(e->codec, Codec::kZstd);
  ChunkInfo info{e->codec, 0, static_cast<uint32_t>(e->stored.size()), e->checksum ^ 1};
  std::vector<std::byte> out(in.size());
  snapshot::ChunkDecoder dec;
  Status s = dec.decode(info, e->stored, out);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.error().code(), Errc::kCorrupt);
  info.checksum ^= 1;
  EXPECT_TRUE(dec.decode(info, e->stored, out).ok());
  EXPECT_EQ(out, in);
}

// A page-frame chunk: each page decodes alone to its bytes; damage to the stored bytes is caught
// before anything is decoded, and a frame that decodes wrong is caught by its own checksum.
TEST(ChunkCodecTest, PagesDecodeAloneAndDamageIsCaught) {
  constexpr uint32_t kPage = 4096;
  std::vector<std::byte> in(kDefaultChunkSize);
  testing::fill_mixed(in.data(), in.size(), 1);                  // text: compresses
  std::memset(in.data() + 3 * kPage, 0, kPage);                    // a zero page
  testing::fill_mixed(in.data() + 5 * kPage, kPage, 0);            // random: a raw page
  snapshot::ChunkEncoder enc(1, kDefaultChunkSize);
  auto e = enc.encode_pages(in, kPage);
  ASSERT_TRUE(e.ok());
  ASSERT_EQ(e->codec, Codec::kZstdPages);
  std::vector<std::byte> stored(e->stored.begin(), e->stored.end());
  ChunkInfo info{e->codec, 0, static_cast<uint32_t>(stored.size()), e->checksum, e->stored_checksum};
  const uint32_t len = static_cast<uint32_t>(in.size());
  snapshot::ChunkDecoder dec;
  snapshot::ChunkLayout layout{kPage, nullptr};
  ASSERT_TRUE(dec.verify_stored(info, stored, len, kPage).ok());
  std::vector<std::byte> page(kPage);
  for (uint32_t i = len / kPage; i-- > 0;) {  // any order
    ASSERT_TRUE(dec.decode_page(stored, len, i, page, layout).ok()) << "page " << i;
    ASSERT_EQ(std::memcmp(page.data(), in.data() + size_t{i} * kPage, kPage), 0) << "page " << i;
  }
  std::vector<std::byte> out(in.size());
  ASSERT_TRUE(dec.decode(info, stored, out, layout).ok());
  EXPECT_EQ(out, in);

  // One flipped byte anywhere in the stored bytes: the stored checksum.
  for (size_t at : {size_t{0}, size_t{70}, stored.size() - 1}) {
    stored[at] ^= std::byte{1};
    Status s = dec.verify_stored(info, stored, len, kPage);
    ASSERT_FALSE(s.ok());
    EXPECT_NE(s.error().message().find("stored chunk checksum"), std::string::npos) << s.error().message();
    EXPECT_FALSE(dec.decode(info, stored, out, layout).ok());
    stored[at] ^= std::byte{1};
  }
  // The same flip with a checksum to match (a writer bug): page 0's frame checksum.
  stored[64 + 20] ^= std::byte{1};
  info.stored_checksum = snapshot::chunk_checksum(stored);
  ASSERT_TRUE(dec.verify_stored(info, stored, len, kPage).ok());
  Status s = dec.decode_page(stored, len, 0, page, layout);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.error().code(), Errc::kCorrupt);
  // A frame table that points past the chunk.
  stored[64 + 20] ^= std::byte{1};
  stored[0] = std::byte{0xff};
  stored[1] = std::byte{0xff};
  info.stored_checksum = snapshot::chunk_checksum(stored);
  s = dec.verify_stored(info, stored, len, kPage);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.error().message().find("frame end"), std::string::npos) << s.error().message();
}

// Pages compressed with a dictionary decode only with that dictionary.
TEST(ChunkCodecTest, DictionaryIsNeededAndChecked) {
  constexpr uint32_t kPage = 4096;
  std::vector<std::byte> mem(16 << 20);
  testing::fill_mixed(mem.data(), mem.size(), 1);
  std::span<const std::byte> all(mem);
  std::vector<std::byte> bytes = snapshot::train_dictionary(std::span(&all, 1), kPage);
  ASSERT_FALSE(bytes.empty());
  auto cdict = snapshot::EncodeDictionary::load(bytes, 1);
  ASSERT_TRUE(cdict.ok());
  snapshot::ChunkEncoder with(1, kDefaultChunkSize, *cdict), without(1, kDefaultChunkSize);
  auto in = all.subspan(4 << 20, kDefaultChunkSize);
  auto a = with.encode_pages(in, kPage);
  ASSERT_TRUE(a.ok());
  std::vector<std::byte> stored(a->stored.begin(), a->stored.end());
  auto b = without.encode_pages(in, kPage);
  ASSERT_TRUE(b.ok());
  EXPECT_LT(stored.size(), b->stored.size());  // the point of the dictionary
  ChunkInfo info{a->codec, 0, static_cast<uint32_t>(stored.size()), a->checksum, a->stored_checksum};
  auto ddict = snapshot::DecodeDictionary::load(bytes);
  ASSERT_TRUE(ddict.ok());
  snapshot::ChunkDecoder dec;
  std::vector<std::byte> out(in.size());
  ASSERT_TRUE(dec.decode(info, stored, out, {kPage, (*ddict)->get()}).ok());
  EXPECT_EQ(std::memcmp(out.data(), in.data(), in.size()), 0);
  Status s = dec.decode(info, stored, out, {kPage, nullptr});
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.error().code(), Errc::kCorrupt);
}

TEST(ChunkCodecTest, ZeroAndIncompressibleChunks) {
  std::vector<std::byte> zeros(kDefaultChunkSize);
  snapshot::ChunkEncoder enc(1, kDefaultChunkSize);
  auto z = enc.encode(zeros);
  ASSERT_TRUE(z.ok());
  EXPECT_EQ(z->codec, Codec::kZero);
  std::vector<std::byte> rnd(kDefaultChunkSize);
  testing::fill_mixed(rnd.data(), rnd.size(), 0);  // random block
  auto r = enc.encode(rnd);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->codec, Codec::kRaw);
  EXPECT_EQ(r->stored.size(), rnd.size());
  auto zp = enc.encode_pages(zeros, 4096);
  ASSERT_TRUE(zp.ok());
  EXPECT_EQ(zp->codec, Codec::kZero);
  auto rp = enc.encode_pages(rnd, 4096);
  ASSERT_TRUE(rp.ok());
  EXPECT_EQ(rp->codec, Codec::kRaw);
  EXPECT_EQ(rp->stored.size(), rnd.size());
}

TEST(SnapshotLocationTest, ParsesPathsAndUris) {
  auto a = SnapshotLocation::parse("/var/lib/lazymem/store/app");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->store_dir, "/var/lib/lazymem/store");
  EXPECT_EQ(a->name, "app");
  auto b = SnapshotLocation::parse("lazymem://10.0.0.2:7070/vm1");
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->host, "10.0.0.2");
  EXPECT_EQ(b->port, 7070);
  EXPECT_EQ(b->name, "vm1");
  auto c = SnapshotLocation::parse("lazymem://[::1]:7070/vm1");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->host, "::1");
  EXPECT_FALSE(SnapshotLocation::parse("lazymem://host/vm").ok());
  EXPECT_FALSE(SnapshotLocation::parse("lazymem://host:99999/vm").ok());
  EXPECT_FALSE(SnapshotLocation::parse("/store/.hidden").ok());
  EXPECT_FALSE(SnapshotLocation::parse("lazymem://h:1/").ok());
  auto d = SnapshotLocation::parse("lazymem://pages1:7070,[fd00::2]:7071,10.0.0.3:7072/vm1");
  ASSERT_TRUE(d.ok()) << d.error().message();
  ASSERT_EQ(d->servers().size(), 3u);
  EXPECT_EQ(d->servers()[1].host, "fd00::2");
  EXPECT_EQ(d->servers()[2].port, 7072);
  EXPECT_EQ(d->name, "vm1");
  EXPECT_EQ(d->to_string(), "lazymem://pages1:7070,[fd00::2]:7071,10.0.0.3:7072/vm1");
  EXPECT_EQ(c->to_string(), "lazymem://[::1]:7070/vm1");
  EXPECT_EQ(d->at(1).to_string(), "lazymem://[fd00::2]:7071/vm1");  // the server that answered, in messages
  EXPECT_EQ(d->at(3).to_string(), "lazymem://pages1:7070/vm1");
  EXPECT_EQ(c->at(5).to_string(), "lazymem://[::1]:7070/vm1");
  EXPECT_FALSE(SnapshotLocation::parse("lazymem://h:1,/vm").ok());
  EXPECT_FALSE(SnapshotLocation::parse("lazymem://h:1,h2/vm").ok());
  // Names are printed on terminals: an escape sequence in one could rewrite an operator's screen.
  auto esc = SnapshotLocation::in_store("/s", "a\x1b[2Jb");
  ASSERT_FALSE(esc.ok());
  EXPECT_NE(esc.error().message().find("a\\x1b[2Jb"), std::string::npos) << esc.error().message();
  EXPECT_FALSE(SnapshotLocation::parse("lazymem://h:1/new\nline").ok());
  EXPECT_FALSE(SnapshotLocation::in_store("/s", "del\x7f").ok());
}

// Regions are checked before anything is written: names printable and unique, no two process
// regions overlapping (a restore could map only one of them).
TEST_F(SnapshotFormatTest, RegionLayoutIsCheckedFirst) {
  const size_t half = len_ / 2;
  const std::pair<std::vector<CaptureRegion>, std::string> cases[] = {
      {{{"a", mem_, half, PROT_READ}, {"a", mem_ + half, half, PROT_READ}}, "another region has that name"},
      {{{"a", mem_, half, PROT_READ}, {"b", mem_ + 4096, half, PROT_READ}}, "overlaps region 'a'"},
      {{{"bell\a", mem_, half, PROT_READ}}, "no control characters"},
      {{{"", mem_, half, PROT_READ}}, "a region name must be"},
      {{{std::string(200, 'n'), mem_, half, PROT_READ}}, "a region name must be"}};
  for (const auto& [regions, says] : cases) {
    auto rep = capture_regions(dir_.path() + "/r", regions, {});
    ASSERT_FALSE(rep.ok()) << says;
    EXPECT_EQ(rep.error().code(), Errc::kInvalidArgument) << rep.error().message();
    EXPECT_NE(rep.error().message().find(says), std::string::npos) << rep.error().message();
  }
  for (const auto& e : std::filesystem::directory_iterator(dir_.path())) ADD_FAILURE() << "left behind: " << e.path();
}

// HOST:PORT as the programs' --listen, --metrics and --server take it: one parser for all.
TEST(SnapshotLocationTest, ParsesHostPort) {
  using Server = SnapshotLocation::Server;
  auto v6 = Server::parse("[fd00::2]:7071");
  ASSERT_TRUE(v6.ok());
  EXPECT_EQ(v6->host, "fd00::2");
  EXPECT_EQ(v6->port, 7071);
  EXPECT_EQ(v6->to_string(), "[fd00::2]:7071");
  EXPECT_EQ(Server::parse("pages1:65535")->port, 65535);
  EXPECT_FALSE(Server::parse("h:0").ok());  // a client needs a port
  ASSERT_TRUE(Server::parse("h:0", true).ok());  // a listener may let the kernel pick
  EXPECT_EQ(Server::parse("h:0", true)->port, 0);
  for (const char* bad : {"h", "h:", ":7070", "h:65536", "h:99999999999", "h:-1", "h:+1", "h:7x", "h: 7", "[::1:7",
                          "[]:7", "[h]]:7", ""}) {
    EXPECT_FALSE(Server::parse(bad, true).ok()) << bad;
  }
}

// The progress callback (the CLI's bar) covers every region, in order, and ends at the total.
TEST_F(SnapshotFormatTest, ProgressCoversAllRegions) {
  CaptureRegion r[2] = {{"a", mem_, len_ / 2, PROT_READ | PROT_WRITE}, {"b", mem_ + len_ / 2, len_ / 2, PROT_READ | PROT_WRITE}};
  CaptureOptions o;
  o.chunk_size = 4096;  // several calls per region (one per 256 chunks)
  std::vector<std::pair<uint64_t, uint64_t>> calls;
  o.progress = [&](uint64_t done, uint64_t total) { calls.emplace_back(done, total); };
  auto rep = capture_regions(dir_.path() + "/p", std::span(r, 2), o);
  ASSERT_TRUE(rep.ok()) << rep.error().message();
  ASSERT_GE(calls.size(), 4u);
  for (size_t i = 0; i < calls.size(); ++i) {
    EXPECT_EQ(calls[i].second, len_);
    if (i > 0) {
      EXPECT_GT(calls[i].first, calls[i - 1].first);
    }
  }
  EXPECT_EQ(calls.back().first, len_);
}

// A reader closed with reads in flight (a session removed mid-restore) must not free its
// buffers while the kernel may still write into them: it used to, and the reads landed in
// whatever malloc handed out next.
TEST_F(SnapshotFormatTest, ReaderClosedWithReadsInFlightWritesNothingAfter) {
  auto loc = SnapshotLocation::parse(capture("inflight"));
  ASSERT_TRUE(loc.ok());
  auto snap = snapshot::LocalSnapshot::open(*loc, {});
  ASSERT_TRUE(snap.ok()) << snap.error().message();
  if (!(*snap)->uses_uring()) GTEST_SKIP() << "no io_uring here: reads happen inside poll()";
  std::vector<snapshot::ChunkRef> refs = snapshot::stored_chunks((*snap)->manifest());
  // Freed buffers go back to the heap and to the next allocation of their size, as in a
  // long-running process (not straight back to the kernel, where a late write is unseen).
  ::mallopt(M_MMAP_THRESHOLD, 64 * 1024 * 1024);
  struct Null final : snapshot::ChunkSink {
    void on_chunk(uint64_t, std::span<const std::byte>) override {}
    void on_chunk_error(uint64_t, const Error&) override {}
  } sink;
  int rounds_written = 0;
  for (size_t round = 0; round < 20; ++round) {
    std::vector<snapshot::ChunkRequest> rq;
    for (uint64_t i = 0; i < 64; ++i) rq.push_back(snapshot::ChunkRequest{refs[(i * 61 + round * 7) % refs.size()], i, false});
    {
      auto reader = (*snap)->open_reader();
      ASSERT_TRUE(reader.ok());
      ASSERT_TRUE((*reader)->submit(rq).ok());
    }  // closed with its reads in flight
    const size_t size = 64 * (kDefaultChunkSize + 2 * 4096);  // the closed reader's buffers
    void* q = nullptr;
    ASSERT_EQ(::posix_memalign(&q, 4096, size), 0);
    std::memset(q, 0xAA, size);
    // The same reads again, queued behind the first: once they are back, so would the first be.
    {
      auto reader = (*snap)->open_reader();
      ASSERT_TRUE(reader.ok());
      ASSERT_TRUE((*reader)->submit(rq).ok());
      while ((*reader)->in_flight() > 0) ASSERT_TRUE((*reader)->poll(sink, true, 64).ok());
    }
    size_t changed = 0;
    for (size_t i = 0; i < size; ++i) changed += static_cast<unsigned char*>(q)[i] != 0xAA;
    rounds_written += changed != 0;
    std::free(q);
  }
  EXPECT_EQ(rounds_written, 0) << "rounds in which a closed reader's reads wrote into freed memory";
}

// A hostile manifest: a raw-file region so long that (length + chunk_size - 1) wrapped to a
// chunk count of 0, so a region without chunks passed; its first fault read past them.
TEST(ManifestTest, RegionTooLongForItsChunksIsRejected) {
  const uint64_t length = ~uint64_t{0} - 4095;  // 0xffff...f000: page aligned
  Manifest m = testing::one_region_manifest("guest", RegionKind::kRawFile, length, 0);
  auto d = snapshot::decode_manifest(snapshot::encode_manifest(m), "hostile");
  ASSERT_FALSE(d.ok()) << "accepted a region of " << length << " bytes and no chunks";
  EXPECT_EQ(d.error().code(), Errc::kCorrupt);
  EXPECT_NE(d.error().message().find("length"), std::string::npos) << d.error().message();
  // Past the cap with the chunks it would need is refused too, before they are counted.
  m.regions[0].length = snapshot::kMaxRegionLength + 4096;
  d = snapshot::decode_manifest(snapshot::encode_manifest(m), "hostile");
  EXPECT_FALSE(d.ok());
}

// A region's huge page size (the memory's, for the restore) must be a power of two above 4 KiB
// that its address and length are multiples of; read back as written.
TEST(ManifestTest, HugePageSizeIsKeptAndChecked) {
  Manifest m = testing::one_region_manifest("guest", RegionKind::kProcess, 4 << 20, 64);
  m.regions[0].start_address = 0x7f0000000000;
  m.regions[0].huge_page_size = 2 << 20;
  auto d = snapshot::decode_manifest(snapshot::encode_manifest(m), "test");
  ASSERT_TRUE(d.ok()) << d.error().message();
  EXPECT_EQ(d->regions[0].huge_page_size, uint64_t{2} << 20);
  for (auto [size, at] : {std::pair<uint64_t, uint64_t>{3 << 20, 0x7f0000000000}, {4096, 0x7f0000000000},
                          {2 << 20, 0x7f0000001000}, {uint64_t{2} << 30, 0x7f0000000000}}) {
    m.regions[0].huge_page_size = size;
    m.regions[0].start_address = at;
    d = snapshot::decode_manifest(snapshot::encode_manifest(m), "hostile");
    ASSERT_FALSE(d.ok()) << size << " at " << at;
    EXPECT_EQ(d.error().code(), Errc::kCorrupt);
    EXPECT_NE(d.error().message().find("huge page size"), std::string::npos) << d.error().message();
  }
}

}  // namespace
}  // namespace lazymem
