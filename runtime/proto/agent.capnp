# Agent control protocol, version 1: between lazymem-agent and the processes it serves (and
# its CLI), over a Unix socket. Frames as in wire.capnp (u32 header len | u32 payload len |
# header | payload). A restore request carries the process's userfaultfd as SCM_RIGHTS.
@0xfdc47f7286472e4a;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("lazymem::proto::agent");

struct MappedRange {
  start @0 :UInt64;          # address in the client process
  length @1 :UInt64;
  region @2 :UInt32;         # snapshot region index
  regionOffset @3 :UInt64;   # offset of `start` in that region
}

# Paths in requests (snapshot store paths, token files, socket paths) are absolute: the agent
# cannot know the working directory of a relative one, and refuses it.
struct Restore {
  snapshot @0 :Text;         # location: /STORE/NAME or lazymem://HOST:PORT/NAME
  ranges @1 :List(MappedRange);
  prefetch @2 :Bool;
  uffdFeatures @3 :UInt64;   # features negotiated on the uffd sent along
  tokenFile @4 :Text;        # page-server token file, read by the agent
  # The version of the snapshot the client read and mapped by: its manifest's checksum (as
  # wire.capnp's Hello.manifestChecksum). The agent serves that version or refuses the restore,
  # never another's pages. 0 (older clients): not checked.
  manifestChecksum @5 :UInt64;
  # The client says why on its own stderr when told `failed`, and answers failureSeen: until then
  # (or a second at most) the agent holds off poisoning the failed pages, so the process cannot
  # die of SIGBUS before it has said why. False (older clients): poisoned at once.
  announcesFailures @6 :Bool;
  # RestoreOptions::base: an earlier version of the snapshot, nearer (absolute store path or
  # lazymem:// location), whose unchanged chunks are read there: a migration's pre-copy. "": none.
  base @7 :Text;
}

# Accept one Firecracker UFFD handshake on a new socket and serve that VM's guest memory from
# a snapshot of its memory file (one socket per VM restore, as Firecracker's
# mem_backend {backend_type: "Uffd", backend_path} expects). Reply: accepted (0) once the socket
# listens, then complete / failed on this connection when the VM's memory is all present.
struct ServeFirecracker {
  socketPath @0 :Text;       # created 0600, owned by the requesting user
  snapshot @1 :Text;         # location of the raw memory-file snapshot
  tokenFile @2 :Text;        # page-server token file, read by the agent
  prefetch @3 :Bool;
  # This connection follows the restore: if it closes before Firecracker's handshake has come,
  # the socket is closed and removed (an interrupted `lazymem-agent restore` leaves nothing
  # armed). False (`restore --no-wait`, older clients): the socket waits for its handshake.
  cancelOnClose @4 :Bool;
}

struct Request {
  id @0 :UInt64;
  union {
    restore @1 :Restore;     # SCM_RIGHTS: the uffd, registered over every range
    status @2 :Void;         # reply: json
    stats @3 :Void;          # reply: json
    serveFirecracker @4 :ServeFirecracker;
    # Long poll: reply json (as status) once the agent's "generation" (in every status) is
    # past this value, at once if it already is. A session appearing, completing, failing or
    # ending moves it on.
    waitChange @5 :UInt64;
    # Session id (a restore of this connection's, announcesFailures): its failure has been told;
    # poison its failed pages now. No reply.
    failureSeen @6 :UInt64;
    # Session id (a restore of this connection's): the process is about to fork. Fetch every
    # page not yet present now (prefetch on), so that its child, whose copy of the memory only
    # the agent could fill, starts with all of it. No reply: complete (or failed) follows.
    fetchRest @7 :UInt64;
  }
}

struct Reply {
  id @0 :UInt64;
  union {
    error @1 :Text;          # what was wrong with the request and what to do
    accepted @2 :UInt64;     # session id: the agent now serves the uffd
    complete @3 :UInt64;     # every page is present: the client may close its copy of the uffd
    failed @4 :Text;         # some pages could not be had (they are poisoned)
    json @5 :Text;
    exited @6 :UInt64;       # session id: its process went away before every page was present
  }
}
