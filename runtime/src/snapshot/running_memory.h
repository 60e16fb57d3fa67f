// Reading memory that other threads of this process may be writing meanwhile: a live capture's
// regions (capture_regions_live). The race is the point: each word read holds what it held at
// some moment, and the dirty tracker reports every page written after the tracking began, which
// is stored again. ThreadSanitizer would report each such read; its builds read word by word in
// a function it does not instrument, everything else reads as memcpy does.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__SANITIZE_THREAD__)
#define LAZYMEM_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define LAZYMEM_TSAN 1
#endif
#endif

namespace lazymem::snapshot {

#ifdef LAZYMEM_TSAN
__attribute__((no_sanitize("thread"), noinline)) inline void copy_running_memory(std::byte* dst, const std::byte* src,
                                                                                 size_t n) {
  const volatile std::byte* s = src;
  for (size_t i = 0; i < n; ++i) dst[i] = s[i];
}
#else
inline void copy_running_memory(std::byte* dst, const std::byte* src, size_t n) { std::memcpy(dst, src, n); }
#endif

}  // namespace lazymem::snapshot
