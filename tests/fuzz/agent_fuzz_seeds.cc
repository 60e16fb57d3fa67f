// Writes the agent fuzz target's starting corpus (agent_seeds.h) into a directory: one file per
// seed. scripts/test.sh runs it before agent_fuzz, so libFuzzer starts from requests that reach
// every decoder's depth rather than from nothing.
#include <cstdio>
#include <fstream>
#include <string>

#include "agent_seeds.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR\n", argv[0]);
    return 2;
  }
  int n = 0;
  auto write = [&](const void* data, size_t size) {
    const std::string path = std::string(argv[1]) + "/seed-" + std::to_string(n++);
    std::ofstream f(path, std::ios::binary);
    f.write(static_cast<const char*>(data), static_cast<std::streamsize>(size));
    return static_cast<bool>(f);
  };
  for (const auto& s : lazymem::fuzz::agent_request_seeds())
    if (!write(s.data(), s.size())) return 1;
  for (const auto& s : lazymem::fuzz::firecracker_handshake_seeds())
    if (!write(s.data(), s.size())) return 1;
  return 0;
}
