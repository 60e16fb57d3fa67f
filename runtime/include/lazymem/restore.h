// Lazy restore: map a snapshot's regions back at their addresses and fill them on first touch.
//
//   auto r = lazymem::LazyRestore::start("/var/lib/lazymem/store/app");
//   if (!r.ok()) { ... r.error().message() ... }
//   use((*r)->region("heap")->address);   // pages arrive as they are touched
//
// A handler thread inside this process reads the faults, fetches the chunks (local store or
// page server), verifies and decodes them and installs them with UFFDIO_COPY. Background
// prefetch fills the rest while the application runs.
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "lazymem/kernel_features.h"
#include "lazymem/result.h"
#include "lazymem/snapshot.h"
#include "lazymem/stats.h"

namespace lazymem {

struct RestoreOptions {
  bool prefetch = true;              // fill untouched pages in the background
  std::string token_file;            // page-server token, for lazymem:// sources
  bool direct_io = true;             // local store: O_DIRECT (falls back to buffered where refused)
  bool force_pread = false;          // local store: no io_uring
  unsigned reads_in_flight = 64;     // chunk requests outstanding per source
  unsigned fetch_attempts = 3;       // tries per chunk before its pages are failed
  std::chrono::milliseconds fault_deadline{30000};  // a faulting thread waits at most this long
  // Page-server sources: a faulting thread fetches and installs its own page (one round trip,
  // no hand-off to the handler thread), inside a SIGBUS handler; background prefetch stays on
  // the handler thread. Caveat: while it is on, a system call that writes into a page not yet
  // restored fails with EFAULT instead of waiting (userfaultfd's SIGBUS mode), a thread that
  // touches one with SIGBUS blocked is killed, and fork() first completes the restore. See
  // docs/design-notes.md, "Faults on the faulting thread".
  bool fault_on_thread = false;
  unsigned fault_connections = 2;  // page-server connections the faulting threads share
  // An earlier version of the same snapshot that lies nearer (a store, or a page server, given
  // the same token): every chunk whose manifest entry is unchanged in the snapshot is read from
  // there, the rest from the snapshot's location. What a migration's destination restores with:
  // the location is the paused source (MigrationSource::location()), the base the pre-copy.
  std::string base;
  // Regions captured from huge-page memory (RegionInfo::huge_page_size) are restored into huge
  // pages of that size, reserved when mapped (an error says so where the pool lacks them);
  // false: into ordinary pages.
  bool huge_pages = true;
};

struct RestoredRegion {
  std::string name;
  void* address = nullptr;
  size_t length = 0;
};

class LazyRestore {
 public:
  // Maps every region at its recorded address (failing, with nothing left mapped, if any range
  // is taken), registers them with userfaultfd and starts serving faults.
  static Result<std::unique_ptr<LazyRestore>> start(const std::string& location, const KernelFeatures& features,
                                                    const RestoreOptions& options = {});
  static Result<std::unique_ptr<LazyRestore>> start(const std::string& location, const RestoreOptions& options = {});

  // Completes the restore (fetching whatever is still missing), then hands the memory over.
  // Never leaves pages unrestored behind: a closed userfaultfd would let the kernel zero-fill them.
  ~LazyRestore();

  const std::vector<RestoredRegion>& regions() const;
  const RestoredRegion* region(std::string_view name) const;
  const std::vector<std::byte>& app_state() const;
  RestoreStats stats() const;

  // Fetches everything still missing (turning prefetch on) and waits for it. Returns at the
  // first chunk that cannot be had (its failure), while the rest may still be coming.
  Status wait_complete(std::chrono::milliseconds timeout = std::chrono::hours(24));
  // Fetches everything still missing and waits until every chunk is restored or failed (its
  // pages poisoned: SIGBUS on access), then unregisters the memory and stops the handler.
  // Returns the first failure, if any. Idempotent.
  Status finish();

  struct Impl;

 private:
  explicit LazyRestore(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Restores every region now (read, decompress into place), the way a non-lazy restorer does.
// The memory is left mapped; the caller owns it (munmap when done).
Result<std::vector<RestoredRegion>> restore_eager(const std::string& location, const RestoreOptions& options = {});

}  // namespace lazymem
