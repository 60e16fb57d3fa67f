# Snapshot manifest: what regions a snapshot holds and where each chunk of them is stored.
#
# The manifest file is a fixed header (magic "LZMMANIF", format version, body length, xxh3-64 of
# the body; see runtime/src/snapshot/manifest.h) followed by this message, unpacked. Field numbers
# are never reused; readers reject a format version they do not know before they parse this.
@0x97d7d609ba4bda2c;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("lazymem::proto");

enum Codec {
  zero @0;   # all bytes zero: nothing stored, installed with UFFDIO_ZEROPAGE
  raw @1;    # stored as is (compression did not pay)
  zstd @2;   # one zstd frame holding exactly the chunk's bytes (format 1)
  zstdPages @3;  # format 2: u32 frame ends, one per page, then one frame per page (see docs)
}

struct Chunk {
  codec @0 :Codec;
  offset @1 :UInt64;        # byte offset in the data file (unused for zero)
  storedLength @2 :UInt32;  # bytes stored in the data file (0 for zero)
  checksum @3 :UInt64;      # xxh3-64 of the uncompressed bytes (0 for zero)
  storedChecksum @4 :UInt64;  # zstdPages: xxh3-64 of the stored bytes
}

enum RegionKind {
  process @0;   # captured from a process: restored at startAddress
  rawFile @1;   # imported memory file (e.g. a VM's guest memory): addressed by offset only
}

struct Region {
  name @0 :Text;
  startAddress @1 :UInt64;
  length @2 :UInt64;       # bytes, a multiple of pageSize
  pageSize @3 :UInt32;
  protection @4 :UInt32;   # PROT_* bits at capture time
  kind @5 :RegionKind;
  chunks @6 :List(Chunk);  # ceil(length / chunkSize) entries; the last may be short
  # The memory's own page size where it was huge pages (hugetlbfs) when captured; 0: ordinary
  # pages. Not pageSize, which is the codec's (page frames of format 2). A restore maps the
  # region with huge pages of this size (startAddress and length are multiples of it).
  hugePageSize @7 :UInt64;
}

struct Manifest {
  chunkSize @0 :UInt32;          # bytes per chunk; a multiple of every region's pageSize
  regions @1 :List(Region);
  appState @2 :Data;             # opaque blob handed back to the application on restore
  workingSet @3 :List(UInt64);   # optional: (regionIndex << 48 | pageIndex) in first-touch order
  createdUnixNs @4 :UInt64;
  dataLength @5 :UInt64;         # expected size of the data file; shorter means truncated
  compressionLevel @6 :Int32;
  dictionary @7 :Data;           # format 2: zstd dictionary of the zstdPages chunks (may be empty)
}
