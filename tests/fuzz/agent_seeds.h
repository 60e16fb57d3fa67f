// Valid inputs of every kind the agent decodes, to start mutating from: control requests (a
// Restore with several ranges and every field set, ServeFirecracker, status, stats, waitChange,
// failureSeen, fetchRest) as the frames a client sends, several in one stream, and Firecracker handshake
// bodies as Firecracker writes them. Built from the schema, so they never go stale. Used by the
// replay test, and written out as the libFuzzer target's starting corpus (agent_fuzz_seeds).
#pragma once

#include <capnp/message.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "agent.capnp.h"
#include "net/frame.h"

namespace lazymem::fuzz {

inline std::vector<uint8_t> agent_frame_of(capnp::MessageBuilder& m) {
  auto f = net::encode_frame(m, 0);
  std::vector<uint8_t> out(f.size());
  std::memcpy(out.data(), f.data(), f.size());
  return out;
}

inline std::vector<uint8_t> restore_frame(const char* snapshot) {
  capnp::MallocMessageBuilder m;
  auto rq = m.initRoot<proto::agent::Request>();
  rq.setId(11);
  auto r = rq.initRestore();
  r.setSnapshot(snapshot);
  r.setTokenFile("/etc/lazymem/token");
  r.setPrefetch(true);
  r.setUffdFeatures(0x1f);
  r.setManifestChecksum(0x0123456789abcdef);
  r.setAnnouncesFailures(true);
  auto ranges = r.initRanges(3);
  const uint64_t starts[] = {0x7f0000000000, 0x7f0000100000, 0x600000000000};
  for (unsigned i = 0; i < 3; ++i) {
    ranges[i].setStart(starts[i]);
    ranges[i].setLength(0x100000);
    ranges[i].setRegion(i);
    ranges[i].setRegionOffset(i == 2 ? 0x10000 : 0);
  }
  return agent_frame_of(m);
}

// Control connection streams, each of which the agent decodes without refusing anything.
inline std::vector<std::vector<uint8_t>> agent_request_seeds() {
  std::vector<std::vector<uint8_t>> out;
  out.push_back(restore_frame("/var/lib/lazymem/store/kvs"));
  out.push_back(restore_frame("lazymem://pages.example:7070/kvs"));
  {
    capnp::MallocMessageBuilder m;
    auto rq = m.initRoot<proto::agent::Request>();
    rq.setId(12);
    auto f = rq.initServeFirecracker();
    f.setSocketPath("/run/vm1/uffd.sock");
    f.setSnapshot("/var/lib/lazymem/store/vm1");
    f.setTokenFile("/etc/lazymem/token");
    f.setPrefetch(true);
    f.setCancelOnClose(true);
    out.push_back(agent_frame_of(m));
  }
  {
    // Several small requests in one stream, as a CLI's status loop sends them.
    std::vector<uint8_t> stream;
    for (int kind = 0; kind < 5; ++kind) {
      capnp::MallocMessageBuilder m;
      auto rq = m.initRoot<proto::agent::Request>();
      rq.setId(20 + static_cast<uint64_t>(kind));
      if (kind == 0) rq.setStatus();
      if (kind == 1) rq.setStats();
      if (kind == 2) rq.setWaitChange(5);
      if (kind == 3) rq.setFailureSeen(3);
      if (kind == 4) rq.setFetchRest(3);
      auto f = agent_frame_of(m);
      stream.insert(stream.end(), f.begin(), f.end());
    }
    out.push_back(stream);
  }
  return out;
}

// Firecracker handshake bodies, each accepted whole: its own format (page_size and the older
// page_size_kib), several regions, padding as with many regions.
inline std::vector<std::string> firecracker_handshake_seeds() {
  return {
      R"([{"base_host_virt_addr":139637976727552,"size":1073741824,"offset":0,"page_size":4096,"page_size_kib":4},)"
      R"({"base_host_virt_addr":139639050469376,"size":2147483648,"offset":1073741824,"page_size_kib":4}])",
      R"([ {"base_host_virt_addr": 4096, "size": 8192, "offset": 0, "page_size": 4096} ])",
      R"([{"size":65536,"offset":65536,"base_host_virt_addr":1048576},{"base_host_virt_addr":2097152,"size":4096,"offset":0}])",
  };
}

}  // namespace lazymem::fuzz
