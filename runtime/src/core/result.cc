// Error helpers shared by every module.
#include "lazymem/result.h"

#include <cstring>

namespace lazymem {

const char* errc_name(Errc code) {
  switch (code) {
    case Errc::kIo: return "io";
    case Errc::kCorrupt: return "corrupt";
    case Errc::kUnsupported: return "unsupported";
    case Errc::kNotFound: return "not-found";
    case Errc::kExists: return "exists";
    case Errc::kInvalidArgument: return "invalid-argument";
    case Errc::kPermission: return "permission";
    case Errc::kProtocol: return "protocol";
    case Errc::kPeerGone: return "peer-gone";
    case Errc::kTimeout: return "timeout";
    case Errc::kAgain: return "again";
    case Errc::kCancelled: return "cancelled";
  }
  return "unknown";
}

Error sys_error(const std::string& what, int err) {
  Errc code = Errc::kIo;
  switch (err) {
    case ENOENT: code = Errc::kNotFound; break;
    case EEXIST: code = Errc::kExists; break;
    case EPERM:
    case EACCES: code = Errc::kPermission; break;
    case EINVAL: code = Errc::kInvalidArgument; break;
    case EAGAIN: code = Errc::kAgain; break;
    case ENOSYS:
    case EOPNOTSUPP: code = Errc::kUnsupported; break;
    case EPIPE:
    case ECONNRESET:
    case ECONNREFUSED: code = Errc::kPeerGone; break;
    case ETIMEDOUT: code = Errc::kTimeout; break;
    default: break;
  }
  return Error(code, what + ": " + std::strerror(err), err);
}

}  // namespace lazymem
