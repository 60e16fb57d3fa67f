// Snapshot opens for the agent, each on a thread of its own (see source_opener.h).
#include "source_opener.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <mutex>
#include <sstream>
#include <system_error>
#include <thread>

#include "lazymem/snapshot.h"
#include "net/auth.h"
#include "snapshot/manifest.h"
#include "source.h"
#include "sys/unique_fd.h"

namespace lazymem::agent {

Status client_may_read(const Requester& who, const std::string& location, const std::string& token_file) {
  if (who.uid == 0) return ok_status();
  std::vector<std::string> files;
  if (!token_file.empty()) files.push_back(token_file);
  if (auto loc = SnapshotLocation::parse(location); loc.ok() && !loc->remote()) {
    files.push_back(loc->store_dir + "/" + loc->name + "/" + snapshot::kManifestFile);
    files.push_back(loc->store_dir + "/" + loc->name + "/" + snapshot::kDataFile);
  }
  if (files.empty()) return ok_status();
  std::vector<gid_t> groups;
  std::ifstream status(fmt::format("/proc/{}/status", who.pid));
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("Groups:", 0) != 0) continue;
    std::istringstream in(line.substr(7));
    for (gid_t g; in >> g;) groups.push_back(g);
  }
  std::vector<const char*> paths;
  for (const auto& f : files) paths.push_back(f.c_str());
  pid_t kid = ::fork();
  if (kid < 0) return sys_error("fork to check the client's access", errno);
  if (kid == 0) {
    if (::syscall(SYS_setgroups, groups.size(), groups.data()) != 0 || ::syscall(SYS_setgid, who.gid) != 0 ||
        ::syscall(SYS_setuid, who.uid) != 0) {
      _exit(255);
    }
    for (size_t i = 0; i < paths.size(); ++i) {
      int fd = static_cast<int>(::syscall(SYS_openat, AT_FDCWD, paths[i], O_RDONLY | O_CLOEXEC | O_NONBLOCK));
      if (fd < 0) _exit(static_cast<int>(i));
      ::syscall(SYS_close, fd);
    }
    _exit(254);
  }
  int st = 0;
  while (::waitpid(kid, &st, 0) < 0 && errno == EINTR) {
  }
  const int code = WIFEXITED(st) ? WEXITSTATUS(st) : 255;
  if (code == 254) return ok_status();
  if (code < static_cast<int>(files.size())) {
    return Error(Errc::kPermission, fmt::format("{} cannot be read by uid {} (the requesting user): the agent reads "
                                                "nothing on a user's behalf that the user could not", files[code], who.uid));
  }
  return Error(Errc::kPermission, fmt::format("could not check what uid {} may read", who.uid));
}

Result<Opened> open_source(const OpenSpec& spec) {
  if (spec.reader) LAZYMEM_TRY(client_may_read(*spec.reader, spec.location, spec.token_file));
  Opened out;
  if (!spec.token_file.empty()) {
    LAZYMEM_ASSIGN_OR_RETURN(out.token, net::read_token_file(spec.token_file));
  }
  for (const auto& [token, source] : spec.open_now) {
    if (token != out.token) continue;
    out.source = source;
    out.fresh = false;
    return out;
  }
  RestoreOptions ro;
  ro.token_file = spec.token_file;
  LAZYMEM_ASSIGN_OR_RETURN(out.source, open_chunk_source(spec.location, ro));
  return out;
}

struct SourceOpener::Finished {
  std::mutex mu;
  std::vector<std::pair<uint64_t, Result<Opened>>> done;
  sys::UniqueFd event{::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)};
};

SourceOpener::SourceOpener() : finished_(std::make_shared<Finished>()) {}
SourceOpener::~SourceOpener() = default;

int SourceOpener::fd() const { return finished_->event.get(); }

Status SourceOpener::start(uint64_t job, OpenSpec spec) {
  if (!finished_->event.valid()) return Error(Errc::kIo, "no eventfd for the agent's snapshot opens (out of descriptors?)");
  try {
    std::thread([job, spec = std::move(spec), finished = finished_] {
      Result<Opened> r = open_source(spec);
      {
        std::lock_guard lock(finished->mu);
        finished->done.emplace_back(job, std::move(r));
      }
      const uint64_t one = 1;
      (void)!::write(finished->event.get(), &one, sizeof one);
    }).detach();
  } catch (const std::system_error& e) {
    return Error(Errc::kAgain, fmt::format("cannot start a thread to open the snapshot ({}); try again", e.what()));
  }
  return ok_status();
}

std::vector<std::pair<uint64_t, Result<Opened>>> SourceOpener::take() {
  uint64_t n;
  (void)!::read(finished_->event.get(), &n, sizeof n);
  std::vector<std::pair<uint64_t, Result<Opened>>> out;
  std::lock_guard lock(finished_->mu);
  out.swap(finished_->done);
  return out;
}

}  // namespace lazymem::agent
