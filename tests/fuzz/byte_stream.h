// What both fuzzed peers' decoders share: bytes arriving as recv() delivers them, and the
// replay tests' mutations of seed inputs.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <span>
#include <vector>

#include "net/frame.h"

namespace lazymem::fuzz {

// Feeds `data` to a FrameBuffer in uneven pieces and calls `on_frame(FrameView)` for each whole
// frame, as a server's read loop does. Stops at the first broken frame (the server closes the
// connection there) or when `on_frame` returns false.
template <typename OnFrame>
void feed_frames(std::span<const uint8_t> data, OnFrame&& on_frame) {
  net::FrameBuffer buf;
  size_t pos = 0, step = 1;
  while (pos < data.size()) {
    const size_t n = std::min(step, data.size() - pos);
    auto space = buf.writable(n);
    std::memcpy(space.data(), data.data() + pos, n);
    buf.commit(n);
    pos += n;
    step = step * 3 % 4093 + 1;
    for (;;) {
      auto f = buf.next();
      if (!f.ok()) return;
      if (!f->has_value()) break;
      if (!on_frame(**f)) return;
      buf.consume();
    }
  }
}

// One mutation of `d`, a copy of a seed: bits flipped, cut short, a word rewritten (one of the
// frame's two lengths, a third of the time), or a piece of another seed spliced on.
inline void mutate(std::vector<uint8_t>& d, std::mt19937_64& rng, const std::vector<std::vector<uint8_t>>& seeds) {
  if (d.empty()) return;
  switch (rng() % 4) {
    case 0:
      for (int k = 0; k < 4; ++k) d[rng() % d.size()] ^= static_cast<uint8_t>(1u << (rng() % 8));
      break;
    case 1:
      d.resize(rng() % d.size());
      break;
    case 2: {
      const uint32_t v = static_cast<uint32_t>(rng());
      const size_t at = rng() % 3 == 0 ? (rng() % 2) * 4 : (rng() % (d.size() / 4 + 1)) * 4;
      if (d.size() >= at + 4) std::memcpy(d.data() + at, &v, 4);
      break;
    }
    default: {
      const auto& o = seeds[rng() % seeds.size()];
      if (!o.empty()) d.insert(d.end(), o.begin(), o.begin() + static_cast<long>(rng() % o.size()));
    }
  }
}

}  // namespace lazymem::fuzz
