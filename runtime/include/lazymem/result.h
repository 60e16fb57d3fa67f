// Result<T>: the value of an operation that can fail in an expected way, or the error saying why.
//
// Expected failures (bad input, peer gone, kernel feature missing, EAGAIN/EEXIST from a uffd
// ioctl) travel as Result. Exceptions are kept for bugs and start-up misconfiguration, caught
// once in main().
#pragma once

#include <cassert>
#include <string>
#include <utility>
#include <variant>

namespace lazymem {

// What kind of failure: callers branch on this, people read the message.
enum class Errc {
  kIo,               // a read/write/syscall failed (sys_errno says which)
  kCorrupt,          // data failed a checksum, bounds or format check
  kUnsupported,      // a format version, codec or kernel feature we do not have
  kNotFound,         // a snapshot, region or file does not exist
  kExists,           // the target exists (address range taken, snapshot name used)
  kInvalidArgument,  // the caller asked for something impossible
  kPermission,       // the kernel or a peer refused us
  kProtocol,         // a peer sent something the protocol does not allow
  kPeerGone,         // the other end closed or reset the connection
  kTimeout,          // a deadline passed
  kAgain,            // try again later (EAGAIN; a mapping change is pending)
  kCancelled,        // the operation was stopped on purpose
};

const char* errc_name(Errc code);

class Error {
 public:
  Error(Errc code, std::string message, int sys_errno = 0)
      : code_(code), sys_errno_(sys_errno), message_(std::move(message)) {}

  Errc code() const { return code_; }
  int sys_errno() const { return sys_errno_; }
  const std::string& message() const { return message_; }

  // Prepends context: Error(kIo, "read failed").wrap("snapshot 'x'") -> "snapshot 'x': read failed".
  Error wrap(const std::string& context) const& { return Error(code_, context + ": " + message_, sys_errno_); }
  Error wrap(const std::string& context) && {
    message_ = context + ": " + message_;
    return std::move(*this);
  }

 private:
  Errc code_;
  int sys_errno_;
  std::string message_;
};

// Builds an Error from errno-style failures: "<what>: <strerror(err)>".
Error sys_error(const std::string& what, int err);

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Error error) : v_(std::move(error)) {}  // NOLINT: implicit by design

  bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }

  T& value() & {
    assert(ok());
    return std::get<0>(v_);
  }
  const T& value() const& {
    assert(ok());
    return std::get<0>(v_);
  }
  T&& value() && {
    assert(ok());
    return std::get<0>(std::move(v_));
  }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

  const Error& error() const& {
    assert(!ok());
    return std::get<1>(v_);
  }
  Error&& error() && {
    assert(!ok());
    return std::get<1>(std::move(v_));
  }

 private:
  std::variant<T, Error> v_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(Error error) : error_(std::move(error)), ok_(false) {}  // NOLINT: implicit by design

  bool ok() const { return ok_; }
  explicit operator bool() const { return ok_; }
  const Error& error() const& {
    assert(!ok_);
    return error_;
  }
  Error&& error() && {
    assert(!ok_);
    return std::move(error_);
  }

 private:
  Error error_{Errc::kIo, ""};
  bool ok_ = true;
};

using Status = Result<void>;

inline Status ok_status() { return Status(); }

}  // namespace lazymem

// Returns the error of `expr` (a Result) from the enclosing function if it failed.
#define LAZYMEM_TRY(expr)                                  \
  do {                                                     \
    if (auto lazymem_try_r_ = (expr); !lazymem_try_r_.ok()) \
      return std::move(lazymem_try_r_).error();            \
  } while (0)

#define LAZYMEM_CONCAT_INNER_(a, b) a##b
#define LAZYMEM_CONCAT_(a, b) LAZYMEM_CONCAT_INNER_(a, b)
// Declares `lhs` from the value of `expr` (a Result), or returns its error.
#define LAZYMEM_ASSIGN_OR_RETURN(lhs, expr) \
  LAZYMEM_ASSIGN_OR_RETURN_IMPL_(LAZYMEM_CONCAT_(lazymem_r_, __LINE__), lhs, expr)
#define LAZYMEM_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                   \
  if (!tmp.ok()) return std::move(tmp).error();        \
  lhs = std::move(tmp).value()
