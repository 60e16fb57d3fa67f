# Agent control protocol (issue 4 fills this in).
@0xfdc47f7286472e4a;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("lazymem::proto::agent");

struct Placeholder {
  unused @0 :UInt32;
}
