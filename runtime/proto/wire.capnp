# Page-server wire protocol (issue 3 fills this in).
@0x87a73e6b3ab34cd0;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("lazymem::proto::wire");

struct Placeholder {
  unused @0 :UInt32;
}
