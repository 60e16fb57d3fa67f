// Test helper: a real lazymem-pageserver process (fork + exec), for tests of what talks to one.
#pragma once

#include <fcntl.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstdint>
#include <string>
#include <vector>

namespace lazymem::testing {

// A lazymem-pageserver process serving `store` (with `more` arguments), started (fork + exec)
// and killed when this goes, or when the test process dies.
class SpawnedServer {
 public:
  SpawnedServer(std::string binary, std::string store, std::vector<std::string> more = {})
      : binary_(std::move(binary)), store_(std::move(store)), more_(std::move(more)) {}
  ~SpawnedServer() { kill(); }

  // Starts it on `port` (0: any; the one it got is kept, so a restart comes back on it).
  void start() {
    int out[2];
    ASSERT_EQ(::pipe2(out, O_CLOEXEC), 0);
    const std::string listen = fmt::format("127.0.0.1:{}", port_);
    std::vector<std::string> args = {binary_, "serve", "--store", store_, "--listen", listen};
    args.insert(args.end(), more_.begin(), more_.end());
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_ = ::fork();
    ASSERT_GE(pid_, 0);
    if (pid_ == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      ::dup2(out[1], STDOUT_FILENO);
      ::execv(binary_.c_str(), argv.data());
      _exit(127);
    }
    ::close(out[1]);
    // "listening on HOST:PORT" once it accepts connections.
    std::string line;
    char c;
    pollfd p{out[0], POLLIN, 0};
    while (line.find('\n') == std::string::npos && ::poll(&p, 1, 20000) > 0 && ::read(out[0], &c, 1) == 1) line += c;
    ::close(out[0]);
    const auto colon = line.rfind(':');
    ASSERT_TRUE(line.rfind("listening on ", 0) == 0 && colon != std::string::npos) << "server said: " << line;
    port_ = static_cast<uint16_t>(std::stoi(line.substr(colon + 1)));
  }
  void stop() { ASSERT_EQ(::kill(pid_, SIGSTOP), 0); }
  void resume() { ASSERT_EQ(::kill(pid_, SIGCONT), 0); }
  void kill() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGCONT);
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }
  uint16_t port() const { return port_; }

 private:
  std::string binary_, store_;
  std::vector<std::string> more_;
  pid_t pid_ = -1;
  uint16_t port_ = 0;
};

}  // namespace lazymem::testing
