// libFuzzer target: the page-server frame and message decoders (clang, -Dfuzz=true).
#include "wire_decoders.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  (void)lazymem::fuzz::decode_stream({data, size});
  (void)lazymem::fuzz::decode_datagram({data, size});
  return 0;
}
