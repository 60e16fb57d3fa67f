// libFuzzer target: the agent's control-request and Firecracker-handshake decoders (clang,
// -Dfuzz=true). Every input goes to both: coverage steers it to whichever it reaches.
#include "agent_decoders.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  (void)lazymem::fuzz::decode_control_stream({data, size});
  (void)lazymem::fuzz::decode_handshake({data, size});
  return 0;
}
