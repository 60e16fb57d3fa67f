# Page-server wire protocol, version 1.
#
# A frame is: u32 header length (LE) | u32 payload length (LE) | header | payload.
# The header is one unpacked Cap'n Proto message (Request from client, Reply from server);
# the payload is raw bytes (chunk data, a manifest) so it can be sent without copying.
# Peers are untrusted: header <= 64 KiB, payload <= 16 MiB, reader limits set, every field
# checked. Field numbers are never reused.
@0x87a73e6b3ab34cd0;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("lazymem::proto::wire");

const protocolVersion :UInt32 = 1;

struct ChunkId {
  region @0 :UInt32;
  chunk @1 :UInt32;
  tag @2 :UInt64;     # echoed in the reply; replies may come in any order
}

struct Request {
  id @0 :UInt64;      # echoed in the reply
  union {
    hello @1 :Hello;
    authenticate @2 :Data;        # HMAC-SHA256(token, serverNonce || clientNonce)
    list @3 :Void;
    getManifest @4 :Text;         # snapshot name; reply payload = manifest file bytes
    getChunks @5 :GetChunks;      # one Reply.chunk (or error) per id
    putBegin @6 :PutBegin;        # start an upload; reply ok
    putData @7 :Void;             # payload = next bytes of the data file; no reply unless error
    putCommit @8 :Void;           # payload = manifest file; the snapshot appears atomically; reply ok
    stats @9 :Void;               # reply: stats
    getPage @10 :GetPage;         # one page for a thread waiting on it; reply: page (or error)
    openDatagrams @11 :Void;      # reply: datagrams (a session for getPage by UDP) or an error
    remove @12 :Text;             # snapshot name: removed from the store; reply ok (or notFound)
    # Snapshot name: this restore holds every page it will ever ask for: it asks no more on this
    # connection. No reply. Sent once, just before a restore closes its connection, to servers
    # whose hello reply says takesComplete (not by a restore with failed pages). A migration
    # source then stops serving at once, once no other connection is reading (asked for chunks
    # or pages and said nothing since), rather than lingering for a reconnect that will not come.
    complete @13 :Text;
  }
}

# One page of a chunk, asked for by the faulting thread itself (RestoreOptions::fault_on_thread).
# Served like a demand chunk. The server checks the chunk's storedChecksum first (the client
# cannot: it gets only part of the chunk).
struct GetPage {
  snapshot @0 :Text;
  region @1 :UInt32;
  chunk @2 :UInt32;
  page @3 :UInt32;                # page index inside the chunk (region page size)
  tag @4 :UInt64;
  session @5 :Data;               # sent as a datagram: the session from openDatagrams
  replyOnStream @6 :Bool;         # (datagrams) what cannot come by datagram comes on the session's
                                  # connection, announced by an onStream datagram, not useStream
}

# getPage by UDP, for the lowest fault latency (no stream to wait behind, a lost datagram retried
# in a millisecond where TCP waits 200 ms or more): a datagram to the server's port holds one
# frame, as on the stream, whose Request is a getPage carrying the session; the reply datagram
# (to the sender) holds one frame too. The session is 16 random bytes given on an authenticated
# connection, lives as long as that connection, and is honoured only from that connection's peer
# address; datagrams without a live session get no answer (no reflection). A page that does not
# fit one datagram is refused with useStream: ask on the connection; or, where the request says
# replyOnStream, sent on the session's connection as the answer to the datagram's request (its
# id and tag), announced by an onStream error datagram: a round trip saved. Replies may be lost
# or come late: the client matches the id, and asks on the connection when one does not come in
# time; a reply on the connection to a request it gave up on is skipped by its id.
struct DatagramSession {
  session @0 :Data;
  maxPayload @1 :UInt32;          # the largest payload the server sends by datagram
}

struct PutBegin {
  name @0 :Text;
  replace @1 :Bool;
}

struct Hello {
  version @0 :UInt32;
  clientNonce @1 :Data;           # 32 random bytes
  # The version of a snapshot this connection reads (a restore's connections name the one whose
  # manifest it holds; 0: none). Its requests for that name are served from that version even
  # after the store's copy is replaced or removed: the server keeps it while such a connection
  # lives, and a while after the last one closes (a restore reconnecting). If the server no
  # longer holds it (restarted since, or kept it no longer), those requests fail with notFound.
  # Taken once the connection is authenticated. Older servers ignore it (serve by name).
  snapshot @2 :Text;
  manifestChecksum @3 :UInt64;    # the manifest's own checksum (its header's): names the version
  readsCorrupt @4 :Bool;          # the client knows ErrorCode corrupt; older ones are sent ioError
  # The client holds a token and wants the server to prove it holds it too: a successful
  # authenticate is answered `authenticated` instead of `ok`. Whoever answers at an address
  # (a port taken over after the server died, a name pointed elsewhere) supplies the manifest,
  # and with it every page: a client with a token restores only from a server that knows it.
  proveServer @5 :Bool;
}

struct GetChunks {
  snapshot @0 :Text;
  demand @1 :Bool;                # a thread waits: served before prefetch
  chunks @2 :List(ChunkId);
}

enum ErrorCode {
  badRequest @0;
  notFound @1;
  authRequired @2;
  authFailed @3;
  outOfRange @4;
  ioError @5;
  unsupportedVersion @6;
  busy @7;
  useStream @8;                   # (datagrams) the reply does not fit one: ask on the connection
  onStream @9;                    # (datagrams) the reply does not fit one: it comes on the connection
  corrupt @10;                    # the server holds the snapshot damaged (checksum, file truncated or
                                  # missing); sent only to clients whose hello says readsCorrupt
                                  # (older ones get ioError, which they pass over to another server)
}

struct Reply {
  id @0 :UInt64;
  union {
    hello @1 :HelloReply;
    error @2 :ErrorReply;
    ok @3 :Void;
    snapshots @4 :List(SnapshotInfo);
    manifest @5 :Void;            # payload = manifest bytes
    chunk @6 :ChunkId;            # payload = the chunk's stored bytes
    stats @7 :ServerStats;
    page @8 :PageReply;
    datagrams @9 :DatagramSession;
    authenticated @10 :Data;      # to authenticate, when the hello asked (proveServer):
                                  # HMAC-SHA256(token, "lazymem server" || serverNonce || clientNonce)
  }
}

# Payload of a page reply: for a page of a zstdPages chunk stored as a dictionary frame, that
# frame alone (its own content checksum, required, verifies it; decoded with the snapshot's
# dictionary). For every other page (zero or raw page frames, other codecs) the chunk's whole
# stored bytes (whole = true), which the client verifies against the manifest as for getChunks.
struct PageReply {
  region @0 :UInt32;
  chunk @1 :UInt32;
  page @2 :UInt32;
  tag @3 :UInt64;
  whole @4 :Bool;
  storedChecksum @5 :UInt64;      # the chunk's, from the server's manifest: a frame sent alone is
                                  # used only if this matches the client's (the snapshot may have
                                  # been replaced since the client read its manifest)
}

struct ServerStats {
  connections @0 :UInt64;
  openConnections @1 :UInt64;
  requests @2 :UInt64;
  chunks @3 :UInt64;
  bytes @4 :UInt64;
  errorsProtocol @5 :UInt64;
  errorsAuth @6 :UInt64;
  errorsNotFound @7 :UInt64;
  errorsRange @8 :UInt64;
  errorsIo @9 :UInt64;
  handshakeTimeouts @10 :UInt64;
  uploads @11 :UInt64;
  diskReadBytes @12 :UInt64;
  cacheHits @13 :UInt64;
  cacheMisses @14 :UInt64;
  zerocopySends @15 :UInt64;
  zerocopyBytes @16 :UInt64;
  zerocopyCopiedSends @17 :UInt64;   # zero-copy sends the kernel copied after all
  zerocopyFallbacks @18 :UInt64;     # connections switched to plain sends
  plainSends @19 :UInt64;
  plainBytes @20 :UInt64;
  pages @21 :UInt64;                 # getPage replies sent as one page frame
  errorsCorrupt @22 :UInt64;         # stored chunks whose checksum failed on the server
  datagramRequests @23 :UInt64;      # getPage datagrams from live sessions
  datagramsDropped @24 :UInt64;      # datagrams dropped: malformed, no live session, wrong sender
  datagramsUnsent @25 :UInt64;       # replies the socket refused (full): the client asks again
  connectionsRefused @26 :UInt64;    # over the connection limit, or out of file descriptors
  datagramsOverMtu @27 :UInt64;      # page frames too big for one unfragmented datagram: onStream or useStream
  datagramsOnStream @28 :UInt64;     # datagram requests answered on their session's connection
  snapshotsRetired @29 :UInt64;      # versions replaced or removed in the store still held for restores reading them
  snapshotsRetiredBytes @30 :UInt64; # their stored bytes: disk space a removal or replacement has not freed yet
  connectionsStalled @31 :UInt64;    # closed after taking none of their replies for the stall timeout
  listings @32 :UInt64;              # listings of the store made for list requests (off the serving loop)
  listingManifestReads @33 :UInt64;  # manifests those listings read (only new or changed ones are)
  restoresCompleted @34 :UInt64;     # restores that said they hold every page (Request.complete)
}

struct HelloReply {
  version @0 :UInt32;
  serverNonce @1 :Data;
  authRequired @2 :Bool;
  takesComplete @3 :Bool;         # the server reads Request.complete (older ones would count it a
                                  # protocol error)
}

struct ErrorReply {
  code @0 :ErrorCode;
  message @1 :Text;
  tag @2 :UInt64;                 # for a failed chunk: its tag
}

struct SnapshotInfo {
  name @0 :Text;
  totalBytes @1 :UInt64;
  storedBytes @2 :UInt64;
  regions @3 :UInt32;
  createdUnixNs @4 :UInt64;
  formatVersion @5 :UInt32;  # snapshot format (0 from servers before format 2: they hold format 1)
}
