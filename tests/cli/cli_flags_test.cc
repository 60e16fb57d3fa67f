// The programs' command lines: every wrong flag or argument gets one line that says what is
// wrong and where the help is, and exit status 2; help exits 0; nothing starts on a bad flag.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "../common/test_data.h"

namespace {

struct CliRun {
  int status;
  std::string out;  // stdout and stderr
};

// Runs `program` (its path from the environment variable `env`, set by meson) with `args`,
// bounded by timeout(1): a flag that should be refused but starts a server fails as status 124.
// `via`: a command that runs it (e.g. setpriv, to run it as another user).
CliRun run(const char* env, const std::string& args, const std::string& via = "") {
  const char* bin = std::getenv(env);
  if (bin == nullptr) return {-1, std::string(env) + " not set: run through meson test"};
  FILE* p = ::popen(("timeout 10 " + via + std::string(bin) + " " + args + " 2>&1").c_str(), "r");
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  int st = ::pclose(p);
  return {WIFEXITED(st) ? WEXITSTATUS(st) : -1, out};
}

CliRun pageserver(const std::string& args) { return run("LAZYMEM_PAGESERVER", args); }
CliRun agent(const std::string& args) { return run("LAZYMEM_AGENT", args); }

// One line, naming the flag, pointing at the command's help.
void expect_refused(const CliRun& r, const std::string& says, const std::string& command) {
  EXPECT_EQ(r.status, 2) << r.out;
  EXPECT_NE(r.out.find(says), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("(see " + command + " --help)"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find('\n'), r.out.size() - 1) << "more than one line: " << r.out;
}

class CliFlagsTest : public ::testing::Test {
 protected:
  lazymem::testing::ScratchDir dir_;
};

TEST_F(CliFlagsTest, PageServerRefusesBadFlags) {
  const std::string serve = "serve --store " + dir_.path() + " ";
  const std::string cmd = "lazymem-pageserver serve";
  expect_refused(pageserver(serve + "--listen 127.0.0.1:99999"), "'127.0.0.1:99999' is not HOST:PORT", cmd);
  expect_refused(pageserver(serve + "--listen 127.0.0.1:http"), "'127.0.0.1:http' is not HOST:PORT", cmd);
  expect_refused(pageserver(serve + "--listen 127.0.0.1"), "'127.0.0.1' is not HOST:PORT", cmd);
  expect_refused(pageserver(serve + "--listen :7070"), "':7070' is not HOST:PORT", cmd);
  expect_refused(pageserver(serve + "--metrics 127.0.0.1:-1"), "--metrics: '127.0.0.1:-1' is not HOST:PORT", cmd);
  expect_refused(pageserver(serve + "--cache-mib -5"), "--cache-mib wants a whole number, 0 or more; got '-5'", cmd);
  expect_refused(pageserver(serve + "--cache-mib 1099511627776"), "is more than this machine's memory", cmd);
  expect_refused(pageserver(serve + "--poll-after-page-us -1"), "--poll-after-page-us wants a whole number", cmd);
  expect_refused(pageserver(serve + "--poll-after-page-us 4294967295"), "--poll-after-page-us wants 0 to 10000", cmd);
  expect_refused(pageserver(serve + "--keep-replaced-s 4294967295"), "--keep-replaced-s wants 0 to 86400", cmd);
  expect_refused(pageserver("serve"), "the option '--store' is required", cmd);
  expect_refused(pageserver("stats --server foo"), "--server wants lazymem://HOST:PORT[,HOST:PORT...], got 'foo'",
                 "lazymem-pageserver stats");
  expect_refused(pageserver("ls --server lazymem://127.0.0.1:1,h"), "--server: 'h' is not HOST:PORT",
                 "lazymem-pageserver ls");
  expect_refused(pageserver("ls --store a --server lazymem://h:1"), "give exactly one of --store and --server",
                 "lazymem-pageserver ls");
  expect_refused(pageserver("rm --store " + dir_.path() + " --name ../etc"), "a snapshot name must be",
                 "lazymem-pageserver rm");
  expect_refused(pageserver("rm --store " + dir_.path() + " --name a b"), "unexpected argument 'b'",
                 "lazymem-pageserver rm");
  expect_refused(pageserver("import --store " + dir_.path() + " --raw x --name a --chunk-kib 4194304"),
                 "--chunk-kib wants a power of two from 4 to 4096 (KiB), got 4194304", "lazymem-pageserver import");
  for (const char* c : {"serve", "import", "ls", "rm", "verify", "stats"}) {
    CliRun help = pageserver(std::string(c) + " --help");
    EXPECT_EQ(help.status, 0) << c << ": " << help.out;
    EXPECT_NE(help.out.find("--help"), std::string::npos) << c << ": " << help.out;
  }
}

// What a capture is asked for is checked before any work, with the checks the capture itself
// makes: a wrong value is the user's (2), not a failed capture (1), and nothing is written.
TEST_F(CliFlagsTest, WrongCaptureArgumentsAreUsageErrors) {
  const std::string d = dir_.path();
  const std::string import = "import --store " + d + "/store --raw " + d + "/none --name a ";
  expect_refused(pageserver(import + "--format 3"), "snapshot format 3 does not exist (1 or 2)", "lazymem-pageserver import");
  expect_refused(pageserver(import + "--zstd-level 99"), "zstd level 99 is outside -7..22", "lazymem-pageserver import");
  const std::string raw = "snapshot --raw " + d + "/none ", cmd = "lazymem-agent snapshot";
  expect_refused(agent(raw + "--chunk-size 1000 " + d + "/store/a"), "chunk size 1000 must be a power of two", cmd);
  expect_refused(agent(raw + "--format 7 " + d + "/store/a"), "snapshot format 7 does not exist (1 or 2)", cmd);
  expect_refused(agent(raw + "--zstd-level 50 " + d + "/store/a"), "zstd level 50 is outside -7..22", cmd);
  expect_refused(agent(raw + "lazymem://127.0.0.1:7071/.hid"), "a snapshot name must be", cmd);
  const std::string pid = "snapshot --pid " + std::to_string(::getpid()) + " ";
  expect_refused(agent(pid + d + "/store/a"), "nothing to capture: give --region", cmd);
  expect_refused(agent(pid + "--region 1000-2000=a --region 3000-4000=a " + d + "/store/a"), "another region has that name", cmd);
  expect_refused(agent(pid + "--region 1000-3000 --region 2000-4000 " + d + "/store/a"), "overlaps region", cmd);
  struct stat st {};
  EXPECT_NE(::stat((d + "/store").c_str(), &st), 0) << "a refused capture made its store";
}

// A capture's target that is there but is no snapshot (the store itself, given as the target) is
// said to be that, not "already exists" (whose --replace would refuse it too); for a snapshot
// that does exist, the message names --replace.
TEST_F(CliFlagsTest, CaptureTargetsSayWhatIsThere) {
  const std::string d = dir_.path(), image = d + "/guest.mem", store = d + "/store";
  std::ofstream(image) << std::string(1 << 16, 'x');
  CliRun r = agent("snapshot --raw " + image + " " + store + "/vm");
  ASSERT_EQ(r.status, 0) << r.out;
  for (const std::string& target : {store, store + "/"}) {
    for (const char* replace : {"", "--replace "}) {
      r = agent("snapshot --raw " + image + " " + replace + target);
      EXPECT_EQ(r.status, 1) << r.out;
      EXPECT_NE(r.out.find(store + " is not a lazymem snapshot but a directory of other files"), std::string::npos) << r.out;
      EXPECT_NE(r.out.find("did you mean " + store + "/NAME?"), std::string::npos) << r.out;
    }
  }
  for (const CliRun& again : {agent("snapshot --raw " + image + " " + store + "/vm"),
                              pageserver("import --store " + store + " --raw " + image + " --name vm")}) {
    EXPECT_EQ(again.status, 1) << again.out;
    EXPECT_NE(again.out.find("snapshot " + store + "/vm already exists: choose another name, or replace it (--replace"),
              std::string::npos) << again.out;
  }
  // A symbolic link (to a directory of other files, or to a snapshot) is said to be one: a
  // snapshot is never read or written through a link.
  std::filesystem::create_directory(d + "/other");
  std::ofstream(d + "/other/notes.txt") << "mine\n";
  std::filesystem::create_directory_symlink(d + "/other", store + "/link");
  std::filesystem::create_directory_symlink(store + "/vm", store + "/vmlink");
  for (const char* link : {"/link", "/vmlink"}) {
    r = agent("snapshot --raw " + image + " --replace " + store + link);
    EXPECT_EQ(r.status, 1) << r.out;
    EXPECT_NE(r.out.find(store + link + " is a symbolic link; not writing through it"), std::string::npos) << r.out;
  }
  struct stat st {};
  EXPECT_EQ(::stat((store + "/vm/manifest").c_str(), &st), 0) << "the snapshot was touched";
  EXPECT_EQ(::stat((d + "/other/notes.txt").c_str(), &st), 0) << "the linked directory was touched";
}

// Flags that would do nothing are refused, not ignored: a token is for a page server, a store
// is read and written directly; a --raw file is captured whole.
TEST_F(CliFlagsTest, FlagsThatWouldDoNothingAreRefused) {
  const std::string d = dir_.path(), token = " --token-file " + d + "/token";
  std::ofstream(d + "/token") << "0123456789abcdef0123456789abcdef\n";
  const std::string says = "--token-file is the token for --server; --store is read directly, with no token";
  expect_refused(pageserver("ls --store " + d + token), says, "lazymem-pageserver ls");
  expect_refused(pageserver("rm --store " + d + " --name a" + token), says, "lazymem-pageserver rm");
  expect_refused(pageserver("verify --store " + d + token), says, "lazymem-pageserver verify");
  expect_refused(pageserver("verify --store " + d + " --name a" + token), says, "lazymem-pageserver verify");
  const std::string cmd = "lazymem-agent snapshot";
  expect_refused(agent("snapshot --raw " + d + "/none" + token + " " + d + "/store/a"),
                 "--token-file is the page-server token for a lazymem:// TARGET", cmd);
  expect_refused(agent("snapshot --raw " + d + "/none --region 1000-2000 " + d + "/store/a"), "--region goes with --pid", cmd);
  // restore the same (it took the token and dropped it silently, where snapshot refused it).
  expect_refused(agent("restore --socket " + d + "/agent.sock --firecracker-socket " + d + "/vm.sock --snapshot " + d +
                       "/store/a" + token),
                 "--token-file is the page-server token for a lazymem:// --snapshot", "lazymem-agent restore");
  // Where it does something, it is taken: the server is asked (and is not there: a failure).
  CliRun r = pageserver("ls --server lazymem://127.0.0.1:1" + token);
  EXPECT_EQ(r.status, 1) << r.out;
}

// A token file is a regular file holding a token worth the name: a FIFO would hang the command,
// /dev/zero fill the memory, a short token be guessed from one overheard exchange.
TEST_F(CliFlagsTest, TokenFilesAreChecked) {
  const std::string d = dir_.path();
  ASSERT_EQ(::mkfifo((d + "/fifo").c_str(), 0600), 0);
  { std::FILE* f = std::fopen((d + "/short").c_str(), "w"); std::fputs("abc\n", f); std::fclose(f); }
  { std::FILE* f = std::fopen((d + "/big").c_str(), "w"); for (int i = 0; i < 5000; ++i) std::fputc('x', f); std::fclose(f); }
  const std::pair<std::string, std::string> cases[] = {
      {d + "/fifo", "is not a regular file"},  {"/dev/zero", "is not a regular file"}, {d, "is not a regular file"},
      {d + "/big", "is 5000 bytes"},           {d + "/short", "holds 3 characters; a token needs at least 16"},
      {d + "/none", "cannot be read: No such file or directory"}};
  for (const auto& [file, says] : cases) {
    CliRun r = pageserver("serve --store " + d + " --listen 127.0.0.1:0 --token-file " + file);
    EXPECT_EQ(r.status, 1) << file << ": " << r.out;
    EXPECT_NE(r.out.find(says), std::string::npos) << file << ": " << r.out;
    r = pageserver("ls --server lazymem://127.0.0.1:1 --token-file " + file);
    EXPECT_EQ(r.status, 1) << file << ": " << r.out;
    EXPECT_NE(r.out.find(says), std::string::npos) << file << ": " << r.out;
  }
}

// verify tells damage (1) from what it could not check (3): a server that is not running says
// nothing about the snapshot, and recapturing it would not help.
TEST_F(CliFlagsTest, VerifyOfAnUnreachableServerIsNotDamage) {
  int s = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);  // bound, never listening: refused
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  ASSERT_EQ(::bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ASSERT_EQ(::getsockname(s, reinterpret_cast<sockaddr*>(&a), &len), 0);
  CliRun r = pageserver("verify --server lazymem://127.0.0.1:" + std::to_string(ntohs(a.sin_port)) + " --name vm");
  ::close(s);
  EXPECT_EQ(r.status, 3) << r.out;
  EXPECT_NE(r.out.find("vm: not checked: connect to page server"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("could not be checked"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("DAMAGED"), std::string::npos) << r.out;
  // A name that is not in the store: said so, not "verify again once that is mended".
  r = pageserver("verify --store " + dir_.path() + " --name typo");
  EXPECT_EQ(r.status, 1) << r.out;
  EXPECT_NE(r.out.find("typo not found"), std::string::npos) << r.out;
}

// A listener that cannot bind says what its errno means and names the flag to change, not "in
// use?" whatever it was.
TEST_F(CliFlagsTest, BindErrorsSayWhy) {
  const std::string serve = "serve --store " + dir_.path() + " ";
  int s = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  ASSERT_EQ(::bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ASSERT_EQ(::listen(s, 1), 0);
  ASSERT_EQ(::getsockname(s, reinterpret_cast<sockaddr*>(&a), &len), 0);
  const std::string taken = "127.0.0.1:" + std::to_string(ntohs(a.sin_port));
  CliRun r = pageserver(serve + "--listen " + taken);
  EXPECT_EQ(r.status, 1) << r.out;
  EXPECT_NE(r.out.find("bind --listen " + taken + ": Address already in use (something else listens on that port: pick "
                       "another --listen port)"), std::string::npos) << r.out;
  r = pageserver(serve + "--listen 127.0.0.1:0 --metrics " + taken);
  EXPECT_EQ(r.status, 1) << r.out;
  EXPECT_NE(r.out.find("bind --metrics " + taken + ": Address already in use (something else listens on that port: pick "
                       "another --metrics port)"), std::string::npos) << r.out;
  ::close(s);

  // An address of TEST-NET-3 (RFC 5737), unless this machine has it.
  s = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  a.sin_port = 0;
  ASSERT_EQ(::inet_pton(AF_INET, "203.0.113.1", &a.sin_addr), 1);
  const bool ours = ::bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  ::close(s);
  if (!ours) {
    r = pageserver(serve + "--listen 203.0.113.1:0");
    EXPECT_EQ(r.status, 1) << r.out;
    EXPECT_NE(r.out.find("that address is not one of this machine's: give --listen one of its own"), std::string::npos)
        << r.out;
    EXPECT_EQ(r.out.find("in use"), std::string::npos) << r.out;
  }

  // A privileged port, as a user who may not bind one (root: run as nobody).
  unsigned unprivileged_from = 1024;
  if (std::ifstream f("/proc/sys/net/ipv4/ip_unprivileged_port_start"); f) f >> unprivileged_from;
  std::string via;
  if (::geteuid() == 0) {
    if (::access("/usr/bin/setpriv", X_OK) != 0) GTEST_SKIP() << "no setpriv to run the privileged-port case as a user";
    ASSERT_EQ(::chmod(dir_.path().c_str(), 0755), 0);
    via = "/usr/bin/setpriv --reuid=65534 --regid=65534 --clear-groups ";
  }
  if (unprivileged_from <= 1) GTEST_SKIP() << "any user may bind any port here (net.ipv4.ip_unprivileged_port_start)";
  r = run("LAZYMEM_PAGESERVER", serve + "--listen 127.0.0.1:1", via);
  EXPECT_EQ(r.status, 1) << r.out;
  EXPECT_NE(r.out.find("ports below 1024 are privileged: give --listen a port from 1024"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("in use"), std::string::npos) << r.out;
}

TEST_F(CliFlagsTest, AgentRefusesBadFlags) {
  const std::string sock = " --socket " + dir_.path() + "/agent.sock";
  expect_refused(agent("run --fault-deadline-ms -5" + sock), "--fault-deadline-ms wants a whole number", "lazymem-agent run");
  // 0 once started a daemon whose every restore died of SIGBUS at its first fault.
  for (const char* ms : {"0", "99", "3600001", "4294967295"}) {
    expect_refused(agent(std::string("run --fault-deadline-ms ") + ms + sock), "--fault-deadline-ms wants 100 to 3600000",
                   "lazymem-agent run");
  }
  expect_refused(agent("run --metrics 127.0.0.1:70000" + sock), "'127.0.0.1:70000' is not HOST:PORT", "lazymem-agent run");
  expect_refused(agent("stats --watch 0" + sock), "--watch wants seconds, from 0.1 to 86400", "lazymem-agent stats");
  expect_refused(agent("status --watch inf" + sock), "--watch wants seconds", "lazymem-agent status");
  expect_refused(agent("status extra" + sock), "unexpected argument 'extra'", "lazymem-agent status");
  expect_refused(agent("snapshot --chunk-size -1 --raw x " + dir_.path() + "/s"), "--chunk-size wants a whole number",
                 "lazymem-agent snapshot");
  expect_refused(agent("check --store " + dir_.path() + "/none"), "is not a directory", "lazymem-agent check");
  expect_refused(agent("run --group 4294967296" + sock), "no group '4294967296'", "lazymem-agent run");
  expect_refused(agent("restore" + sock), "give --firecracker-socket PATH and --snapshot URI", "lazymem-agent restore");
  const std::string mig = "migrate --pid 1 --region 7f0000000000-7f0000001000 --base " + dir_.path() + "/m";
  expect_refused(agent("migrate --pid 1"), "give --pid PID, --region START-END at least once, and --base",
                 "lazymem-agent migrate");
  expect_refused(agent(mig + " --postcopy-timeout-sec 0"), "--postcopy-timeout-sec wants 1 to 86400",
                 "lazymem-agent migrate");
  expect_refused(agent("migrate --pid 0 --region 7f0000000000-7f0000001000 --base " + dir_.path() + "/m"),
                 "--pid wants a process id", "lazymem-agent migrate");
  expect_refused(agent(mig + " --listen 127.0.0.1:70000"), "--listen:", "lazymem-agent migrate");
  // snapshot as migrate: no process id is a usage error (it was a failure, "no process -1").
  for (const char* pid : {"-1", "0"}) {
    expect_refused(agent(std::string("snapshot --pid ") + pid + " --region 7f0000000000-7f0000001000 " + dir_.path() + "/s"),
                   "--pid wants a process id", "lazymem-agent snapshot");
  }
  expect_refused(agent(mig + " --chunk-size 3"), "chunk size 3 must be a power of two", "lazymem-agent migrate");
  expect_refused(agent("snapshot --live --raw x " + dir_.path() + "/s"), "--live goes with --pid", "lazymem-agent snapshot");
  expect_refused(agent("snapshot --freeze --raw x " + dir_.path() + "/s"), "--freeze goes with --pid",
                 "lazymem-agent snapshot");
  expect_refused(agent("snapshot --pid 1 --tracking write-faults --region 7f0000000000-7f0000001000 " + dir_.path() + "/s"),
                 "--tracking goes with --live", "lazymem-agent snapshot");
  expect_refused(agent("snapshot --pid 1 --live --tracking soft-dirty --region 7f0000000000-7f0000001000 " + dir_.path() +
                       "/s"),
                 "--tracking soft-dirty: give auto, kernel-marks or write-faults", "lazymem-agent snapshot");
  expect_refused(agent(mig + " --tracking often"), "--tracking often: give auto, kernel-marks or write-faults",
                 "lazymem-agent migrate");
  for (const char* c : {"check", "run", "status", "regions", "stats", "snapshot", "migrate", "restore"}) {
    CliRun help = agent(std::string(c) + " --help");
    EXPECT_EQ(help.status, 0) << c << ": " << help.out;
  }
  // A daemon that cannot start says why and exits (it crashed here once, in its destructor).
  CliRun r = agent("run --socket " + dir_.path() + "/no/such/dir/agent.sock");
  EXPECT_EQ(r.status, 1) << r.out;
  EXPECT_NE(r.out.find("does it exist?"), std::string::npos) << r.out;
}

// `lazymem-agent run` checks what it is given before it serves: a flag that would do nothing is
// refused (2), a token file or snapshot it cannot use is a failure (1), said at start rather than
// at the first VM's handshake. (A daemon that started anyway is stopped by timeout: 124.)
TEST_F(CliFlagsTest, AgentRunChecksItsInputsAtStart) {
  const std::string sock = " --socket " + dir_.path() + "/agent.sock", fc = " --firecracker-socket " + dir_.path() + "/fc.sock";
  const std::string cmd = "lazymem-agent run";
  expect_refused(agent("run --snapshot " + dir_.path() + "/vm" + sock), "--firecracker-socket and --snapshot go together", cmd);
  expect_refused(agent("run" + fc + sock), "--firecracker-socket and --snapshot go together", cmd);
  expect_refused(agent("run --token-file " + dir_.path() + "/token" + sock), "--token-file is the page-server token for --snapshot",
                 cmd);
  CliRun help = agent("run --help");
  EXPECT_NE(help.out.find("page-server token for --snapshot"), std::string::npos) << help.out;

  CliRun r = agent("run" + fc + " --snapshot " + dir_.path() + "/nosuch" + sock);
  EXPECT_EQ(r.status, 1) << r.out;
  EXPECT_NE(r.out.find("--snapshot: snapshot " + dir_.path() + "/nosuch not found"), std::string::npos) << r.out;
  std::string image = dir_.path() + "/guest.mem", vm = dir_.path() + "/vm";
  std::ofstream(image) << std::string(1 << 20, 'x');
  r = agent("snapshot --raw " + image + " " + vm);
  ASSERT_EQ(r.status, 0) << r.out;
  r = agent("run" + fc + " --snapshot " + vm + " --token-file /nonexistent" + sock);
  EXPECT_EQ(r.status, 1) << r.out;
  EXPECT_NE(r.out.find("--token-file: token file /nonexistent cannot be read"), std::string::npos) << r.out;
  std::ofstream(dir_.path() + "/empty");
  r = agent("run" + fc + " --snapshot " + vm + " --token-file " + dir_.path() + "/empty" + sock);
  EXPECT_EQ(r.status, 1) << r.out;
  EXPECT_NE(r.out.find("--token-file: token file " + dir_.path() + "/empty holds 0 characters"), std::string::npos) << r.out;
  struct stat st {};
  EXPECT_NE(::stat((dir_.path() + "/agent.sock").c_str(), &st), 0) << "a daemon that did not start left its socket";
}

// `ls` shows a snapshot that stores nothing (every chunk zero) as such, as `import` says, not as
// a ratio of 0.00x.
TEST_F(CliFlagsTest, AnAllZeroSnapshotIsListedAsSuch) {
  const std::string raw = dir_.path() + "/zero.mem";
  std::filesystem::create_directory(dir_.path() + "/store");
  std::ofstream(raw).close();
  std::filesystem::resize_file(raw, 4 << 20);  // a hole: every chunk zero
  CliRun r = pageserver("import --store " + dir_.path() + "/store --raw " + raw + " --name z");
  ASSERT_EQ(r.status, 0) << r.out;
  EXPECT_NE(r.out.find("all zero"), std::string::npos) << r.out;
  r = pageserver("ls --store " + dir_.path() + "/store");
  ASSERT_EQ(r.status, 0) << r.out;
  EXPECT_NE(r.out.find(" all zero "), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("0.00x"), std::string::npos) << r.out;
}

}  // namespace
