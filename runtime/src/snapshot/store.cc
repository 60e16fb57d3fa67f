// Local snapshot store: a directory of named snapshots, each written atomically.
#include "snapshot/store.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <signal.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <map>
#include <optional>
#include <string_view>
#include <tuple>

#include "snapshot/manifest.h"
#include "sys/syscall_result.h"

namespace lazymem::snapshot {
namespace {

namespace fs = std::filesystem;

Status write_all(int fd, std::span<const std::byte> data, const std::string& what) {
  size_t done = 0;
  while (done < data.size()) {
    auto r = sys::call([&] { return ::write(fd, data.data() + done, data.size() - done); });
    if (!r.ok()) return r.error(what);
    done += static_cast<size_t>(r.value);
  }
  return ok_status();
}

Error not_a_snapshot(const std::string& dir, const char* doing) {
  return Error(Errc::kExists, fmt::format("{} is not a lazymem snapshot (it holds other files); not {} it", dir, doing));
}

// A capture's target that is there and is no snapshot: mostly the store itself given as the
// target (`snapshot --raw vm.mem store`), so the message says where the snapshot would go.
Error target_not_a_snapshot(const std::string& dir) {
  std::error_code ec;
  if (fs::is_symlink(fs::symlink_status(dir, ec))) {  // a snapshot is never read or written through one
    return Error(Errc::kExists, fmt::format("{} is a symbolic link; not writing through it: choose another name, or "
                                            "remove the link", dir));
  }
  if (fs::is_directory(fs::status(dir, ec))) {
    return Error(Errc::kExists, fmt::format("{} is not a lazymem snapshot but a directory of other files; not writing "
                                            "over it (a store? did you mean {}/NAME?)", dir, dir));
  }
  return Error(Errc::kExists, fmt::format("{} is not a lazymem snapshot (not a directory); not writing over it: "
                                          "choose another name", dir));
}

// Said to programs and to the CLIs (whose flag is --replace) alike, and by a page server to an
// upload's client, which may be either.
Error already_exists(const std::string& dir, int err = 0) {
  return Error(Errc::kExists, fmt::format("snapshot {} already exists: choose another name, or replace it (--replace; "
                                          "CaptureOptions::replace in a program)", dir), err);
}

// A store path one level too deep (a snapshot's own directory: it has a manifest) is refused
// where a store is read or written.
Status check_not_a_snapshot(const std::string& store_dir) {
  std::error_code ec;
  if (!fs::exists(store_dir + "/" + kManifestFile, ec)) return ok_status();
  return Error(Errc::kInvalidArgument,
               fmt::format("{} is a snapshot, not a store: give the directory that holds snapshots", store_dir));
}

Status fsync_path(const std::string& path) {
  sys::UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECTORY));
  if (!fd.valid()) return sys_error("open " + path, errno);
  if (::fsync(fd.get()) != 0) return sys_error("fsync " + path, errno);
  return ok_status();
}

class LocalSink final : public SnapshotSink {
 public:
  LocalSink(SnapshotLocation loc, std::string tmp_dir, sys::UniqueFd data, bool replace)
      : loc_(std::move(loc)), tmp_dir_(std::move(tmp_dir)), data_(std::move(data)),
        lock_(::fcntl(data_.get(), F_DUPFD_CLOEXEC, 0)), replace_(replace) {}
  ~LocalSink() override {
    if (!committed_) abort();
  }

  Status append(std::span<const std::byte> data) override {
    return write_all(data_.get(), data, fmt::format("write snapshot data in {}", tmp_dir_));
  }

  Status commit(std::span<const std::byte> manifest) override {
    if (::fsync(data_.get()) != 0) return sys_error("fsync snapshot data in " + tmp_dir_, errno);
    data_.reset();
    std::string mpath = tmp_dir_ + "/" + kManifestFile;
    sys::UniqueFd mfd(::open(mpath.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
    if (!mfd.valid()) return sys_error("create " + mpath, errno);
    LAZYMEM_TRY(write_all(mfd.get(), manifest, "write " + mpath));
    if (::fsync(mfd.get()) != 0) return sys_error("fsync " + mpath, errno);
    mfd.reset();
    LAZYMEM_TRY(fsync_path(tmp_dir_));
    std::string final_dir = loc_.store_dir + "/" + loc_.name;
    // A replacement is swapped in one step, so the name always points at a complete snapshot
    // (two renames would leave a moment with none); the old one is then in the temporary
    // directory, deleted with it. Nothing to replace (any more): put in place as new.
    if (replace_ && ::renameat2(AT_FDCWD, tmp_dir_.c_str(), AT_FDCWD, final_dir.c_str(), RENAME_EXCHANGE) == 0) {
      // What was swapped out is deleted: it must be a snapshot, whatever was there at open.
      if (!is_snapshot_dir(tmp_dir_)) {
        if (::renameat2(AT_FDCWD, tmp_dir_.c_str(), AT_FDCWD, final_dir.c_str(), RENAME_EXCHANGE) != 0) {
          // Not swapped back: the directory stays where it is now, and is not deleted with ours.
          const int e = errno;
          committed_ = true;
          lock_.reset();
          return sys_error(fmt::format("{} was not a lazymem snapshot, and putting it back failed: it is now at {} "
                                       "(move it back by hand; the new snapshot took its place)", final_dir, tmp_dir_), e);
        }
        return not_a_snapshot(final_dir, "replacing");
      }
      std::error_code ec;
      fs::remove_all(tmp_dir_, ec);
    } else if (replace_ && errno == EINVAL) {
      // A filesystem without RENAME_EXCHANGE: the old one is moved out of the way first (a
      // moment with no snapshot under the name), then the new one in.
      LAZYMEM_ASSIGN_OR_RETURN(std::string old, retire_snapshot(loc_));
      if (::rename(tmp_dir_.c_str(), final_dir.c_str()) != 0) {
        const int e = errno;
        (void)::rename(old.c_str(), final_dir.c_str());
        return sys_error("rename into " + final_dir, e);
      }
      std::error_code ec;
      fs::remove_all(old, ec);
    } else if (replace_ && errno != ENOENT) {
      return sys_error("swap the new snapshot into " + final_dir, errno);
    } else if (::renameat2(AT_FDCWD, tmp_dir_.c_str(), AT_FDCWD, final_dir.c_str(), RENAME_NOREPLACE) != 0) {
      int e = errno;
      if (e == EEXIST) return already_exists(final_dir, e);
      return sys_error("rename into " + final_dir, e);
    }
    committed_ = true;
    lock_.reset();
    return fsync_path(loc_.store_dir);
  }

  void abort() override {
    data_.reset();
    std::error_code ec;
    fs::remove_all(tmp_dir_, ec);
    lock_.reset();
    committed_ = true;  // nothing left to clean
  }

  std::string describe() const override { return loc_.to_string(); }

 private:
  SnapshotLocation loc_;
  std::string tmp_dir_;
  sys::UniqueFd data_;
  // The data file's lock (flock, taken at open), held until the snapshot is in place or gone:
  // gc_leftovers leaves a temporary directory whose data file is locked alone, whatever its pid
  // says (a writer on another host sharing the store, or in another pid namespace). A dup, so
  // that closing the data file at commit keeps it.
  sys::UniqueFd lock_;
  bool replace_;
  bool committed_ = false;
};

}  // namespace

Result<std::unique_ptr<SnapshotSink>> open_local_sink(const SnapshotLocation& loc, bool replace) {
  std::error_code ec;
  if (!fs::is_directory(loc.store_dir, ec)) {
    if (!fs::create_directories(loc.store_dir, ec) && !fs::is_directory(loc.store_dir)) {
      return Error(Errc::kNotFound, fmt::format("snapshot store {} does not exist and cannot be created: {}",
                                                loc.store_dir, ec.message()));
    }
  }
  LAZYMEM_TRY(check_not_a_snapshot(loc.store_dir));
  std::string final_dir = loc.store_dir + "/" + loc.name;
  // What is there is looked at first, replacing or not: "already exists, replace it" about a
  // directory that is no snapshot would send the user to a --replace that refuses it too.
  if (fs::exists(final_dir, ec)) {
    if (!is_snapshot_dir(final_dir)) return target_not_a_snapshot(final_dir);
    if (!replace) return already_exists(final_dir);
  }
  // What killed writers left (a capture stopped with ^C) goes here too, not only when a server
  // starts: a store written by captures alone would otherwise keep it.
  (void)gc_leftovers(loc.store_dir);
  static std::atomic<unsigned> counter{0};
  std::string tmp = fmt::format("{}/.{}.tmp-{}-{}", loc.store_dir, loc.name, ::getpid(), counter++);
  if (::mkdir(tmp.c_str(), 0755) != 0) return sys_error("create " + tmp, errno);
  std::string dpath = tmp + "/" + kDataFile;
  sys::UniqueFd fd(::open(dpath.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
  if (!fd.valid()) {
    int e = errno;
    fs::remove_all(tmp, ec);
    return sys_error("create " + dpath, e);
  }
  // New, so nobody else holds it; a filesystem without locks (ENOLCK) leaves the pid alone to
  // say whether the writer lives.
  (void)::flock(fd.get(), LOCK_EX | LOCK_NB);
  return std::unique_ptr<SnapshotSink>(new LocalSink(loc, tmp, std::move(fd), replace));
}

Result<std::vector<std::byte>> read_small_file(const std::string& path, uint64_t limit, int dir_fd) {
  sys::UniqueFd fd(::openat(dir_fd, path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
  if (!fd.valid()) return sys_error("open " + path, errno);
  return read_small_fd(fd.get(), path, limit);
}

Result<std::vector<std::byte>> read_small_fd(int fd, const std::string& path, uint64_t limit) {
  struct stat st{};
  if (::fstat(fd, &st) != 0) return sys_error("stat " + path, errno);
  if (!S_ISREG(st.st_mode)) return Error(Errc::kInvalidArgument, fmt::format("{} is not a regular file", path));
  if (static_cast<uint64_t>(st.st_size) > limit) {
    return Error(Errc::kCorrupt, fmt::format("{} is {} bytes, more than the {} allowed", path, st.st_size, limit));
  }
  std::vector<std::byte> out(static_cast<size_t>(st.st_size));
  size_t done = 0;
  while (done < out.size()) {
    auto r = sys::call([&] { return ::read(fd, out.data() + done, out.size() - done); });
    if (!r.ok()) return r.error("read " + path);
    if (r.value == 0) break;
    done += static_cast<size_t>(r.value);
  }
  out.resize(done);
  return out;
}

namespace {

// What is_snapshot_dir found: the stat of each of the two files present, so a listing need not
// look them up again.
struct SnapshotDirFiles {
  std::optional<struct stat> manifest, data;
};

std::optional<SnapshotDirFiles> inspect_snapshot_dir(const std::string& dir) {
  sys::UniqueFd dfd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW));
  if (!dfd.valid()) return std::nullopt;
  struct CloseDir {
    void operator()(DIR* d) const { ::closedir(d); }
  };
  const int listing = ::fcntl(dfd.get(), F_DUPFD_CLOEXEC, 0);
  std::unique_ptr<DIR, CloseDir> d(listing >= 0 ? ::fdopendir(listing) : nullptr);
  if (!d) {
    if (listing >= 0) ::close(listing);
    return std::nullopt;
  }
  SnapshotDirFiles files;
  while (const dirent* e = ::readdir(d.get())) {
    const std::string_view n = e->d_name;
    if (n == "." || n == "..") continue;
    struct stat st{};
    if ((n != kManifestFile && n != kDataFile) || ::fstatat(dfd.get(), e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0 ||
        !S_ISREG(st.st_mode)) {
      return std::nullopt;
    }
    (n == kDataFile ? files.data : files.manifest) = st;
  }
  if (files.data || !files.manifest) return files;  // a manifest beside data, damaged or not, is the snapshot's; or empty
  sys::UniqueFd m(::openat(dfd.get(), kManifestFile, O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  if (!m.valid()) return errno == ENOENT ? std::optional(SnapshotDirFiles{}) : std::nullopt;  // gone since: empty
  char magic[sizeof kManifestMagic];
  if (::read(m.get(), magic, sizeof magic) != static_cast<ssize_t>(sizeof magic) ||
      std::memcmp(magic, kManifestMagic, sizeof magic) != 0) {
    return std::nullopt;
  }
  return files;
}

bool same_time(const timespec& a, const timespec& b) { return a.tv_sec == b.tv_sec && a.tv_nsec == b.tv_nsec; }

// A snapshot's summary from its manifest (`damage` set if the manifest is unreadable or fails
// its checks), and how many bytes its data file must hold.
std::pair<SnapshotSummary, uint64_t> read_summary(const std::string& dir, const std::string& name) {
  SnapshotSummary s;
  s.name = name;
  auto bytes = read_small_file(dir + "/" + kManifestFile, kMaxManifestBytes);
  auto m = bytes.ok() ? decode_manifest(*bytes, dir) : Result<Manifest>(std::move(bytes).error());
  if (!m.ok()) {
    s.damage = m.error().message();
    return {std::move(s), 0};
  }
  s.total_bytes = m->total_bytes();
  s.stored_bytes = m->stored_bytes();
  s.regions = m->regions.size();
  s.created_unix_ns = m->created_unix_ns;
  s.format_version = m->format_version;
  uint64_t needed = 0;
  for (const auto& r : m->regions)
    for (const auto& c : r.chunks) needed = std::max(needed, c.offset + c.stored_length);
  return {std::move(s), needed};
}

}  // namespace

bool is_snapshot_dir(const std::string& dir) { return inspect_snapshot_dir(dir).has_value(); }

Result<std::vector<SnapshotSummary>> list_store(const std::string& store_dir, ListingCache* cache) {
  std::error_code ec;
  if (!fs::is_directory(store_dir, ec)) {
    return Error(Errc::kNotFound, fmt::format("snapshot store {} is not a directory", store_dir));
  }
  LAZYMEM_TRY(check_not_a_snapshot(store_dir));
  std::vector<SnapshotSummary> out;
  fs::directory_iterator it(store_dir, ec);
  if (ec) return Error(Errc::kIo, fmt::format("snapshot store {}: {}", store_dir, ec.message()));
  std::map<std::string, ListingCache::Entry> seen;  // the cache's entries for this listing
  for (const auto& entry : it) {
    std::string name = entry.path().filename().string();
    if (name.empty() || name[0] == '.' || !entry.is_directory(ec)) continue;
    const std::string dir = entry.path().string();
    const auto files = inspect_snapshot_dir(dir);
    if (!files) continue;
    SnapshotSummary s;
    uint64_t needed = 0;  // bytes the data file must hold
    // The manifest's identity first, then its bytes: a file changed between the two is read
    // again next time (its identity is another by then), never kept under its new identity
    // with what it said before.
    if (cache && files->manifest) {
      const struct stat& ms = *files->manifest;
      ListingCache::Entry e;
      auto hit = cache->entries_.find(name);
      if (hit != cache->entries_.end() && hit->second.dev == ms.st_dev && hit->second.ino == ms.st_ino &&
          hit->second.size == ms.st_size && same_time(hit->second.mtime, ms.st_mtim) &&
          same_time(hit->second.ctime, ms.st_ctim)) {
        e = std::move(hit->second);
      } else {
        auto [summary, bytes] = read_summary(dir, name);
        cache->reads_.fetch_add(1, std::memory_order_relaxed);
        e = ListingCache::Entry{ms.st_dev, ms.st_ino, ms.st_size, ms.st_mtim, ms.st_ctim, std::move(summary), bytes};
      }
      s = e.summary;
      needed = e.data_needed;
      seen.emplace(name, std::move(e));
    } else {
      // No manifest to identify (what reading it says is the damage): read as without a cache.
      if (cache) cache->reads_.fetch_add(1, std::memory_order_relaxed);
      std::tie(s, needed) = read_summary(dir, name);
    }
    if (!s.damage.empty()) {
      out.push_back(std::move(s));
      continue;
    }
    // The data file must hold every stored chunk (a truncated copy would fail its restores).
    if (!files->data) {
      s.damage = fmt::format("{}/{}: {}", dir, kDataFile, std::strerror(ENOENT));
    } else if (static_cast<uint64_t>(files->data->st_size) < needed) {
      s.damage = fmt::format("{}/{} is {} bytes; its manifest needs {}", dir, kDataFile, files->data->st_size, needed);
    }
    out.push_back(std::move(s));
  }
  if (cache) cache->entries_ = std::move(seen);  // snapshots gone from the store are forgotten
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  return out;
}

Result<std::string> retire_snapshot(const SnapshotLocation& loc) {
  std::string dir = loc.store_dir + "/" + loc.name;
  struct stat st{};
  if (::lstat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return Error(Errc::kNotFound, fmt::format("no snapshot '{}' in store {}", loc.name, loc.store_dir));
  }
  if (!is_snapshot_dir(dir)) return not_a_snapshot(dir, "removing");
  // Renamed first, so a reader sees the whole snapshot or none; deleting a large data file takes
  // a while, and what is left of it after a crash is a leftover (gc_leftovers).
  static std::atomic<unsigned> counter{0};
  std::string doomed = fmt::format("{}/.{}.rm-{}-{}", loc.store_dir, loc.name, ::getpid(), counter++);
  if (::rename(dir.c_str(), doomed.c_str()) != 0) return sys_error("remove snapshot " + dir, errno);
  return doomed;
}

Status remove_snapshot(const SnapshotLocation& loc) {
  LAZYMEM_ASSIGN_OR_RETURN(std::string doomed, retire_snapshot(loc));
  std::error_code ec;
  fs::remove_all(doomed, ec);
  if (ec) return Error(Errc::kIo, fmt::format("snapshot {} is removed, but deleting {} failed: {}", loc.name, doomed, ec.message()));
  return ok_status();
}

namespace {

// The pid in a leftover's name, ".<name>.tmp-<pid>-<n>" or ".<name>.rm-<pid>-<n>" (all digits,
// a pid in range); nothing for any other name.
std::optional<pid_t> leftover_pid(const std::string& name) {
  if (name.size() < 2 || name[0] != '.') return std::nullopt;
  const size_t dash = name.rfind('-');
  if (dash == std::string::npos || dash + 1 == name.size()) return std::nullopt;
  auto digits = [](std::string_view s) {
    return !s.empty() && s.size() <= 9 && std::all_of(s.begin(), s.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
  };
  if (!digits(std::string_view(name).substr(dash + 1))) return std::nullopt;
  const size_t pid_dash = name.rfind('-', dash - 1);
  if (pid_dash == std::string::npos) return std::nullopt;
  const std::string_view pid = std::string_view(name).substr(pid_dash + 1, dash - pid_dash - 1);
  const std::string_view kind = std::string_view(name).substr(0, pid_dash);
  if (!digits(pid) || !(kind.ends_with(".tmp") || kind.ends_with(".rm")) || kind.size() < 5) return std::nullopt;
  const long value = std::stol(std::string(pid));
  if (value <= 0) return std::nullopt;
  return static_cast<pid_t>(value);
}

}  // namespace

// How long a temporary directory is left alone after it was made (or last had a file created in
// it), whatever its pid says: see gc_leftovers.
constexpr time_t kLeftoverGraceSeconds = 60;

size_t gc_leftovers(const std::string& store_dir) {
  size_t removed = 0;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(store_dir, ec)) {
    // Ours are ".<name>.tmp-<pid>-<n>" and ".<name>.rm-<pid>-<n>" (snapshot names never start
    // with '.'); the process that made one is alive while it writes or deletes it. A pid is
    // only meaningful on this host and in this pid namespace, so a writer's data file is also
    // locked while it writes (LocalSink::lock_): one whose lock is held is kept, whatever its
    // pid, and a store shared between hosts or containers loses no upload in progress. The lock
    // comes a moment after the directory (mkdir, create, flock): one made within the last
    // minute is kept too. (A removal deleted twice at once loses nothing.)
    const std::string name = entry.path().filename().string();
    const auto pid = leftover_pid(name);
    if (!pid || *pid == ::getpid() || ::kill(*pid, 0) == 0 || errno != ESRCH) continue;
    struct stat st {};
    if (::lstat(entry.path().c_str(), &st) != 0 || ::time(nullptr) - st.st_mtime < kLeftoverGraceSeconds) continue;
    sys::UniqueFd data(::open((entry.path() / kDataFile).c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK));
    if (data.valid() && ::flock(data.get(), LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK) continue;
    std::error_code rm_ec;
    if (fs::remove_all(entry.path(), rm_ec) > 0 && !rm_ec) ++removed;
  }
  return removed;
}

}  // namespace lazymem::snapshot
