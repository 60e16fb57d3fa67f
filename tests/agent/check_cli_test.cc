// `lazymem-agent check`: table and JSON output, and the exit code and message a user without
// userfaultfd rights gets.
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string>

namespace {

struct CliRun {
  int status;
  std::string out;
};

// Runs the agent binary (path from the environment, set by meson) with `args`, as `uid`.
CliRun run_agent(const std::string& args, uid_t uid = 0) {
  const char* bin = std::getenv("LAZYMEM_AGENT");
  std::string cmd = std::string(bin ? bin : "lazymem-agent") + " " + args + " 2>&1";
  int fds[2];
  if (::pipe(fds) != 0) return {-1, ""};
  pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(fds[1], 1);
    ::close(fds[0]);
    if (uid != 0 && (::setgid(uid) != 0 || ::setuid(uid) != 0)) _exit(99);
    ::execl("/bin/sh", "sh", "-c", cmd.c_str(), nullptr);
    _exit(98);
  }
  ::close(fds[1]);
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(fds[0], buf, sizeof buf)) > 0) out.append(buf, static_cast<size_t>(n));
  ::close(fds[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

TEST(AgentCheckCli, TableNamesEveryFeature) {
  CliRun r = run_agent("check --store /tmp");
  EXPECT_NE(r.out.find("feature"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("userfaultfd"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("IORING_OP_SEND_ZC"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("O_DIRECT on /tmp"), std::string::npos) << r.out;
  EXPECT_TRUE(r.status == 0 || r.status == 1) << r.status;
}

TEST(AgentCheckCli, JsonAgreesWithExitCode) {
  CliRun r = run_agent("check --json --store /tmp");
  auto j = nlohmann::json::parse(r.out);
  ASSERT_TRUE(j.contains("features"));
  EXPECT_GE(j["features"].size(), 10u);
  for (const auto& f : j["features"]) {
    EXPECT_TRUE(f.contains("feature") && f.contains("present") && f.contains("needed_by") && f.contains("fallback"));
  }
  EXPECT_EQ(r.status, j["usable"].get<bool>() ? 0 : 1);
}

TEST(AgentCheckCli, UnprivilegedUserIsToldWhatToDo) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to switch to an unprivileged user";
  CliRun r = run_agent("check --store /tmp", 65534);
  if (r.status == 0) GTEST_SKIP() << "unprivileged users may use userfaultfd on this machine";
  EXPECT_EQ(r.status, 1) << r.out;
  EXPECT_NE(r.out.find("vm.unprivileged_userfaultfd"), std::string::npos) << r.out;
}

TEST(AgentCheckCli, UnknownOptionIsAClearError) {
  CliRun r = run_agent("check --frobnicate");
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.out.find("frobnicate"), std::string::npos) << r.out;
}

// A snapshot format that does not exist is refused before anything is read or written.
TEST(AgentCheckCli, UnknownSnapshotFormatIsAClearError) {
  CliRun r = run_agent("snapshot --raw /dev/null --format 3 /tmp/lazymem-no-such-store/x");
  EXPECT_EQ(r.status, 2) << r.out;
  EXPECT_NE(r.out.find("snapshot format 3 does not exist (1 or 2)"), std::string::npos) << r.out;
}

// A control socket the user may not use, or a path that is no socket: the hint says which,
// not "is the agent running?".
TEST(AgentCheckCli, ConnectErrorsSayWhy) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to switch to an unprivileged user";
  char tmpl[] = "/tmp/lazymem-cli-XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl, sock = dir + "/agent.sock";
  ASSERT_EQ(::chmod(dir.c_str(), 0755), 0);
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::strncpy(a.sun_path, sock.c_str(), sizeof a.sun_path - 1);
  const mode_t old = ::umask(0177);  // 0600, root's: as the agent makes it without --group
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ::umask(old);
  ASSERT_EQ(::listen(fd, 4), 0);
  CliRun r = run_agent("status --socket " + sock, 65534);
  EXPECT_EQ(r.status, 1) << r.out;
  EXPECT_NE(r.out.find("start the agent with --group"), std::string::npos) << r.out;
  r = run_agent("status --socket " + dir);
  EXPECT_EQ(r.status, 1) << r.out;
  EXPECT_NE(r.out.find("that path is not a socket"), std::string::npos) << r.out;
  ::close(fd);
  ::unlink(sock.c_str());
  ::rmdir(dir.c_str());
}

}  // namespace
