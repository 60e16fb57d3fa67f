// Test helpers: deterministic memory contents of mixed kinds and scratch directories.
#pragma once

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>

namespace lazymem::testing {

// Whether every one of `len` bytes at `p` is zero.
inline bool all_zero(const std::byte* p, size_t len) {
  for (size_t i = 0; i < len; ++i)
    if (p[i] != std::byte{0}) return false;
  return true;
}

// Fills `len` bytes with a mix that exercises every codec path: random (stored raw), text-like
// records (zstd), all-zero chunks (not stored) and chunks with zero pages inside.
inline void fill_mixed(std::byte* p, size_t len, uint64_t seed) {
  std::mt19937_64 rng(seed);
  static const char* kWords[] = {"alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
                                 "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa"};
  constexpr size_t kBlock = 256 * 1024;
  for (size_t off = 0; off < len; off += kBlock) {
    size_t n = std::min(kBlock, len - off);
    std::byte* b = p + off;
    switch ((off / kBlock + seed) % 4) {
      case 0:  // random
        for (size_t i = 0; i + 8 <= n; i += 8) {
          uint64_t v = rng();
          std::memcpy(b + i, &v, 8);
        }
        break;
      case 1: {  // text records
        size_t i = 0;
        while (i < n) {
          char rec[96];
          int k = std::snprintf(rec, sizeof rec, "id=%llu name=%s city=%s score=%u;\n",
                                static_cast<unsigned long long>(rng() % 1000000), kWords[rng() % 16],
                                kWords[rng() % 16], static_cast<unsigned>(rng() % 1000));
          size_t m = std::min(static_cast<size_t>(k), n - i);
          std::memcpy(b + i, rec, m);
          i += m;
        }
        break;
      }
      case 2:  // zeros
        std::memset(b, 0, n);
        break;
      default:  // sparse: mostly zero pages with a few numbers
        std::memset(b, 0, n);
        for (size_t i = 0; i < n; i += 4096 * 3) {
          uint64_t v = rng();
          std::memcpy(b + i + (rng() % 4000), &v, 8);
        }
    }
  }
}

// Memory to capture, at an address of its own (per seed) far from where malloc and thread
// stacks go: after it is unmapped, a restore must find the range still free, even once the
// test has started threads (whose malloc arenas would happily reuse a freed range).
inline void* map_for_capture(size_t len, uint64_t seed) {
#if defined(__SANITIZE_THREAD__)
  // ThreadSanitizer keeps its shadow where the addresses below are; its application range
  // starts at 0x7e8000000000 (and holds the libraries near its top: stay low, 4 GiB apart).
  uintptr_t at = 0x7e8000000000ULL + (seed % 64) * (uintptr_t{1} << 32);
#else
  uintptr_t at = 0x6a0000000000ULL + (seed % 64) * (uintptr_t{1} << 34);
#endif
  void* p = ::mmap(reinterpret_cast<void*>(at), len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
  return p == MAP_FAILED ? nullptr : p;
}

// Every scratch directory of a test process lies under one root (on disk, in /var/tmp, so that
// O_DIRECT applies), removed when the process exits. Processes it starts inherit the root
// (LAZYMEM_TEST_SCRATCH_ROOT) and put theirs in it too: a death test re-runs the test binary,
// whose fixture makes its own scratch directory and then leaves by _exit(), never removing it.
inline const std::string& scratch_root() {
  struct Root {
    std::string path = "/var/tmp";
    pid_t made_by = 0;  // 0: inherited (or none could be made): not ours to remove
    Root() {
      if (const char* inherited = std::getenv("LAZYMEM_TEST_SCRATCH_ROOT")) {
        path = inherited;
        return;
      }
      std::string tmpl = "/var/tmp/lazymem-test-XXXXXX";
      if (::mkdtemp(tmpl.data()) == nullptr) return;
      path = tmpl;
      made_by = ::getpid();
      ::chmod(path.c_str(), 0711);  // tests acting as other users reach their directories through it
      ::setenv("LAZYMEM_TEST_SCRATCH_ROOT", path.c_str(), 1);
    }
    ~Root() {  // not in a forked child leaving through exit(): the root is its parent's
      if (made_by != ::getpid()) return;
      std::error_code ec;
      std::filesystem::remove_all(path, ec);
    }
  };
  static const Root root;
  return root.path;
}
// Made before main(), while the process has one thread (setenv is not safe beside others).
inline const bool kScratchRootMade = !scratch_root().empty();

// A fresh directory under scratch_root(), removed at destruction.
class ScratchDir {
 public:
  ScratchDir() {
    std::string tmpl = scratch_root() + "/d-XXXXXX";
    char* d = ::mkdtemp(tmpl.data());
    path_ = d ? d : "";
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

}  // namespace lazymem::testing
