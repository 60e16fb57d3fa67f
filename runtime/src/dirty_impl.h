// What a DirtyTracker is made of: one way of knowing which pages were written (DirtyMethod).
#pragma once

#include <vector>

#include "lazymem/dirty.h"
#include "lazymem/result.h"

namespace lazymem {

struct DirtyTracker::Impl {
  Impl(std::vector<AddressRange> r, DirtyMethod m) : ranges(std::move(r)), method(m) {}
  // Stops tracking: the ranges are unregistered, and writes no longer pay for it.
  virtual ~Impl() = default;
  virtual Result<std::vector<AddressRange>> collect() = 0;

  const std::vector<AddressRange> ranges;  // sorted
  const DirtyMethod method;
};

}  // namespace lazymem
