// Uffd: an owned userfaultfd with its negotiated features, and the ioctls the fault engine uses.
#include "sys/uffd.h"

#include <fcntl.h>
#include <fmt/format.h>

#include <cstring>
#include <filesystem>
#include <thread>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "sys/remote_syscall.h"
#include "sys/syscall_result.h"
#include "sys/uapi_compat.h"

namespace lazymem::sys {
namespace {

InstallResult classify(long r, int err, __s64 done, size_t len) {
  if (r == 0 && done >= 0 && static_cast<size_t>(done) == len) return {InstallOutcome::kDone, len, 0};
  size_t bytes = done > 0 ? static_cast<size_t>(done) : 0;
  if (r == 0) return {InstallOutcome::kAgain, bytes, 0};  // partial copy without an error
  switch (err) {
    case EEXIST: return {InstallOutcome::kExists, bytes, err};
    case EAGAIN: return {InstallOutcome::kAgain, bytes, err};
    case ENOENT:  // the vma is gone or no longer registered
    case EFAULT: return {InstallOutcome::kGone, bytes, err};
    case ESRCH: return {InstallOutcome::kExited, bytes, err};  // the mm exited
    default: return {InstallOutcome::kFailed, bytes, err};
  }
}

}  // namespace

Result<UniqueFd> open_userfaultfd_fd(bool nonblocking) {
  int flags = O_CLOEXEC | (nonblocking ? O_NONBLOCK : 0);
  SysResult r = call([&] { return ::syscall(SYS_userfaultfd, flags); });
  if (r.ok()) return UniqueFd(static_cast<int>(r.value));
  int syscall_err = r.err;
  // The syscall refuses unprivileged callers unless vm.unprivileged_userfaultfd=1; the device
  // node (Linux 6.1) is governed by its file permissions instead.
  SysResult dev = call([] { return ::open("/dev/userfaultfd", O_RDWR | O_CLOEXEC); });
  if (dev.ok()) {
    UniqueFd dev_fd(static_cast<int>(dev.value));
    SysResult u = call([&] { return ::ioctl(dev_fd.get(), USERFAULTFD_IOC_NEW, flags); });
    if (u.ok()) return UniqueFd(static_cast<int>(u.value));
    return Error(Errc::kPermission,
                 fmt::format("userfaultfd: syscall failed ({}) and /dev/userfaultfd refused a new fd ({})",
                             std::strerror(syscall_err), std::strerror(u.err)),
                 u.err);
  }
  if (syscall_err == ENOSYS) {
    return Error(Errc::kUnsupported,
                 "userfaultfd: this kernel was built without CONFIG_USERFAULTFD; lazy restore is impossible here",
                 syscall_err);
  }
  return Error(Errc::kPermission,
               fmt::format("userfaultfd: permission denied ({}; /dev/userfaultfd: {}). Run as root or with "
                           "CAP_SYS_PTRACE, or set vm.unprivileged_userfaultfd=1, or give this user read-write "
                           "access to /dev/userfaultfd",
                           std::strerror(syscall_err), std::strerror(dev.err)),
               syscall_err);
}

Result<Uffd> Uffd::open(uint64_t wanted, uint64_t required, bool nonblocking) {
  // Ask for features once on a throw-away fd: UFFDIO_API may be called only once per fd.
  uint64_t available = 0;
  {
    LAZYMEM_ASSIGN_OR_RETURN(UniqueFd probe_fd, open_userfaultfd_fd(nonblocking));
    uffdio_api api{};
    api.api = UFFD_API;
    api.features = 0;
    SysResult r = call([&] { return ::ioctl(probe_fd.get(), UFFDIO_API, &api); });
    if (!r.ok()) return r.error("userfaultfd: UFFDIO_API handshake");
    available = api.features;
  }
  if ((available & required) != required) {
    return Error(Errc::kUnsupported,
                 fmt::format("userfaultfd: kernel lacks required features {:#x} (has {:#x})",
                             required & ~available, available));
  }
  LAZYMEM_ASSIGN_OR_RETURN(UniqueFd fd, open_userfaultfd_fd(nonblocking));
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = (wanted | required) & available;
  SysResult r = call([&] { return ::ioctl(fd.get(), UFFDIO_API, &api); });
  if (!r.ok()) return r.error(fmt::format("userfaultfd: UFFDIO_API with features {:#x}", api.features));
  return Uffd(std::move(fd), (wanted | required) & available);
}

namespace {

// Whether descriptor `fd` of process `pid` is a userfaultfd (checked before it is taken or
// closed: another thread of the process could have closed it and reused the number).
bool is_userfaultfd(pid_t pid, long fd) {
  std::error_code ec;
  const auto target = std::filesystem::read_symlink(fmt::format("/proc/{}/fd/{}", pid, fd), ec);
  return !ec && target.string() == "anon_inode:[userfaultfd]";
}

Result<UniqueFd> open_userfaultfd_in(pid_t pid, bool user_mode_only) {
  LAZYMEM_ASSIGN_OR_RETURN(RemoteSyscalls remote, RemoteSyscalls::attach(pid));
  const long flags = O_CLOEXEC | O_NONBLOCK | (user_mode_only ? UFFD_USER_MODE_ONLY : 0);
  LAZYMEM_ASSIGN_OR_RETURN(long remote_fd, remote.call(SYS_userfaultfd, flags));
  if (remote_fd < 0) {
    const int err = static_cast<int>(-remote_fd);
    std::string hint;
    if (err == EPERM && user_mode_only) {
      hint = " (a seccomp filter refusing userfaultfd(2), as containers' default profiles have? allow it for that process)";
    } else if (err == EPERM) {
      hint = " (one that also takes the kernel's own accesses needs vm.unprivileged_userfaultfd=1 or CAP_SYS_PTRACE in "
             "that process, and userfaultfd(2) allowed by its seccomp filter)";
    }
    return Error(err == EPERM ? Errc::kPermission : Errc::kIo,
                 fmt::format("process {} could not open a userfaultfd: {}{}", pid, std::strerror(err), hint), err);
  }
  if (!is_userfaultfd(pid, remote_fd)) {
    return Error(Errc::kIo, fmt::format("process {}: descriptor {} it was given by userfaultfd(2) is no longer one "
                                        "(another thread closed it): try again",
                                        pid, remote_fd));
  }
  auto taken = take_fd(pid, static_cast<int>(remote_fd));
  // Closed there whatever happened here: the process is left with no descriptor it did not open.
  auto closed = remote.call(SYS_close, remote_fd);
  if (!taken.ok()) return std::move(taken).error();
  if (!closed.ok()) return std::move(closed).error().wrap(fmt::format("closing the userfaultfd opened in process {}", pid));
  return std::move(*taken);
}

}  // namespace

Result<Uffd> Uffd::open_in(pid_t pid, uint64_t features, bool user_mode_only) {
  // On a thread of its own: if the process cannot be stopped in time, that thread's exit has the
  // kernel detach it, instead of leaving it traced (and stopped, once it stops) by this one.
  Result<UniqueFd> opened = Error(Errc::kCancelled, "not run");
  std::thread([&] { opened = open_userfaultfd_in(pid, user_mode_only); }).join();
  if (!opened.ok()) return std::move(opened).error();
  UniqueFd fd = std::move(*opened);
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = features;
  SysResult r = call([&] { return ::ioctl(fd.get(), UFFDIO_API, &api); });
  if (!r.ok()) return r.error(fmt::format("userfaultfd of process {}: UFFDIO_API with features {:#x}", pid, features));
  return Uffd(std::move(fd), features);
}

Result<uint64_t> Uffd::register_missing(uintptr_t addr, size_t len) {
  uffdio_register reg{};
  reg.range.start = addr;
  reg.range.len = len;
  reg.mode = UFFDIO_REGISTER_MODE_MISSING;
  SysResult r = call([&] { return ::ioctl(fd_.get(), UFFDIO_REGISTER, &reg); });
  if (!r.ok()) return r.error(fmt::format("userfaultfd: register {:#x}-{:#x}", addr, addr + len));
  return static_cast<uint64_t>(reg.ioctls);
}

Status Uffd::unregister(uintptr_t addr, size_t len) {
  uffdio_range range{addr, len};
  SysResult r = call([&] { return ::ioctl(fd_.get(), UFFDIO_UNREGISTER, &range); });
  if (!r.ok()) return r.error(fmt::format("userfaultfd: unregister {:#x}-{:#x}", addr, addr + len));
  return ok_status();
}

Status Uffd::register_write_protected(uintptr_t addr, size_t len, bool protect) {
  uffdio_register reg{};
  reg.range.start = addr;
  reg.range.len = len;
  reg.mode = UFFDIO_REGISTER_MODE_WP;
  SysResult r = call([&] { return ::ioctl(fd_.get(), UFFDIO_REGISTER, &reg); });
  if (!r.ok()) return r.error(fmt::format("userfaultfd: register {:#x}-{:#x} for write-protect", addr, addr + len));
  if (!protect) return ok_status();
  InstallResult wp = write_protect(addr, len, true);
  if (wp.outcome != InstallOutcome::kDone) {
    (void)unregister(addr, len);  // registered above: not left half done
    return sys_error(fmt::format("userfaultfd: write-protect {:#x}-{:#x}", addr, addr + len), wp.err);
  }
  return ok_status();
}

InstallResult Uffd::write_protect(uintptr_t addr, size_t len, bool on, bool wake) {
  uffdio_writeprotect wp{};
  wp.range.start = addr;
  wp.range.len = len;
  wp.mode = on ? UFFDIO_WRITEPROTECT_MODE_WP : (wake ? 0 : UFFDIO_WRITEPROTECT_MODE_DONTWAKE);
  SysResult r = call([&] { return ::ioctl(fd_.get(), UFFDIO_WRITEPROTECT, &wp); });
  return classify(r.value, r.err, r.ok() ? static_cast<__s64>(len) : 0, len);
}

InstallResult Uffd::copy(uintptr_t dst, const void* src, size_t len, bool wake) {
  uffdio_copy c{};
  c.dst = dst;
  c.src = reinterpret_cast<uintptr_t>(src);
  c.len = len;
  c.mode = wake ? 0 : UFFDIO_COPY_MODE_DONTWAKE;
  SysResult r = call([&] { return ::ioctl(fd_.get(), UFFDIO_COPY, &c); });
  return classify(r.value, r.err, c.copy, len);
}

bool Uffd::mm_alive(uintptr_t page_addr) {
  // One page nobody can read, for the life of the process. The copy checks the mm before it
  // looks at anything else, then fails reading the source before a page is installed.
  static void* const unreadable = ::mmap(nullptr, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (unreadable == MAP_FAILED) return true;  // cannot tell: assume it lives
  uffdio_copy c{};
  c.dst = page_addr & ~uintptr_t{4095};
  c.src = reinterpret_cast<uintptr_t>(unreadable);
  c.len = 4096;
  c.mode = UFFDIO_COPY_MODE_DONTWAKE;
  SysResult r = call([&] { return ::ioctl(fd_.get(), UFFDIO_COPY, &c); });
  return r.ok() || r.err != ESRCH;
}

InstallResult Uffd::zeropage(uintptr_t dst, size_t len, bool wake) {
  uffdio_zeropage z{};
  z.range.start = dst;
  z.range.len = len;
  z.mode = wake ? 0 : UFFDIO_ZEROPAGE_MODE_DONTWAKE;
  SysResult r = call([&] { return ::ioctl(fd_.get(), UFFDIO_ZEROPAGE, &z); });
  return classify(r.value, r.err, z.zeropage, len);
}

InstallResult Uffd::poison(uintptr_t dst, size_t len) {
  uffdio_poison p{};
  p.range.start = dst;
  p.range.len = len;
  p.mode = 0;
  SysResult r = call([&] { return ::ioctl(fd_.get(), UFFDIO_POISON, &p); });
  return classify(r.value, r.err, p.updated, len);
}

Status Uffd::wake(uintptr_t addr, size_t len) {
  uffdio_range range{addr, len};
  SysResult r = call([&] { return ::ioctl(fd_.get(), UFFDIO_WAKE, &range); });
  if (!r.ok()) return r.error(fmt::format("userfaultfd: wake {:#x}", addr));
  return ok_status();
}

Result<size_t> Uffd::read_events(std::span<uffd_msg> out) {
  SysResult r = call([&] { return ::read(fd_.get(), out.data(), out.size_bytes()); });
  if (r.again()) return size_t{0};
  if (!r.ok()) return r.error("userfaultfd: read events");
  return static_cast<size_t>(r.value) / sizeof(uffd_msg);
}

}  // namespace lazymem::sys
