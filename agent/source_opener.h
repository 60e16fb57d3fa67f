// Opening a snapshot for the agent, off its event loop. An open may wait on a disk or on a page
// server (up to its connect deadline), and the check that a client could read what it names
// forks and waits: either, on the loop, would stall every other client, the failure notices'
// 1 s hold included. Each open runs on a thread of its own; the loop learns of the finished ones
// through one eventfd.
//
// Thread-safety: SourceOpener's methods are the loop's; open_source runs on any thread.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "lazymem/result.h"
#include "snapshot/chunk_source.h"

namespace lazymem::agent {

// Who asked: what the agent (root) opens for a user, that user must be able to open itself.
struct Requester {
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
};

// One open, everything it needs copied in.
struct OpenSpec {
  std::string location, token_file;
  std::optional<Requester> reader;  // checked first (none: the daemon's own, or checked already)
  // Sources of `location` already open in the version wanted, with the token each was opened
  // with: one opened with the same token is taken instead of opening again.
  std::vector<std::pair<std::string, std::shared_ptr<snapshot::ChunkSource>>> open_now;
};

struct Opened {
  std::string token;  // read from the token file (sources are shared only between equal tokens)
  std::shared_ptr<snapshot::ChunkSource> source;
  bool fresh = true;  // opened now, not one of OpenSpec::open_now
};

// Fails with kPermission naming the file when `who` (not root) could not open the snapshot's
// files in a local store or the token file. Tried in a child with the client's uid, gid and
// groups (only syscalls between fork and _exit: other threads may hold locks).
Status client_may_read(const Requester& who, const std::string& location, const std::string& token_file);

// Does the whole open, blocking: the read check, the token, the source.
Result<Opened> open_source(const OpenSpec& spec);

class SourceOpener {
 public:
  SourceOpener();
  ~SourceOpener();
  SourceOpener(const SourceOpener&) = delete;
  SourceOpener& operator=(const SourceOpener&) = delete;

  // Readable when an open has finished (take() them).
  int fd() const;
  // Starts open `job` on a thread of its own.
  Status start(uint64_t job, OpenSpec spec);
  std::vector<std::pair<uint64_t, Result<Opened>>> take();

 private:
  struct Finished;
  // Shared with the threads, which are detached: a daemon stopping does not wait out a page
  // server that does not answer, and a thread finishing after it finds what it writes to alive.
  std::shared_ptr<Finished> finished_;
};

}  // namespace lazymem::agent
