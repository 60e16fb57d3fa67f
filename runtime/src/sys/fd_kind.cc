// What kind of kernel object a received descriptor is.
#include "sys/fd_kind.h"

#include <fmt/format.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <string_view>

#include "sys/unique_fd.h"

namespace lazymem::sys {

Status check_userfaultfd(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return sys_error(fmt::format("fstat of the descriptor sent as a userfaultfd ({})", fd), errno);
  // Every anonymous inode (eventfd, userfaultfd, epoll, ...) lives on the one anon_inodefs
  // superblock: an eventfd of our own names its device.
  UniqueFd ref(::eventfd(0, EFD_CLOEXEC));
  struct stat ref_st {};
  if (!ref.valid() || ::fstat(ref.get(), &ref_st) != 0) return sys_error("eventfd (to tell a userfaultfd)", errno);
  std::array<char, 256> name{};
  const std::string link = fmt::format("/proc/self/fd/{}", fd);
  const ssize_t n = ::readlink(link.c_str(), name.data(), name.size() - 1);
  if (n < 0) return sys_error("readlink " + link, errno);
  const std::string_view what(name.data(), static_cast<size_t>(n));
  if (st.st_dev != ref_st.st_dev || what != "anon_inode:[userfaultfd]") {
    return Error(Errc::kInvalidArgument,
                 fmt::format("the descriptor sent is not a userfaultfd (it is {}): send the one the regions are "
                             "registered with",
                             what));
  }
  return ok_status();
}

}  // namespace lazymem::sys
