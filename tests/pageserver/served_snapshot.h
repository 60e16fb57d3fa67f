// The fixture the page-server suites share: a snapshot of heap-like data captured into a
// scratch store, and a real page server on loopback running it in a thread of the test.
#pragma once

#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "../common/test_data.h"
#include "lazymem/kernel_features.h"
#include "lazymem/restore.h"
#include "lazymem/snapshot.h"
#include "page_server.h"

namespace lazymem::testing {

// A child's wait status says it died of SIGBUS; or, the signal passed on to a sanitizer's
// handler, that the sanitizer reported it and exited (1 for ASan, 66 for TSan).
inline ::testing::AssertionResult died_of_sigbus(int status) {
  if (WIFSIGNALED(status) && WTERMSIG(status) == SIGBUS) return ::testing::AssertionSuccess();
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  if (WIFEXITED(status) && (WEXITSTATUS(status) == 1 || WEXITSTATUS(status) == 66)) return ::testing::AssertionSuccess();
#endif
  return ::testing::AssertionFailure() << (WIFSIGNALED(status) ? "child died of signal " : "child exited with ")
                                       << (WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status));
}

class ServedSnapshotTest : public ::testing::Test {
 protected:
  void SetUp() override {
    kf_ = probe_kernel();
    if (!kf_.uffd_usable) GTEST_SKIP() << "userfaultfd unusable: " << kf_.uffd_error;
  }
  void TearDown() override { stop_server(); }

  // Captures `len` bytes of heap-like data as snapshot "snap" (format 0: the default).
  void capture(size_t len, uint64_t seed, uint32_t format = 0) {
    void* p = map_for_capture(len, seed);
    ASSERT_NE(p, nullptr);
    fill_mixed(static_cast<std::byte*>(p), len, seed);
    expected_.assign(static_cast<std::byte*>(p), static_cast<std::byte*>(p) + len);
    len_ = len;
    CaptureRegion r{"heap", p, len, PROT_READ | PROT_WRITE};
    CaptureOptions co;
    if (format != 0) co.format_version = format;
    co.replace = true;
    auto rep = capture_regions(dir_.path() + "/snap", std::span(&r, 1), co);
    ASSERT_TRUE(rep.ok()) << rep.error().message();
    ::munmap(p, len);
  }
  void start_server(pageserver::ServerOptions o = {}) {
    o.store_dir = dir_.path();
    auto s = pageserver::PageServer::listen(o);
    ASSERT_TRUE(s.ok()) << s.error().message();
    server_ = std::move(*s);
    thread_ = std::thread([this] { (void)server_->run(); });
  }
  void stop_server() {
    if (server_ && thread_.joinable()) server_->stop();
    if (thread_.joinable()) thread_.join();
  }
  // Stops the server and starts it again on the same port (what it held open is gone).
  void restart_server() {
    pageserver::ServerOptions again;
    again.port = server_->port();
    stop_server();
    server_.reset();
    start_server(again);
  }
  std::string uri() const { return "lazymem://127.0.0.1:" + std::to_string(server_->port()) + "/snap"; }

  // A page server of this store in a child process of its own, which a test can stop (SIGSTOP)
  // or limit; killed (continued first) when this goes. Forked before the test starts threads:
  // the child runs the server loop alone.
  struct ServerProcess {
    pid_t pid = -1;
    uint16_t port = 0;
    ServerProcess() = default;
    ServerProcess(const ServerProcess&) = delete;
    ServerProcess& operator=(const ServerProcess&) = delete;
    ~ServerProcess() {
      if (pid <= 0) return;
      ::kill(pid, SIGCONT);
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
  };
  // Starts `out`; `in_child` runs in the child once the server listens (false: the child quits).
  void fork_server(ServerProcess& out, const std::function<bool()>& in_child = {}) {
    int port_pipe[2];
    ASSERT_EQ(::pipe(port_pipe), 0);
    out.pid = ::fork();
    ASSERT_GE(out.pid, 0);
    if (out.pid == 0) {
      ::close(port_pipe[0]);
      pageserver::ServerOptions o;
      o.store_dir = dir_.path();
      auto srv = pageserver::PageServer::listen(o);
      if (!srv.ok() || (in_child && !in_child())) _exit(3);
      uint16_t port = (*srv)->port();
      (void)!::write(port_pipe[1], &port, sizeof port);
      (void)(*srv)->run();
      _exit(0);
    }
    ::close(port_pipe[1]);
    ASSERT_EQ(::read(port_pipe[0], &out.port, sizeof out.port), static_cast<ssize_t>(sizeof out.port))
        << "the server did not start";
    ::close(port_pipe[0]);
  }

  // A child restores from the server with `o` and touches its first page; the server is then
  // stopped and the child touches `offset`, never fetched (SIGBUS left to the handler there
  // is, unless `default_sigbus`). Sets the child's wait status and the seconds from the
  // touch to the child's end. Starts the server itself, after the fork: a child forked while
  // the server's thread runs can inherit a lock that thread held (the sanitizers' allocator
  // hung the child so), and the listening socket.
  void child_touches_after_server_death(RestoreOptions o, size_t offset, bool default_sigbus, int& status,
                                        double& secs) {
    int port[2], ready[2], go[2];
    ASSERT_EQ(::pipe(port), 0);
    ASSERT_EQ(::pipe(ready), 0);
    ASSERT_EQ(::pipe(go), 0);
    pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      ::close(port[1]);
      ::close(ready[0]);
      ::close(go[1]);
      uint16_t server_port = 0;
      if (::read(port[0], &server_port, sizeof server_port) != sizeof server_port) _exit(4);
      auto r = LazyRestore::start("lazymem://127.0.0.1:" + std::to_string(server_port) + "/snap", kf_, o);
      if (!r.ok()) _exit(3);
      volatile const char* p = static_cast<const char*>((*r)->regions()[0].address);
      (void)p[0];  // one page fetched while the server lives
      char c = 1;
      (void)!::write(ready[1], &c, 1);
      (void)!::read(go[0], &c, 1);  // the parent has stopped the server
      if (default_sigbus) ::signal(SIGBUS, SIG_DFL);
      (void)p[offset];
      _exit(5);
    }
    ::close(port[0]);
    ::close(ready[1]);  // a child that dies early gives end-of-file, not a wait forever
    ::close(go[0]);
    start_server();
    const uint16_t server_port = server_->port();
    ASSERT_EQ(::write(port[1], &server_port, sizeof server_port), static_cast<ssize_t>(sizeof server_port));
    ::close(port[1]);
    char c;
    ASSERT_EQ(::read(ready[0], &c, 1), 1) << "the child died before its first page";
    stop_server();
    server_.reset();  // the listening socket goes too: reconnects are refused
    auto t0 = std::chrono::steady_clock::now();
    ASSERT_EQ(::write(go[1], &c, 1), 1);
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ::close(ready[0]);
    ::close(go[1]);
  }

  KernelFeatures kf_;
  ScratchDir dir_;
  std::vector<std::byte> expected_;
  size_t len_ = 0;
  std::unique_ptr<pageserver::PageServer> server_;
  std::thread thread_;
};

}  // namespace lazymem::testing
