// Test and benchmark helper: 2 MiB huge pages (hugetlbfs), made available where the machine has
// none free, and given back after.
//
// A machine without reserved huge pages can still hand out "surplus" ones, allocated when they
// are mapped, up to vm.nr_overcommit_hugepages. As root, the helper raises that limit for the
// test's lifetime and puts it back after. A benchmark asks for pages set aside now instead
// (vm.nr_hugepages), as a host serving huge-page VMs does at boot: they stay in the pool from
// one run to the next, where surplus pages go back to the kernel after each, and the first use
// of fresh pages cost several times the system time here. Users in several processes (meson
// runs suites at once) take a lock first, so one cannot put back a limit another still counts
// on.
#pragma once

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cstddef>
#include <fstream>
#include <sstream>
#include <string>

namespace lazymem::testing {

constexpr size_t kHugePage = size_t{2} << 20;

class HugePages {
 public:
  enum class How { kOnDemand, kSetAside };
  // `pages` huge pages of 2 MiB; unavailable() says why not. kSetAside falls back to kOnDemand
  // where the kernel cannot set that many aside (memory too fragmented).
  explicit HugePages(size_t pages, How how = How::kOnDemand) {
    lock_ = ::open("/tmp/lazymem-test-hugepages.lock", O_RDWR | O_CREAT | O_CLOEXEC, 0666);
    if (lock_ >= 0) (void)::flock(lock_, LOCK_EX);
    if (how == How::kSetAside && ::geteuid() == 0) set_aside(pages);
    const long free_pages = meminfo("HugePages_Free:");
    const long reserved = meminfo("HugePages_Rsvd:");
    const long surplus = meminfo("HugePages_Surp:");
    const long overcommit = read_long(kOvercommit);
    if (free_pages < 0 || reserved < 0 || surplus < 0 || overcommit < 0) {
      why_ = "this kernel has no hugetlbfs (no HugePages_Free in /proc/meminfo)";
      return;
    }
    // Free but reserved pages are promised to mappings already; surplus ones count against
    // the overcommit limit.
    const long room = (free_pages - reserved) + (overcommit - surplus);
    if (room >= static_cast<long>(pages)) return;
    if (::geteuid() != 0) {
      why_ = "no free 2 MiB huge pages; as root: echo " + std::to_string(pages) + " > /proc/sys/vm/nr_hugepages";
      return;
    }
    const long wanted = overcommit + static_cast<long>(pages) - room;
    std::ofstream(kOvercommit) << wanted;
    if (read_long(kOvercommit) != wanted) {
      why_ = "could not raise " + std::string(kOvercommit);
      return;
    }
    restore_ = overcommit;
  }
  ~HugePages() {
    if (restore_ >= 0) std::ofstream(kOvercommit) << restore_;
    if (restore_pool_ >= 0) std::ofstream(kPool) << restore_pool_;
    if (lock_ >= 0) ::close(lock_);
  }
  HugePages(const HugePages&) = delete;
  HugePages& operator=(const HugePages&) = delete;

  // Empty when the pages can be had (mapping them may still fail: surplus pages need 2 MiB of
  // contiguous free memory each).
  const std::string& unavailable() const { return why_; }

 private:
  static constexpr const char* kOvercommit = "/proc/sys/vm/nr_overcommit_hugepages";
  static constexpr const char* kPool = "/proc/sys/vm/nr_hugepages";

  // Grows the pool by what is not free; put back if the kernel could not find that many.
  void set_aside(size_t pages) {
    const long unpromised = meminfo("HugePages_Free:") - meminfo("HugePages_Rsvd:");
    const long pool = read_long(kPool);
    if (pool < 0 || unpromised >= static_cast<long>(pages)) return;
    // From the pages there are now, surplus ones included (they turn into pool pages).
    std::ofstream(kPool) << meminfo("HugePages_Total:") + static_cast<long>(pages) - unpromised;
    restore_pool_ = pool;
    if (meminfo("HugePages_Free:") - meminfo("HugePages_Rsvd:") < static_cast<long>(pages)) {
      std::ofstream(kPool) << pool;
      restore_pool_ = -1;
    }
  }
  static long meminfo(const std::string& key) {
    std::ifstream in("/proc/meminfo");
    std::string line;
    while (std::getline(in, line)) {
      if (line.rfind(key, 0) == 0) return std::stol(line.substr(key.size()));
    }
    return -1;
  }
  static long read_long(const char* path) {
    std::ifstream in(path);
    long v = -1;
    return in >> v ? v : -1;
  }

  int lock_ = -1;
  long restore_ = -1;
  long restore_pool_ = -1;
  std::string why_;
};

}  // namespace lazymem::testing
