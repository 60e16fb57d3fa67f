// A page server in a child process of a benchmark, pinned to the server's CPU (loopback.h), on
// 127.0.0.1. Forked: start it while the benchmark has no threads.
#pragma once

#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <cstdint>
#include <string>

#include "loopback.h"
#include "page_server.h"

namespace lazymem::bench {

struct PageServerProc {
  pid_t pid = -1;
  uint16_t port = 0;  // 0: it did not start
};

// Serves `store_dir` until killed (it dies with the benchmark too: PR_SET_PDEATHSIG).
inline PageServerProc spawn_page_server(const std::string& store_dir) {
  int ready[2];
  if (::pipe(ready) != 0) return {};
  PageServerProc out;
  out.pid = ::fork();
  if (out.pid == 0) {
    (void)::prctl(PR_SET_PDEATHSIG, SIGKILL);
    pin_to(server_cpu());
    pageserver::ServerOptions o;
    o.store_dir = store_dir;
    o.host = "127.0.0.1";
    auto s = pageserver::PageServer::listen(o);
    uint16_t port = s.ok() ? (*s)->port() : 0;
    (void)!::write(ready[1], &port, sizeof port);
    if (s.ok()) (void)(*s)->run();
    _exit(0);
  }
  if (out.pid > 0) (void)!::read(ready[0], &out.port, sizeof out.port);
  ::close(ready[0]);
  ::close(ready[1]);
  return out;
}

}  // namespace lazymem::bench
