// Probes the running kernel once: userfaultfd, io_uring opcodes, O_DIRECT, MSG_ZEROCOPY.
#include "lazymem/kernel_features.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <liburing.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

#include "sys/mapping.h"
#include "sys/pagemap_scan.h"
#include "sys/syscall_result.h"
#include "sys/uapi_compat.h"
#include "sys/uffd.h"
#include "sys/unique_fd.h"

#ifndef SO_ZEROCOPY
#define SO_ZEROCOPY 60
#endif

namespace lazymem {
namespace {

// Whether /proc/PID/pagemap shows a page's uffd write-protect mark (bit 57, Linux 5.13; a
// kernel may also leave it out): a page of scratch memory touched, registered, protected and
// read back.
bool pagemap_shows_uffd_wp(sys::Uffd& uffd) {
  auto m = sys::Mapping::anonymous(4096);
  if (!m.ok()) return false;
  *reinterpret_cast<volatile char*>(m->data()) = 1;  // present
  if (!uffd.register_write_protected(m->address(), m->size()).ok()) return false;
  sys::UniqueFd pagemap(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
  uint64_t entry = 0;
  const bool read = pagemap.valid() && ::pread(pagemap.get(), &entry, sizeof entry,
                                               static_cast<off_t>(m->address() / 4096 * sizeof entry)) == sizeof entry;
  (void)uffd.unregister(m->address(), m->size());
  return read && (entry & (uint64_t{1} << 57)) != 0;
}

void probe_uffd(KernelFeatures& kf) {
  using namespace sys;
  SysResult direct = call([] { return ::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK); });
  auto fd = open_userfaultfd_fd(true);
  if (!fd.ok()) {
    kf.uffd_error = fd.error().message();
    return;
  }
  if (direct.ok()) {
    ::close(static_cast<int>(direct.value));
    kf.uffd_via = "syscall";
  } else {
    kf.uffd_via = "/dev/userfaultfd";
  }
  uffdio_api api{};
  api.api = UFFD_API;
  SysResult r = call([&] { return ::ioctl(fd->get(), UFFDIO_API, &api); });
  if (!r.ok()) {
    kf.uffd_error = fmt::format("userfaultfd: UFFDIO_API failed: {}", std::strerror(r.err));
    return;
  }
  kf.uffd_features = api.features;
  kf.uffd_usable = true;
  // Which ioctls a registered anonymous range supports (POISON, MOVE show up here).
  Uffd uffd = Uffd::adopt(std::move(*fd), api.features);
  auto m = Mapping::anonymous(4096);
  if (m.ok()) {
    auto ioctls = uffd.register_missing(m->address(), m->size());
    if (ioctls.ok()) kf.uffd_ioctls = *ioctls;
  }
  kf.pagemap_scan = pagemap_scan_supported();
  kf.pagemap_uffd_wp = pagemap_shows_uffd_wp(uffd);
}

void probe_uring(KernelFeatures& kf) {
  io_uring ring{};
  int r = io_uring_queue_init(4, &ring, 0);
  if (r < 0) {
    kf.io_uring_error = fmt::format("io_uring_setup failed: {} (kernel.io_uring_disabled set, or seccomp)",
                                    std::strerror(-r));
    return;
  }
  io_uring_probe* probe = io_uring_get_probe_ring(&ring);
  if (probe != nullptr) {
    kf.op_read = io_uring_opcode_supported(probe, IORING_OP_READ);
    kf.op_read_fixed = io_uring_opcode_supported(probe, IORING_OP_READ_FIXED);
    kf.op_send = io_uring_opcode_supported(probe, IORING_OP_SEND);
    kf.op_recv = io_uring_opcode_supported(probe, IORING_OP_RECV);
    kf.op_send_zc = io_uring_opcode_supported(probe, IORING_OP_SEND_ZC);
    io_uring_free_probe(probe);
  }
  io_uring_queue_exit(&ring);
  kf.io_uring_usable = kf.op_read;
  if (!kf.io_uring_usable) kf.io_uring_error = "io_uring lacks IORING_OP_READ (Linux 5.6)";
}

void probe_o_direct(KernelFeatures& kf, const std::string& dir) {
  kf.store_dir = dir;
  std::string path = dir + "/.lazymem-odirect-XXXXXX";
  std::vector<char> tmpl(path.begin(), path.end());
  tmpl.push_back('\0');
  int fd = ::mkostemp(tmpl.data(), O_CLOEXEC);
  if (fd < 0) {
    kf.o_direct_error = fmt::format("cannot create a file in {}: {}", dir, std::strerror(errno));
    return;
  }
  ::unlink(tmpl.data());
  sys::UniqueFd owner(fd);
  // O_DIRECT is accepted by open() on some filesystems that fail the first read; test a read.
  char block[4096] __attribute__((aligned(4096)));
  std::memset(block, 0, sizeof block);
  if (::write(fd, block, sizeof block) != static_cast<ssize_t>(sizeof block)) {
    kf.o_direct_error = fmt::format("cannot write in {}: {}", dir, std::strerror(errno));
    return;
  }
  std::string proc = fmt::format("/proc/self/fd/{}", fd);
  int dfd = ::open(proc.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
  if (dfd < 0) {
    kf.o_direct_error = fmt::format("{} refuses O_DIRECT: {}", dir, std::strerror(errno));
    return;
  }
  sys::UniqueFd downer(dfd);
  ssize_t n = ::pread(dfd, block, sizeof block, 0);
  if (n != static_cast<ssize_t>(sizeof block)) {
    kf.o_direct_error = fmt::format("O_DIRECT read in {} failed: {}", dir, n < 0 ? std::strerror(errno) : "short");
    return;
  }
  kf.o_direct = true;
}

void probe_zerocopy(KernelFeatures& kf) {
  int s = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (s < 0) return;
  sys::UniqueFd owner(s);
  int one = 1;
  kf.msg_zerocopy = ::setsockopt(s, SOL_SOCKET, SO_ZEROCOPY, &one, sizeof one) == 0;
}

}  // namespace

bool KernelFeatures::has_uffd_poison() const {
  return has_uffd_feature(UFFD_FEATURE_POISON) && (uffd_ioctls & (1ULL << _UFFDIO_POISON)) != 0;
}
bool KernelFeatures::has_uffd_move() const {
  return has_uffd_feature(UFFD_FEATURE_MOVE) && (uffd_ioctls & (1ULL << _UFFDIO_MOVE)) != 0;
}
bool KernelFeatures::has_wp_async() const { return has_uffd_feature(UFFD_FEATURE_WP_ASYNC); }
bool KernelFeatures::has_dirty_marks() const {
  return has_uffd_feature(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED) && pagemap_scan;
}
bool KernelFeatures::has_write_protect_faults() const {
  // Write-protect came to anonymous memory in 5.7; the tracker also reads the marks in
  // /proc/PID/pagemap (5.13).
  return has_uffd_feature(UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMAP) &&
         pagemap_uffd_wp;
}

std::vector<KernelFeatures::Row> KernelFeatures::rows() const {
  std::vector<Row> out;
  out.push_back({"userfaultfd (" + (uffd_usable ? uffd_via : std::string("unusable")) + ")", uffd_usable,
                 "every lazy restore", "none: restore must be eager"});
  out.push_back({"UFFDIO_COPY / UFFDIO_ZEROPAGE", uffd_usable && (uffd_ioctls & (1ULL << _UFFDIO_COPY)),
                 "fault engine", "none"});
  out.push_back({"UFFD_FEATURE_EVENT_REMOVE/UNMAP/REMAP",
                 has_uffd_feature(UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMAP),
                 "agent: madvise/munmap/mremap during restore", "restore everything before the app runs"});
  out.push_back({"UFFD_FEATURE_EVENT_FORK", has_uffd_feature(UFFD_FEATURE_EVENT_FORK), "agent: fork during restore",
                 "child sees unrestored pages as zero"});
  out.push_back({"UFFD_FEATURE_MISSING_HUGETLBFS", has_uffd_feature(UFFD_FEATURE_MISSING_HUGETLBFS),
                 "VMs backed by huge pages (hugetlbfs)", "none: such a VM cannot register its memory"});
  out.push_back({"UFFD_FEATURE_POISON (6.6)", has_uffd_poison(), "failing a fault visibly (SIGBUS)",
                 "terminate the process with a logged reason"});
  out.push_back({"UFFD_FEATURE_MOVE (6.8)", has_uffd_move(), "zero-copy install of migrated pages", "UFFDIO_COPY"});
  out.push_back({"UFFD_FEATURE_WP_ASYNC (6.7)", has_wp_async(), "dirty-page tracking by kernel marks",
                 "tracking by write faults (the writer waits on each first write)"});
  out.push_back({"PAGEMAP_SCAN (6.7)", pagemap_scan, "dirty-page tracking by kernel marks",
                 "tracking by write faults (the writer waits on each first write)"});
  out.push_back({"userfaultfd write-protect faults, marks in pagemap (5.13)", has_write_protect_faults(),
                 "dirty-page tracking before 6.7", "none: not tracked (no live capture or migration)"});
  out.push_back({"io_uring", io_uring_usable, "page server, snapshot reader", "pread()/send() loops"});
  out.push_back({"IORING_OP_READ_FIXED", op_read_fixed, "reads into registered buffers", "IORING_OP_READ"});
  out.push_back({"IORING_OP_SEND_ZC (6.0)", op_send_zc, "page server zero-copy sends", "MSG_ZEROCOPY, then send()"});
  out.push_back({"O_DIRECT on " + store_dir, o_direct, "snapshot store reads", "buffered reads (logged)"});
  out.push_back({"MSG_ZEROCOPY", msg_zerocopy, "page server zero-copy sends", "send()"});
  return out;
}

KernelFeatures probe_kernel(const ProbeOptions& options) {
  KernelFeatures kf;
  probe_uffd(kf);
  probe_uring(kf);
  probe_o_direct(kf, options.store_dir);
  probe_zerocopy(kf);
  return kf;
}

}  // namespace lazymem
