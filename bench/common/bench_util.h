// Shared by the benchmark programs: a heap-like snapshot made in a child process, runs in
// fresh children (snapshots restore at fixed addresses), medians, page touching.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <vector>

#include "../../examples/kv_table.h"
#include "lazymem/snapshot.h"

namespace lazymem::bench {

// A bench's scratch directory, <dir>/lazymem-bench-<name>.<pid>/store made, once its numeric
// flags were found positive (`positive`: each one's name and value). --dir must exist: a typo
// is refused, not created at the root.
inline std::string make_work_dir(const std::string& dir, const char* name,
                                 std::initializer_list<std::pair<const char*, long>> positive) {
  for (const auto& [flag, value] : positive) {
    if (value < 1) throw std::invalid_argument(std::string("--") + flag + " wants 1 or more");
  }
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) throw std::invalid_argument("--dir " + dir + " is not a directory");
  std::string work = dir + "/lazymem-bench-" + name + "." + std::to_string(::getpid());
  std::filesystem::create_directories(work + "/store");
  return work;
}

using Clock = std::chrono::steady_clock;
constexpr uintptr_t kArena = 0x5b0000000000;
constexpr size_t kPage = 4096;

inline double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// Sleeps `ms` milliseconds: between blocks of measurements, so polling servers go idle.
inline void pause_ms(long ms) {
  timespec ts{ms / 1000, ms % 1000 * 1'000'000};
  ::nanosleep(&ts, nullptr);
}

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

inline double percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  if (v.empty()) return 0;
  size_t i = std::min(v.size() - 1, static_cast<size_t>(p / 100.0 * static_cast<double>(v.size())));
  return v[i];
}

// One byte per page, in address order: a scan of a restored heap.
inline uint64_t touch_all(const volatile unsigned char* p, size_t len) {
  uint64_t s = 0;
  for (size_t off = 0; off < len; off += kPage) s += p[off];
  return s;
}

// Runs fn() -> T (trivially copyable) in a child; T{} if the child died.
template <typename T, typename Fn>
T in_child(Fn&& fn) {
  int fds[2];
  if (::pipe(fds) != 0) return T{};
  pid_t pid = ::fork();
  if (pid == 0) {
    ::close(fds[0]);
    T v = fn();
    (void)!::write(fds[1], &v, sizeof v);
    _exit(0);
  }
  ::close(fds[1]);
  T v{};
  if (::read(fds[0], &v, sizeof v) != static_cast<ssize_t>(sizeof v)) v = T{};
  ::close(fds[0]);
  ::waitpid(pid, nullptr, 0);
  return v;
}

struct MadeSnapshot {
  uint64_t hash = 0;       // xxh3 of every byte
  double ratio = 0;        // compression
  uint64_t stored = 0;
  uint64_t chunks = 0;
  int ok = 0;
};

// Builds a hash table of records (~5x with zstd-1) at kArena in a child and captures it to
// `location`; `raw_image` (optional) also gets the uncompressed bytes.
inline MadeSnapshot make_heap_snapshot(const std::string& location, size_t len, const std::string& raw_image = "",
                                       uint32_t chunk_size = 64 * 1024) {
  return in_child<MadeSnapshot>([&] {
    MadeSnapshot made;
    void* a = ::mmap(reinterpret_cast<void*>(kArena), len, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (a == MAP_FAILED) return made;
    lazymem::example::KvTable t(a, len);
    t.fill(7, 0.7);
    lazymem::CaptureRegion r{"heap", a, len, PROT_READ | PROT_WRITE};
    lazymem::CaptureOptions opts;
    opts.chunk_size = chunk_size;
    auto rep = lazymem::capture_regions(location, std::span(&r, 1), opts);
    if (!rep.ok()) {
      std::fprintf(stderr, "capture: %s\n", rep.error().message().c_str());
      return made;
    }
    if (!raw_image.empty()) {
      int fd = ::open(raw_image.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      bool wrote = fd >= 0 && ::write(fd, a, len) == static_cast<ssize_t>(len) && ::fsync(fd) == 0;
      if (fd >= 0) ::close(fd);
      if (!wrote) return made;
    }
    made = MadeSnapshot{XXH3_64bits(a, len), double(rep->total_bytes) / double(rep->stored_bytes), rep->stored_bytes,
                        rep->chunks, 1};
    return made;
  });
}

}  // namespace lazymem::bench
