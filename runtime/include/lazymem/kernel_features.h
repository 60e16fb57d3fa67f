// KernelFeatures: what the running kernel offers lazymem, probed once at start-up and passed
// explicitly to whoever needs it. Never inferred from the kernel version string.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace lazymem {

struct KernelFeatures {
  // userfaultfd
  bool uffd_usable = false;      // a uffd could be opened and the API handshake done
  std::string uffd_via;          // "syscall" or "/dev/userfaultfd"
  std::string uffd_error;        // why not, with what to do, when !uffd_usable
  uint64_t uffd_features = 0;    // UFFD_FEATURE_* bits the kernel offers
  uint64_t uffd_ioctls = 0;      // _UFFDIO_* bits supported on a registered anonymous range
  bool pagemap_scan = false;     // PAGEMAP_SCAN ioctl on /proc/PID/pagemap, Linux 6.7
  bool pagemap_uffd_wp = false;  // /proc/PID/pagemap shows uffd write-protect marks, Linux 5.13

  // io_uring
  bool io_uring_usable = false;
  std::string io_uring_error;
  bool op_read = false;          // IORING_OP_READ, Linux 5.6
  bool op_read_fixed = false;    // IORING_OP_READ_FIXED, Linux 5.1
  bool op_send = false;          // IORING_OP_SEND, Linux 5.6
  bool op_recv = false;          // IORING_OP_RECV, Linux 5.6
  bool op_send_zc = false;       // IORING_OP_SEND_ZC, Linux 6.0

  // storage and network
  std::string store_dir;         // where O_DIRECT was tried
  bool o_direct = false;
  std::string o_direct_error;
  bool msg_zerocopy = false;     // SO_ZEROCOPY accepted on a TCP socket (Linux 4.14)

  bool has_uffd_feature(uint64_t bits) const { return uffd_usable && (uffd_features & bits) == bits; }
  bool has_uffd_poison() const;
  bool has_uffd_move() const;
  bool has_wp_async() const;
  // DirtyTracker by kernel marks: WP_ASYNC and WP_UNPOPULATED, read by PAGEMAP_SCAN (6.7).
  bool has_dirty_marks() const;
  // DirtyTracker by write faults: userfaultfd write-protect on anonymous memory, with the
  // UNMAP and REMAP events, and its marks shown in /proc/PID/pagemap (5.13).
  bool has_write_protect_faults() const;
  // DirtyTracker by either.
  bool has_dirty_tracking() const { return has_dirty_marks() || has_write_protect_faults(); }

  // One row per feature for `lazymem-agent check`.
  struct Row {
    std::string feature;
    bool present;
    std::string needed_by;
    std::string fallback;
  };
  std::vector<Row> rows() const;
};

struct ProbeOptions {
  std::string store_dir = ".";  // directory whose filesystem must take O_DIRECT
};

// Probes userfaultfd, io_uring, O_DIRECT and MSG_ZEROCOPY. Never fails: what is missing is
// recorded with the reason.
KernelFeatures probe_kernel(const ProbeOptions& options = {});

}  // namespace lazymem
