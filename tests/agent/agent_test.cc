// The agent: many processes restoring through one daemon, every byte compared; fork and
// madvise(DONTNEED) during restore; Firecracker's handshake; hostile peers; agent death.
#include <arpa/inet.h>
#include <fcntl.h>
#include <grp.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <linux/sockios.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/stat.h>
#include <sys/ioctl.h>
#include <sys/eventfd.h>
#include <sys/fanotify.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstring>
#include <filesystem>
#include <functional>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>

#include "../common/huge_pages.h"
#include "../common/spawned_server.h"
#include "../common/run_cli.h"
#include "../common/test_data.h"
#include "agent.capnp.h"
#include "agent_client/unix_channel.h"
#include "cli_format.h"
#include "daemon.h"
#include "source_opener.h"
#include "lazymem/agent_client.h"
#include "lazymem/kernel_features.h"
#include "lazymem/snapshot.h"
#include "snapshot/snapshot_reader.h"
#include "sys/uapi_compat.h"
#include "sys/uffd.h"
#include "sys/unique_fd.h"

namespace lazymem {
namespace {

using testing::ScratchDir;
constexpr size_t kMiB = 1 << 20;

// Firecracker's side of the handshake, as Firecracker does it: guest memory mapped anonymous in
// two regions (like a VM with a hole below 4 GiB), a uffd registered over it, one message (JSON
// array of GuestRegionUffdMapping, padded past 1 KiB as with many regions) + the uffd. With
// `split`, the message goes out in two writes (the fd with the first). Returns 0 when every
// page equals `image`; keeps the socket open while it checks, as Firecracker does while it runs.
// `sent_fd`, if given, gets a byte once the message is sent.
int firecracker_vm(const std::string& socket_path, const std::vector<std::byte>& image, bool split, int sent_fd = -1) {
  size_t len = image.size(), a = len / 3 / 4096 * 4096, b = len - a;
  auto* r1 = static_cast<std::byte*>(::mmap(nullptr, a, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  auto* r2 = static_cast<std::byte*>(::mmap(nullptr, b, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  auto uffd = sys::Uffd::open(UFFD_FEATURE_EVENT_REMOVE);
  if (!uffd.ok() || !uffd->register_missing(reinterpret_cast<uintptr_t>(r1), a).ok() ||
      !uffd->register_missing(reinterpret_cast<uintptr_t>(r2), b).ok())
    return 3;
  nlohmann::json regions = nlohmann::json::array(
      {{{"base_host_virt_addr", reinterpret_cast<uintptr_t>(r1)}, {"size", a}, {"offset", 0}, {"page_size", 4096}, {"page_size_kib", 4}},
       {{"base_host_virt_addr", reinterpret_cast<uintptr_t>(r2)}, {"size", b}, {"offset", a}, {"page_size_kib", 4}}});
  std::string body = regions.dump();
  body.insert(1, 2048, ' ');  // larger than 1 KiB, as with many regions
  auto sock = agent::connect_unix(socket_path);
  if (!sock.ok()) return 4;
  const auto bytes = std::as_bytes(std::span(body));
  const size_t first = split ? bytes.size() / 2 : bytes.size();
  if (!agent::send_with_fd(sock->get(), bytes.first(first), uffd->fd()).ok()) return 5;
  if (split && !agent::send_with_fd(sock->get(), bytes.subspan(first), -1).ok()) return 5;
  if (sent_fd >= 0 && ::write(sent_fd, "s", 1) != 1) return 8;
  for (size_t off = 0; off < a; off += 4096)
    if (std::memcmp(r1 + off, image.data() + off, 4096) != 0) return 6;
  for (size_t off = 0; off < b; off += 4096)
    if (std::memcmp(r2 + off, image.data() + a + off, 4096) != 0) return 7;
  return 0;
}

using testing::run_cli;

std::string agent_bin() {
  const char* bin = std::getenv("LAZYMEM_AGENT");
  return bin ? bin : "";
}

class AgentTest : public ::testing::Test {
 protected:
  void SetUp() override {
    kf_ = probe_kernel();
    if (!kf_.uffd_usable) GTEST_SKIP() << "userfaultfd unusable: " << kf_.uffd_error;
    socket_ = dir_.path() + "/agent.sock";
  }
  void TearDown() override {
    if (daemon_pid_ > 0) {
      ::kill(daemon_pid_, SIGTERM);
      ::waitpid(daemon_pid_, nullptr, 0);
    }
  }

  // A snapshot of mixed content at a fresh address; `expected_` keeps the bytes.
  std::string capture(size_t len, uint64_t seed, const std::string& name = "snap", bool replace = false) {
    void* p = testing::map_for_capture(len, seed);
    EXPECT_NE(p, nullptr);
    testing::fill_mixed(static_cast<std::byte*>(p), len, seed);
    expected_.assign(static_cast<std::byte*>(p), static_cast<std::byte*>(p) + len);
    len_ = len;
    CaptureRegion r{"heap", p, len, PROT_READ | PROT_WRITE};
    CaptureOptions o;
    o.replace = replace;
    auto rep = capture_regions(dir_.path() + "/" + name, std::span(&r, 1), o);
    EXPECT_TRUE(rep.ok()) << rep.error().message();
    ::munmap(p, len);
    return dir_.path() + "/" + name;
  }

  // The daemon runs in a process of its own, forked while this one has no other thread. Every
  // later fork (the clients) then copies a single-threaded process: no child can inherit a lock
  // that a daemon, engine or decoder thread held at that instant. (With the daemon's threads in
  // this process, clients forked while the engine was starting its decode threads hung, under
  // ASan, on an inherited lock: one thread left, in a futex wait, no watchdog.)
  // `cwd`: the daemon's working directory (where relative paths would lead it), if not ours.
  void start_daemon(agent::DaemonOptions o = {}, const std::string& cwd = "") {
    o.socket_path = socket_;
    int ready[2];
    ASSERT_EQ(::pipe2(ready, O_CLOEXEC), 0);
    daemon_pid_ = ::fork();
    ASSERT_GE(daemon_pid_, 0);
    if (daemon_pid_ == 0) {
      ::close(ready[0]);
      if (!cwd.empty() && ::chdir(cwd.c_str()) != 0) _exit(4);
      auto d = agent::Daemon::start(o, kf_);
      if (!d.ok()) {
        std::fprintf(stderr, "agent: %s\n", d.error().message().c_str());
        _exit(3);
      }
      char c = 1;
      (void)!::write(ready[1], &c, 1);  // listening: clients may connect
      ::close(ready[1]);
      (void)(*d)->run();  // until SIGTERM
      _exit(0);
    }
    ::close(ready[1]);
    char c;
    ssize_t n = ::read(ready[0], &c, 1);
    ::close(ready[0]);
    ASSERT_EQ(n, 1) << "lazymem-agent did not start";
  }

  // Runs `fn` in a child process; returns its exit status (or 128+signal).
  template <typename Fn>
  static int in_child(Fn&& fn) {
    pid_t pid = ::fork();
    if (pid == 0) _exit(fn());
    int status = 0;
    ::waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }

  // A Restore request made by hand (as an older or hostile client would): one range of region 0,
  // the uffd sent along or not. Returns the agent's error, or "accepted".
  std::string ask_restore(const std::string& loc, uint64_t start, uint64_t len, bool with_fd, uint64_t version = 0) {
    return ask_restore(loc, {fault::MappedRange{start, len, 0, 0}}, with_fd, version);
  }
  std::string ask_restore(const std::string& loc, const std::vector<fault::MappedRange>& ranges, bool with_fd = true,
                          uint64_t version = 0) {
    auto uffd = sys::Uffd::open(0);
    EXPECT_TRUE(uffd.ok());
    return ask_restore_sending(loc, ranges, with_fd ? uffd->fd() : -1, version);
  }
  // The same, sending `fd` (-1: none) as the request's uffd.
  std::string ask_restore_sending(const std::string& loc, const std::vector<fault::MappedRange>& ranges, int fd,
                                  uint64_t version = 0) {
    auto s = agent::connect_unix(socket_);
    EXPECT_TRUE(s.ok());
    capnp::MallocMessageBuilder b;
    auto rq = b.initRoot<proto::agent::Request>();
    rq.setId(1);
    auto rs = rq.initRestore();
    rs.setSnapshot(loc);
    rs.setManifestChecksum(version);
    auto rr = rs.initRanges(static_cast<unsigned>(ranges.size()));
    for (unsigned i = 0; i < ranges.size(); ++i) {
      rr[i].setStart(ranges[i].start);
      rr[i].setLength(ranges[i].length);
      rr[i].setRegion(ranges[i].region);
      rr[i].setRegionOffset(ranges[i].region_offset);
    }
    EXPECT_TRUE(agent::send_frame_fd(s->get(), b, {}, fd).ok());
    net::FrameBuffer buf;
    std::deque<sys::UniqueFd> fds;
    for (;;) {
      auto f = buf.next();
      if (f.ok() && f->has_value()) {
        auto hd = net::Header::parse((*f)->header);
        auto reply = (*hd)->root<proto::agent::Reply>();
        return reply.isError() ? std::string(reply.getError().cStr()) : "accepted";
      }
      if (!agent::recv_some(s->get(), buf, fds, 5000).ok()) return "no reply";
    }
  }

  // Restores `loc` through the agent in a child process (working in `cwd`, if given) and compares
  // every page with expected_; returns the child's status: 0 when every byte is right.
  int restore_in_child(const std::string& loc, const std::string& cwd = "") {
    return in_child([&] {
      ::alarm(120);  // a hang ends as SIGALRM (128+14), not as the suite's timeout
      if (!cwd.empty() && ::chdir(cwd.c_str()) != 0) return 2;
      auto r = AgentRestore::start(socket_, loc);
      if (!r.ok()) {
        std::fprintf(stderr, "%s\n", r.error().message().c_str());
        return 3;
      }
      const auto* got = static_cast<const std::byte*>((*r)->regions()[0].address);
      for (size_t off = 0; off < len_; off += 4096)
        if (!same(got, off, 4096)) return 4;
      return (*r)->wait_complete(std::chrono::seconds(30)).ok() ? 0 : 5;
    });
  }

  bool same(const std::byte* got, size_t off, size_t n) const { return std::memcmp(got + off, expected_.data() + off, n) == 0; }

  KernelFeatures kf_;
  ScratchDir dir_;
  std::string socket_;
  std::vector<std::byte> expected_;
  size_t len_ = 0;
  pid_t daemon_pid_ = -1;
};

TEST_F(AgentTest, EightProcessesAtOnceEveryByte) {
  std::string loc = capture(64 * kMiB, 41);
  start_daemon();
  std::vector<pid_t> kids;
  // Every child is forked before any of them talks to the agent, whose threads could otherwise
  // hold a lock (a logger's, say) at the moment of a fork.
  int go[2];
  ASSERT_EQ(::pipe(go), 0);
  for (int i = 0; i < 8; ++i) {
    pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      ::close(go[1]);
      char c;
      (void)!::read(go[0], &c, 1);  // EOF once everyone is forked
      AgentRestoreOptions o;
      o.prefetch = i % 2 == 0;
      auto r = AgentRestore::start(socket_, loc, o);
      if (!r.ok()) {
        std::fprintf(stderr, "%s\n", r.error().message().c_str());
        _exit(3);
      }
      const auto* got = static_cast<const std::byte*>((*r)->regions()[0].address);
      for (size_t k = 0; k < len_ / 4096; ++k) {
        size_t pg = (k * 2654435761u + static_cast<size_t>(i)) % (len_ / 4096);  // scattered, covers all
        if (!same(got, pg * 4096, 4096)) _exit(4);
      }
      lazymem::Status done = (*r)->wait_complete(std::chrono::seconds(60));
      if (!done.ok()) std::fprintf(stderr, "child %d: %s\n", i, done.error().message().c_str());
      _exit(done.ok() ? 0 : 5);
    }
    kids.push_back(pid);
  }
  ::close(go[0]);
  ::close(go[1]);
  for (pid_t pid : kids) {
    int status = 0;
    ::waitpid(pid, &status, 0);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child status " << status;
  }
  auto js = agent_query(socket_, true);
  ASSERT_TRUE(js.ok()) << js.error().message();
  auto j = nlohmann::json::parse(*js);
  EXPECT_EQ(j["sessions"].size(), 8u);
  for (const auto& s : j["sessions"]) EXPECT_EQ(s["state"], "complete") << s.dump();
}

TEST_F(AgentTest, DontneedAndForkDuringRestore) {
  std::string loc = capture(32 * kMiB, 42);
  start_daemon();
  int rc = in_child([&] {
    AgentRestoreOptions o;
    o.prefetch = false;
    auto r = AgentRestore::start(socket_, loc, o);
    if (!r.ok()) return 3;
    auto* got = static_cast<std::byte*>((*r)->regions()[0].address);
    if (!same(got, 0, 4096)) return 4;
    // madvise(DONTNEED) on a range never fetched: it must read as zeros afterwards, and the
    // agent must never install snapshot bytes there.
    size_t hole = 8 * kMiB;
    if (::madvise(got + hole, 1 * kMiB, MADV_DONTNEED) != 0) return 5;
    for (size_t off = 0; off < kMiB; off += 4096)
      if (got[hole + off] != std::byte{0}) return 6;
    // A fork that runs no atfork handler (a raw clone: not fork(), which completes the restore
    // first, ForkCompletesTheRestoreFirst): the child's own faults are served too (a new uffd
    // from UFFD_EVENT_FORK).
    pid_t kid = static_cast<pid_t>(::syscall(SYS_clone, SIGCHLD, nullptr, nullptr, nullptr, nullptr));
    if (kid == 0) {
      for (size_t off = 16 * kMiB; off < 24 * kMiB; off += 4096)
        if (!same(got, off, 4096)) _exit(7);
      _exit(0);
    }
    int st = 0;
    ::waitpid(kid, &st, 0);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) return 8;
    // The child had no pidfd (UFFD_EVENT_FORK names no pid) and prefetch is off, so nothing
    // would ever fail to install: the agent must still notice it has gone and let go of its uffd.
    // Each status change is awaited (a long poll), never slept for.
    auto js = agent_query(socket_, false);
    bool dropped = false;
    while (js.ok()) {
      auto j = nlohmann::json::parse(*js);
      size_t exited = 0, open = 0;
      for (const auto& e : j["sessions"]) {
        if (e["name"].get<std::string>().find("/fork") == std::string::npos) continue;
        (e["state"] == "exited" ? exited : open)++;
      }
      dropped = exited == 1 && open == 0;
      if (dropped) break;
      js = agent_wait_change(socket_, j["generation"].get<uint64_t>(), std::chrono::seconds(5));
    }
    if (!dropped) {
      std::fprintf(stderr, "fork session not dropped: %s\n", js.ok() ? js->c_str() : js.error().message().c_str());
      return 12;
    }
    // The parent's other pages are still right.
    for (size_t off = 0; off < len_; off += 4096) {
      if (off >= hole && off < hole + kMiB) continue;
      if (!same(got, off, 4096)) return 9;
    }
    for (size_t off = 0; off < kMiB; off += 4096)
      if (got[hole + off] != std::byte{0}) return 10;
    return 0;
  });
  EXPECT_EQ(rc, 0);
}

// Firecracker's side of the handshake, as Firecracker does it: guest memory mapped anonymous,
// a uffd registered over it, and one message: JSON array of GuestRegionUffdMapping + the uffd.
TEST_F(AgentTest, FirecrackerHandshakeRestoresRawImage) {
  size_t len = 48 * kMiB;
  std::vector<std::byte> image(len);
  testing::fill_mixed(image.data(), len, 43);
  std::string file = dir_.path() + "/guest.mem";
  std::ofstream(file, std::ios::binary).write(reinterpret_cast<const char*>(image.data()), static_cast<std::streamsize>(len));
  auto rep = capture_raw_file(dir_.path() + "/vm", file, {});
  ASSERT_TRUE(rep.ok()) << rep.error().message();
  agent::DaemonOptions o;
  o.firecracker_socket = dir_.path() + "/fc.sock";
  o.firecracker_snapshot = dir_.path() + "/vm";
  start_daemon(o);
  int rc = in_child([&] {
    // Two guest regions, like a VM with a hole below 4 GiB: offsets index the memory file.
    size_t a = 16 * kMiB, b = len - a;
    auto* r1 = static_cast<std::byte*>(::mmap(nullptr, a, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    auto* r2 = static_cast<std::byte*>(::mmap(nullptr, b, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    auto uffd = sys::Uffd::open(0);
    if (!uffd.ok() || !uffd->register_missing(reinterpret_cast<uintptr_t>(r1), a).ok() ||
        !uffd->register_missing(reinterpret_cast<uintptr_t>(r2), b).ok())
      return 3;
    nlohmann::json regions = nlohmann::json::array(
        {{{"base_host_virt_addr", reinterpret_cast<uintptr_t>(r1)}, {"size", a}, {"offset", 0}, {"page_size", 4096}, {"page_size_kib", 4}},
         {{"base_host_virt_addr", reinterpret_cast<uintptr_t>(r2)}, {"size", b}, {"offset", a}, {"page_size_kib", 4}}});
    std::string body = regions.dump();
    body.append(2048, ' ');  // larger than 1 KiB, as with many regions
    auto sock = agent::connect_unix(dir_.path() + "/fc.sock");
    if (!sock.ok()) return 4;
    iovec iov{body.data(), body.size()};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    int fd = uffd->fd();
    std::memcpy(CMSG_DATA(c), &fd, sizeof fd);
    if (::sendmsg(sock->get(), &msg, 0) < 0) return 5;
    // Like Firecracker, keep the socket open while the VM runs.
    for (size_t off = 0; off < a; off += 4096)
      if (std::memcmp(r1 + off, image.data() + off, 4096) != 0) return 6;
    for (size_t off = 0; off < b; off += 4096)
      if (std::memcmp(r2 + off, image.data() + a + off, 4096) != 0) return 7;
    return 0;
  });
  EXPECT_EQ(rc, 0);
}

TEST_F(AgentTest, HostilePeersAreRefusedAndOthersServed) {
  std::string loc = capture(8 * kMiB, 44);
  start_daemon();
  auto send_raw = [&](const std::vector<std::byte>& bytes) {
    auto s = agent::connect_unix(socket_);
    ASSERT_TRUE(s.ok());
    (void)!::send(s->get(), bytes.data(), bytes.size(), MSG_NOSIGNAL);
  };
  send_raw(std::vector<std::byte>(100, std::byte{0xee}));  // garbage
  std::vector<std::byte> oversized(8);
  uint32_t h = 8, p = 1u << 31;
  std::memcpy(oversized.data(), &h, 4);
  std::memcpy(oversized.data() + 4, &p, 4);
  send_raw(oversized);
  { auto s = agent::connect_unix(socket_); }  // connects and leaves mid-handshake

  std::string no_fd = ask_restore(loc, 0x7f0000000000, 8 * kMiB, false);
  EXPECT_NE(no_fd.find("userfaultfd"), std::string::npos) << no_fd;
  std::string unmapped = ask_restore(loc, 0x7f0000000000, 8 * kMiB, true);  // nothing is mapped there in this process
  EXPECT_NE(unmapped.find("not mapped"), std::string::npos) << unmapped;

  // After all that, a real client is served, correctly.
  EXPECT_EQ(restore_in_child(loc), 0);
}

// The descriptor a Restore carries is the peer's choice: one that is not a userfaultfd is refused
// before anything uses it. (A pipe pre-filled with a fake UFFD_EVENT_FORK naming another
// session's uffd was adopted as this one's: the engine took the victim's uffd for the "child"
// and filled the peer's bytes into that root process's memory.)
TEST_F(AgentTest, RestoreWithADescriptorThatIsNotAUffdIsRefused) {
  std::string loc = capture(8 * kMiB, 51);
  start_daemon();
  // Memory of this process, so that only the descriptor is wrong.
  void* mapped = ::mmap(nullptr, 8 * kMiB, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(mapped, MAP_FAILED);
  const std::vector<fault::MappedRange> ranges = {{reinterpret_cast<uintptr_t>(mapped), 8 * kMiB, 0, 0}};
  int p[2];
  ASSERT_EQ(::pipe2(p, O_CLOEXEC | O_NONBLOCK), 0);
  sys::UniqueFd rd(p[0]), wr(p[1]);
  uffd_msg fake{};  // what the attack wrote: a fork whose "child uffd" is a descriptor number of the agent's
  fake.event = UFFD_EVENT_FORK;
  fake.arg.fork.ufd = 7;
  ASSERT_EQ(::write(wr.get(), &fake, sizeof fake), static_cast<ssize_t>(sizeof fake));
  std::string got = ask_restore_sending(loc, ranges, rd.get());
  EXPECT_NE(got.find("not a userfaultfd (it is pipe:["), std::string::npos) << got;
  sys::UniqueFd ev(::eventfd(0, EFD_CLOEXEC));  // another anonymous inode, not a uffd either
  got = ask_restore_sending(loc, ranges, ev.get());
  EXPECT_NE(got.find("not a userfaultfd (it is anon_inode:[eventfd]"), std::string::npos) << got;
  // Nothing was adopted: no session, and the fake event is still unread in the pipe.
  auto js = agent_query(socket_, false);
  ASSERT_TRUE(js.ok()) << js.error().message();
  EXPECT_TRUE(nlohmann::json::parse(*js)["sessions"].empty()) << *js;
  uffd_msg back{};
  EXPECT_EQ(::read(rd.get(), &back, sizeof back), static_cast<ssize_t>(sizeof back));
  ::munmap(mapped, 8 * kMiB);
  EXPECT_EQ(restore_in_child(loc), 0);  // and a real client is served, correctly
}

// Sends `bytes` in one sendmsg with `fds` riding along.
bool send_with_fds(int sock, std::span<const std::byte> bytes, const std::vector<int>& fds) {
  iovec iov{const_cast<std::byte*>(bytes.data()), bytes.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  std::vector<char> control(CMSG_SPACE(sizeof(int) * fds.size()));
  msg.msg_control = control.data();
  msg.msg_controllen = control.size();
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
  std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  return ::sendmsg(sock, &msg, MSG_NOSIGNAL) == static_cast<ssize_t>(bytes.size());
}

// Descriptors are taken as a request carries them, one with its first bytes; a peer that sends
// more is cut off, and what it sent is closed with its connection. (They were kept while a frame
// was partly buffered, and more than four at once cut short unnoticed: one connection sent a
// prefix announcing a 64 KiB header, then 5100 one-byte sends of four descriptors each, and the
// agent reached its descriptor limit.)
TEST_F(AgentTest, DescriptorsBeyondWhatARequestCarriesCloseTheConnection) {
  std::string loc = capture(8 * kMiB, 52);
  start_daemon();
  const std::string fds_dir = fmt::format("/proc/{}/fd", daemon_pid_);
  int p[2];
  ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
  sys::UniqueFd rd(p[0]), wr(p[1]);
  capnp::MallocMessageBuilder b;
  auto rq = b.initRoot<proto::agent::Request>();
  rq.setId(1);
  rq.setStatus();
  const std::vector<std::byte> status = net::encode_frame(b, 0);
  std::vector<std::byte> prefix(8);  // a frame announcing a 60000-byte header, never sent
  const uint32_t header = 60000, payload = 0;
  std::memcpy(prefix.data(), &header, 4);
  std::memcpy(prefix.data() + 4, &payload, 4);
  const std::byte one{0};
  struct Case {
    const char* what;
    std::function<bool(int)> send;
  };
  const std::vector<Case> cases = {
      {"inside a partial frame", [&](int s) {
         if (::send(s, prefix.data(), prefix.size(), MSG_NOSIGNAL) != 8) return false;
         // The agent has read the prefix when its status answer (on another connection) comes.
         if (!agent_query(socket_, false).ok()) return false;
         for (int i = 0; i < 100; ++i)
           if (!send_with_fds(s, std::span(&one, 1), {rd.get(), rd.get(), rd.get(), rd.get()})) return i > 0;
         return true;
       }},
      {"two with one request", [&](int s) { return send_with_fds(s, status, {rd.get(), wr.get()}); }},
      {"five at once (MSG_CTRUNC)", [&](int s) { return send_with_fds(s, status, {rd.get(), rd.get(), rd.get(), rd.get(), rd.get()}); }},
  };
  for (const auto& c : cases) {
    auto s = agent::connect_unix(socket_);
    ASSERT_TRUE(s.ok());
    ASSERT_TRUE(c.send(s->get())) << c.what;
    net::FrameBuffer buf;
    std::deque<sys::UniqueFd> fds;
    Status got = ok_status();
    while (got.ok()) got = agent::recv_some(s->get(), buf, fds, 10000);  // a reply, if any, then the close
    EXPECT_TRUE(got.error().code() == Errc::kPeerGone || got.error().sys_errno() == ECONNRESET)
        << c.what << ": not closed: " << got.error().message();
  }
  // Closed with the connections: the agent holds none of what was sent.
  struct stat pipe_st {};
  ASSERT_EQ(::fstat(rd.get(), &pipe_st), 0);
  const std::string pipe_name = fmt::format("pipe:[{}]", pipe_st.st_ino);
  for (const auto& e : std::filesystem::directory_iterator(fds_dir)) {
    std::error_code ec;
    EXPECT_NE(std::filesystem::read_symlink(e.path(), ec).string(), pipe_name) << "the agent still holds " << e.path();
  }
  EXPECT_EQ(restore_in_child(loc), 0);  // and a real client is served, correctly
}

// A Restore whose range table is wrong is refused with the reason before anything is served by
// it, and the agent goes on serving others. (A region offset that wrapped when its length was
// added passed the engine's region check, and the agent, root, accepted the restore: a fault in
// that range then indexed chunk state far past the region's end. Empty, unaligned, overlapping
// and address-wrapping ranges were accepted too.)
TEST_F(AgentTest, HostileRangeTablesAreRefused) {
  std::string loc = capture(8 * kMiB, 45);
  start_daemon();
  // The client's own memory, and a page after it that is nobody's.
  void* mapped = ::mmap(nullptr, 8 * kMiB + 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(mapped, MAP_FAILED);
  const uint64_t at = reinterpret_cast<uintptr_t>(mapped), top = ~uint64_t{0} - 4095;
  ASSERT_EQ(::munmap(reinterpret_cast<void*>(at + 8 * kMiB), 4096), 0);
  const std::vector<std::pair<std::vector<fault::MappedRange>, std::string>> cases = {
      {{{at, 8192, 0, top}}, "region 0 offset 0xfffffffffffff000 + length wraps"},
      {{{top, 8192, 0, 0}}, "wraps past the end of the address space"},
      {{{at, 0, 0, 0}}, "is empty"},
      {{{at + 1, 4096, 0, 0}}, "not page-aligned"},
      {{{at, 4096, 0, 100}}, "not page-aligned"},
      {{{at, 8192, 0, 0}, {at + 4096, 4096, 0, 4096}}, "overlap"},
      {{}, "an empty region table"},
      {{{at, 4096, 7, 0}}, "lies outside snapshot region 7"},               // no such region
      {{{at, 8 * kMiB, 0, 4096}}, "lies outside snapshot region 0"},        // past the region's end
      {{{at + 8 * kMiB, 4096, 0, 0}}, "is not mapped in process"},          // not the client's memory
  };
  for (const auto& [ranges, reason] : cases) {
    std::string got = ask_restore(loc, ranges);
    EXPECT_NE(got.find(reason), std::string::npos) << "expected '" << reason << "', got: " << got;
  }
  ::munmap(mapped, 8 * kMiB);
  EXPECT_EQ(restore_in_child(loc), 0);  // and a real client is served, correctly
}

// The engine's own check of a range against its region (what the agent cannot check before the
// snapshot is open) holds however the numbers wrap.
TEST_F(AgentTest, EngineRefusesARegionOffsetThatWraps) {
  std::string loc = capture(8 * kMiB, 46);
  auto opened = agent::open_source(agent::OpenSpec{loc, "", std::nullopt, {}, {}});
  ASSERT_TRUE(opened.ok()) << opened.error().message();
  fault::FaultEngine engine(kf_, {});
  ASSERT_TRUE(engine.start().ok());
  auto uffd = sys::Uffd::open(0);
  ASSERT_TRUE(uffd.ok()) << uffd.error().message();
  fault::SessionSpec spec;
  spec.name = "wrapping";
  spec.uffd = std::move(*uffd);
  spec.source = opened->source;
  spec.ranges = {fault::MappedRange{0x10000, 8192, 0, ~uint64_t{0} - 4095}};  // offset + length = 4096
  auto id = engine.add_session(std::move(spec));
  ASSERT_FALSE(id.ok()) << "a range whose region offset wraps was taken as inside its region";
  EXPECT_NE(id.error().message().find("lies outside snapshot region 0"), std::string::npos) << id.error().message();
  engine.stop();
}

// A peer that asks and never reads its replies fills its socket: the agent stops reading it
// (its own requests are its backpressure) and serves everyone else meanwhile. Once it reads, it
// gets every reply it asked for, in order. (The agent used to wait on the full socket, and
// with it every other client: the restore below timed out.)
TEST_F(AgentTest, PeerThatDoesNotReadHoldsUpNobody) {
  std::string loc = capture(8 * kMiB, 62);
  start_daemon();
  auto hog = agent::connect_unix(socket_);
  ASSERT_TRUE(hog.ok());
  ASSERT_EQ(::fcntl(hog->get(), F_SETFL, O_NONBLOCK), 0);
  // Status requests until the socket takes no more: the agent has stopped reading this peer.
  capnp::MallocMessageBuilder b;
  auto rq = b.initRoot<proto::agent::Request>();
  rq.setStatus();
  uint64_t sent = 0;
  for (bool full = false; !full;) {
    rq.setId(sent + 1);
    std::vector<std::byte> frame = net::encode_frame(b, 0);
    ssize_t n = ::send(hog->get(), frame.data(), frame.size(), MSG_NOSIGNAL);
    if (n < 0 && errno == EAGAIN) {
      // Room may come as the agent reads on: full only once it has stayed full a while.
      pollfd p{hog->get(), POLLOUT, 0};
      full = ::poll(&p, 1, 500) == 0;
      continue;
    }
    ASSERT_EQ(n, static_cast<ssize_t>(frame.size())) << "a partial frame (socket buffer smaller than a frame?)";
    ++sent;
    ASSERT_LT(sent, 1000000u) << "the agent never stopped reading a peer that does not read";
  }
  EXPECT_EQ(restore_in_child(loc), 0);

  ASSERT_EQ(::fcntl(hog->get(), F_SETFL, 0), 0);
  net::FrameBuffer buf;
  std::deque<sys::UniqueFd> fds;
  for (uint64_t want = 1; want <= sent;) {
    auto f = buf.next();
    ASSERT_TRUE(f.ok());
    if (!f->has_value()) {
      ASSERT_TRUE(agent::recv_some(hog->get(), buf, fds, 10000).ok()) << "reply " << want << " of " << sent << " missing";
      continue;
    }
    auto hd = net::Header::parse((*f)->header);
    ASSERT_TRUE(hd.ok());
    auto reply = (*hd)->root<proto::agent::Reply>();
    ASSERT_EQ(reply.getId(), want);
    ASSERT_TRUE(reply.isJson());
    buf.consume();
    ++want;
  }
}

// The same peer's requests read before its replies backed up are answered, however the last
// waiting reply goes out: here a notice (its status long poll answered when another client
// asks for something) sends it, and no socket event ever comes for those requests. (They were
// left unanswered.)
TEST_F(AgentTest, RequestsReadBeforeRepliesBackedUpAreAnswered) {
  start_daemon();
  auto js = agent_query(socket_, false);
  ASSERT_TRUE(js.ok());
  const uint64_t generation = nlohmann::json::parse(*js)["generation"].get<uint64_t>();
  auto peer = agent::connect_unix(socket_);
  ASSERT_TRUE(peer.ok());
  // A long poll, then more status requests than its socket holds replies for (about 240), in
  // one write the agent reads whole (its requests then all wait in its buffer, none in the
  // socket). One write of a Unix stream socket arrives at once only up to about 36 KiB (one
  // skb): with more, the agent could read the first part, answer until its socket is full and
  // read no more, and the wait below would never end (it hung once, with 1000).
  std::vector<std::byte> all;
  const uint64_t sent = 500;
  for (uint64_t id = 1; id <= sent; ++id) {
    capnp::MallocMessageBuilder b;
    auto rq = b.initRoot<proto::agent::Request>();
    rq.setId(id);
    if (id == 1) rq.setWaitChange(generation);
    else rq.setStatus();
    std::vector<std::byte> frame = net::encode_frame(b, 0);
    all.insert(all.end(), frame.begin(), frame.end());
  }
  ASSERT_LT(all.size(), 32u * 1024) << "more than arrives at once";
  ASSERT_EQ(::send(peer->get(), all.data(), all.size(), MSG_NOSIGNAL), static_cast<ssize_t>(all.size()));
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  for (int unread = 1; unread > 0;) {  // until the agent has read it all
    ASSERT_EQ(::ioctl(peer->get(), SIOCOUTQ, &unread), 0);
    ASSERT_LT(std::chrono::steady_clock::now(), deadline) << unread << " bytes of requests never read";
    std::this_thread::yield();
  }
  // It answers them until the socket is full, all in the event that read them: answered on
  // another connection, this comes after it.
  ASSERT_TRUE(agent_query(socket_, false).ok());
  // Room for a reply or two, not enough for the socket to say it is writable.
  std::vector<std::byte> some(4096);
  const ssize_t got = ::recv(peer->get(), some.data(), some.size(), MSG_WAITALL);
  ASSERT_GT(got, 0);
  net::FrameBuffer buf;
  auto space = buf.writable();
  ASSERT_GE(space.size(), static_cast<size_t>(got));
  std::memcpy(space.data(), some.data(), static_cast<size_t>(got));
  buf.commit(static_cast<size_t>(got));
  // Another client asks for a VM socket: the status changes, the long poll is answered.
  auto other = agent::connect_unix(socket_);
  ASSERT_TRUE(other.ok());
  capnp::MallocMessageBuilder b;
  auto fc = b.initRoot<proto::agent::Request>().initServeFirecracker();
  fc.setSocketPath(dir_.path() + "/vm.sock");
  fc.setSnapshot(dir_.path() + "/no-such-snapshot");
  ASSERT_TRUE(agent::send_frame_fd(other->get(), b, {}, -1).ok());

  std::set<uint64_t> answered;
  std::deque<sys::UniqueFd> fds;
  while (answered.size() < sent) {
    auto f = buf.next();
    ASSERT_TRUE(f.ok());
    if (!f->has_value()) {
      ASSERT_TRUE(agent::recv_some(peer->get(), buf, fds, 10000).ok())
          << sent - answered.size() << " of " << sent << " requests unanswered";
      continue;
    }
    auto hd = net::Header::parse((*f)->header);
    ASSERT_TRUE(hd.ok());
    EXPECT_TRUE(answered.insert((*hd)->root<proto::agent::Reply>().getId()).second);
    buf.consume();
  }
}

// Out of file descriptors, the agent closes the connections it cannot take: each learns at
// once, rather than wait unanswered while the agent spins on its listener. With descriptors
// free again it serves as before.
TEST_F(AgentTest, OutOfDescriptorsConnectionsAreClosedNotLeftWaiting) {
#if defined(__SANITIZE_ADDRESS__)
  // Built with ASan, UBSan too: its vptr check reads memory through a pipe, and out of
  // descriptors it reports every virtual call in the agent as on an invalid object.
  GTEST_SKIP() << "UBSan cannot check memory in a process out of file descriptors";
#endif
  std::string loc = capture(8 * kMiB, 66);
  start_daemon();
  const std::string fds_dir = fmt::format("/proc/{}/fd", daemon_pid_);
  const auto in_use = static_cast<rlim_t>(std::distance(std::filesystem::directory_iterator(fds_dir), {}));
  rlimit was{};
  ASSERT_EQ(::prlimit(daemon_pid_, RLIMIT_NOFILE, nullptr, &was), 0);
  rlimit tight = was;
  // Room for a few connections, each a socket and its peer's pidfd (taken at accept), with a
  // margin for what the agent opens meanwhile: then the descriptors run out.
  tight.rlim_cur = in_use + 7;
  ASSERT_EQ(::prlimit(daemon_pid_, RLIMIT_NOFILE, &tight, nullptr), 0);

  // Connections, each asking for status: one the agent took is answered, one it had no
  // descriptor for is closed.
  capnp::MallocMessageBuilder b;
  auto rq = b.initRoot<proto::agent::Request>();
  rq.setId(1);
  rq.setStatus();
  std::vector<sys::UniqueFd> held;
  bool closed = false;
  while (!closed) {
    ASSERT_LT(held.size(), 16u) << "the agent took more connections than it has descriptors for";
    auto s = agent::connect_unix(socket_);
    ASSERT_TRUE(s.ok()) << s.error().message();
    // Closed already (the agent is quick to let go of what it cannot take): the send fails.
    Status got = agent::send_frame_fd(s->get(), b, {}, -1);
    net::FrameBuffer buf;
    std::deque<sys::UniqueFd> fds;
    if (got.ok()) got = agent::recv_some(s->get(), buf, fds, 20000);
    ASSERT_TRUE(got.ok() || got.error().code() != Errc::kTimeout) << "a connection the agent could not take was left waiting";
    closed = !got.ok();
    held.push_back(std::move(*s));
  }
  EXPECT_GT(held.size(), 1u) << "the agent took no connection at all";

  held.clear();
  ASSERT_EQ(::prlimit(daemon_pid_, RLIMIT_NOFILE, &was, nullptr), 0);
  EXPECT_EQ(restore_in_child(loc), 0);
}

// fork() while a restore through the agent is under way: the child's copy of the memory would
// be the agent's alone to fill (its uffd, from UFFD_EVENT_FORK, is held by the agent only), and
// the kernel zero-fills every missing page of it once the agent dies. So fork() completes the
// restore first: with the agent killed right after the fork, the child still reads every byte.
TEST_F(AgentTest, ForkCompletesTheRestoreFirst) {
  std::string loc = capture(32 * kMiB, 67);
  start_daemon();
  int rc = in_child([&] {
    ::alarm(120);  // a hang ends as SIGALRM (128+14), not as the suite's timeout
    AgentRestoreOptions o;
    o.prefetch = false;  // nothing fetched but what is touched: most of it is missing at the fork
    auto r = AgentRestore::start(socket_, loc, o);
    if (!r.ok()) return 3;
    const auto* got = static_cast<const std::byte*>((*r)->regions()[0].address);
    if (!same(got, 0, 4096)) return 4;
    int go[2];
    if (::pipe(go) != 0) return 5;
    pid_t kid = ::fork();
    if (kid == 0) {
      ::alarm(120);
      ::close(go[1]);  // a parent gone early ends the read
      char c;
      if (::read(go[0], &c, 1) != 1) _exit(6);  // the agent is dead by now
      for (size_t off = 0; off < len_; off += 4096)
        if (!same(got, off, 4096)) _exit(7);
      _exit(0);
    }
    if (kid < 0) return 8;
    if (!(*r)->wait_complete(std::chrono::milliseconds(0)).ok()) return 9;  // complete at the fork
    ::kill(daemon_pid_, SIGKILL);
    if (::write(go[1], "g", 1) != 1) return 10;
    int st = 0;
    ::waitpid(kid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  });
  EXPECT_EQ(rc, 0) << (rc == 7 ? "the child read a page that is not the snapshot's" : "");
}

// The agent dies mid-restore: the process must not hang and must not read zeros; pages not
// yet restored raise SIGBUS (the client's watchdog poisons them).
TEST_F(AgentTest, AgentDeathFailsVisibly) {
  if (!kf_.has_uffd_poison()) GTEST_SKIP() << "kernel lacks UFFDIO_POISON (Linux 6.6)";
  std::string loc = capture(32 * kMiB, 45);
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  pid_t agent_pid = ::fork();
  ASSERT_GE(agent_pid, 0);
  if (agent_pid == 0) {
    agent::DaemonOptions o;
    o.socket_path = socket_;
    auto d = agent::Daemon::start(o, kf_);
    if (!d.ok()) _exit(3);
    char c = 1;
    (void)!::write(ready[1], &c, 1);
    (void)(*d)->run();
    _exit(0);
  }
  char c;
  ASSERT_EQ(::read(ready[0], &c, 1), 1);
  int go[2], touched[2];
  ASSERT_EQ(::pipe(go), 0);
  ASSERT_EQ(::pipe(touched), 0);
  pid_t client = ::fork();
  ASSERT_GE(client, 0);
  if (client == 0) {
    AgentRestoreOptions o;
    o.prefetch = false;
    auto r = AgentRestore::start(socket_, loc, o);
    if (!r.ok()) _exit(3);
    volatile const std::byte* got = static_cast<const std::byte*>((*r)->regions()[0].address);
    if (got[0] != expected_[0]) _exit(4);
    (void)!::write(touched[1], &c, 1);
    (void)!::read(go[0], &c, 1);  // the agent is dead now
    // Wait for the watchdog to have seen it: wait_complete returns with the failure.
    if ((*r)->wait_complete(std::chrono::seconds(30)).ok()) _exit(5);
    ::signal(SIGBUS, SIG_DFL);
    (void)got[20 * kMiB];  // never fetched: SIGBUS, not zeros, not a hang
    _exit(6);
  }
  ASSERT_EQ(::read(touched[0], &c, 1), 1);
  ::kill(agent_pid, SIGKILL);
  ::waitpid(agent_pid, nullptr, 0);
  ASSERT_EQ(::write(go[1], &c, 1), 1);
  int status = 0;
  ASSERT_EQ(::waitpid(client, &status, 0), client);
  ASSERT_TRUE(WIFSIGNALED(status)) << "client exited with " << WEXITSTATUS(status);
  EXPECT_EQ(WTERMSIG(status), SIGBUS);
}

TEST_F(AgentTest, CliPrintsTablesAndJson) {
  std::string loc = capture(8 * kMiB, 46);
  start_daemon();
  ASSERT_EQ(in_child([&] {
              auto r = AgentRestore::start(socket_, loc);
              return r.ok() && (*r)->wait_complete(std::chrono::seconds(30)).ok() ? 0 : 3;
            }),
            0);
  const char* bin = std::getenv("LAZYMEM_AGENT");
  ASSERT_NE(bin, nullptr);
  auto run = [&](const std::string& args) {
    std::string out;
    FILE* p = ::popen((std::string(bin) + " " + args + " --socket " + socket_ + " 2>&1").c_str(), "r");
    char buf[4096];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
    EXPECT_EQ(::pclose(p), 0) << out;
    return out;
  };
  std::string table = run("stats");
  EXPECT_NE(table.find("pg:fault"), std::string::npos) << table;
  EXPECT_NE(table.find("heap"), std::string::npos) << table;
  auto j = nlohmann::json::parse(run("stats --json"));
  ASSERT_EQ(j["sessions"].size(), 1u);
  auto total = j["sessions"][0]["stats"]["total"];
  EXPECT_EQ(total["pages_fault"].get<uint64_t>() + total["pages_prefetch"].get<uint64_t>() +
                total["pages_zero"].get<uint64_t>(),
            len_ / 4096);
  EXPECT_NE(run("status").find("complete"), std::string::npos);
  EXPECT_NE(run("regions").find("100.0%"), std::string::npos);
}

// A raw memory image `len` bytes long, captured with `lazymem-agent snapshot --raw` (at `where`).
#define RAW_IMAGE(image, len, seed, loc) RAW_IMAGE_AT(image, len, seed, loc, dir_.path() + "/vm")
#define RAW_IMAGE_AT(image, len, seed, loc, where)                                                    \
  std::vector<std::byte> image(len);                                                                  \
  testing::fill_mixed(image.data(), len, seed);                                                       \
  std::string loc = where;                                                                            \
  {                                                                                                   \
    std::ofstream(dir_.path() + "/guest.mem", std::ios::binary)                                       \
        .write(reinterpret_cast<const char*>(image.data()), static_cast<std::streamsize>(len));       \
    auto [out, rc] = run_cli(agent_bin() + " snapshot --raw " + dir_.path() + "/guest.mem " + loc + " --json"); \
    ASSERT_EQ(rc, 0) << out;                                                                          \
    ASSERT_EQ(nlohmann::json::parse(out)["total_bytes"].get<uint64_t>(), len) << out;                 \
  }

// Peers on the Firecracker socket that stay silent, leave halfway, send no fd or bad JSON: each
// refused with a reason, none holds up a VM that does the handshake properly (in two writes).
TEST_F(AgentTest, FirecrackerHostilePeersDoNotHoldUpAVm) {
  ASSERT_FALSE(agent_bin().empty());
  RAW_IMAGE(image, 8 * kMiB, 47, loc);
  agent::DaemonOptions o;
  o.firecracker_socket = dir_.path() + "/fc.sock";
  o.firecracker_snapshot = loc;
  start_daemon(o);
  auto silent = agent::connect_unix(o.firecracker_socket);  // says nothing, stays connected
  ASSERT_TRUE(silent.ok());
  {
    auto half = agent::connect_unix(o.firecracker_socket);  // half a message, then gone
    ASSERT_TRUE(half.ok());
    ASSERT_GT(::send(half->get(), "[{\"size\": 4096, ", 16, 0), 0);
  }
  {
    auto no_fd = agent::connect_unix(o.firecracker_socket);  // a whole message, no uffd
    ASSERT_TRUE(no_fd.ok());
    std::string m = R"([{"base_host_virt_addr": 4096, "size": 4096, "offset": 0, "page_size": 4096}])";
    ASSERT_GT(::send(no_fd->get(), m.data(), m.size(), 0), 0);
    auto garbage = agent::connect_unix(o.firecracker_socket);
    ASSERT_TRUE(garbage.ok());
    ASSERT_GT(::send(garbage->get(), "{not json]", 10, 0), 0);
    // A number past a double: the JSON parser threw an exception the agent did not catch, and
    // the agent ended (found by agent_fuzz).
    auto overflow = agent::connect_unix(o.firecracker_socket);
    ASSERT_TRUE(overflow.ok());
    std::string huge = R"([{"base_host_virt_addr": 1e400, "size": 4096, "offset": 0}])";
    ASSERT_GT(::send(overflow->get(), huge.data(), huge.size(), 0), 0);
  }
  auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(in_child([&] { return firecracker_vm(o.firecracker_socket, image, true); }), 0);
  // Well inside the 5 s handshake deadline the silent peer still has.
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(4));
}

// As many connections to `socket` as the agent keeps pending handshakes (kMaxPendingHandshakes),
// saying nothing; fewer if a connect failed.
std::vector<sys::UniqueFd> silent_peers(const std::string& socket) {
  std::vector<sys::UniqueFd> out;
  for (int i = 0; i < 64; ++i) {
    auto s = agent::connect_unix(socket);
    if (!s.ok()) break;
    out.push_back(std::move(*s));
  }
  return out;
}

// Firecracker sends its message as it connects; a peer that says nothing waits out its deadline.
// With every pending handshake taken by silent peers, the next VM was refused at accept, its
// uffd closed unread, and its vCPUs hung (128+SIGALRM below). Now the oldest silent peer is
// refused to make room: it sent no uffd, so its connection is closed, as at its deadline.
TEST_F(AgentTest, SilentPeersHoldingEveryHandshakeDoNotLockOutAVm) {
  RAW_IMAGE(image, 1 * kMiB, 59, loc);
  agent::DaemonOptions o;
  o.firecracker_socket = dir_.path() + "/fc.sock";
  o.firecracker_snapshot = loc;
  start_daemon(o);
  std::vector<sys::UniqueFd> silent = silent_peers(o.firecracker_socket);
  ASSERT_EQ(silent.size(), 64u);
  // Accepted in the order they connected: the VM's connection after all 64.
  auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(in_child([&] {
              ::alarm(30);
              return firecracker_vm(o.firecracker_socket, image, false);
            }),
            0);
  // Well inside the 5 s deadline that would have freed the places anyway.
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(4));
  char c;
  EXPECT_EQ(::recv(silent.front().get(), &c, 1, MSG_DONTWAIT), 0) << "the oldest silent peer was not the one refused";
  EXPECT_EQ(::recv(silent.back().get(), &c, 1, MSG_DONTWAIT), -1);
}

// A burst of connections is accepted before any is read: a VM whose message and uffd wait in
// its socket, followed by 64 silent peers, was the oldest pending handshake when the table
// filled, and was refused unread: its uffd closed, its vCPUs waiting for good (128+SIGALRM).
// Found by review. What is queued is now read before anyone is refused.
TEST_F(AgentTest, AVmWhoseMessageWaitsUnreadIsNotTheOneRefused) {
  RAW_IMAGE(image, 1 * kMiB, 61, loc);
  agent::DaemonOptions o;
  o.firecracker_socket = dir_.path() + "/fc.sock";
  o.firecracker_snapshot = loc;
  start_daemon(o);
  ASSERT_EQ(::kill(daemon_pid_, SIGSTOP), 0);  // nothing accepted until all have connected
  int sent[2];
  ASSERT_EQ(::pipe2(sent, O_CLOEXEC), 0);
  const pid_t vm = ::fork();
  ASSERT_GE(vm, 0);
  if (vm == 0) {
    ::alarm(30);
    _exit(firecracker_vm(o.firecracker_socket, image, false, sent[1]));
  }
  ::close(sent[1]);
  char c;
  ASSERT_EQ(::read(sent[0], &c, 1), 1);
  ::close(sent[0]);
  std::vector<sys::UniqueFd> silent = silent_peers(o.firecracker_socket);
  ASSERT_EQ(silent.size(), 64u);
  ASSERT_EQ(::kill(daemon_pid_, SIGCONT), 0);
  int status = 0;
  ASSERT_EQ(::waitpid(vm, &status, 0), vm);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
}

// Firecracker's side of a handshake the agent refuses: guest memory registered on a uffd that
// goes with `body` (and a second descriptor with `extra_fd`), the connection then shut for
// writing if `hang_up`; then the guest touches its memory. Returns 0 if that ever returned.
int refused_vm(const std::string& socket_path, const std::string& body_fmt, bool hang_up, bool extra_fd) {
  ::alarm(30);                // a hang ends as SIGALRM, not as the suite's timeout
  ::signal(SIGBUS, SIG_DFL);  // sanitizers install their own handler; we want the plain death
  const size_t len = 1 * kMiB;
  auto* mem = static_cast<volatile char*>(::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  auto uffd = sys::Uffd::open(UFFD_FEATURE_EVENT_REMOVE);
  if (!uffd.ok() || !uffd->register_missing(reinterpret_cast<uintptr_t>(mem), len).ok()) return 3;
  const std::string body = fmt::format(fmt::runtime(body_fmt), reinterpret_cast<uintptr_t>(mem), len);
  auto sock = agent::connect_unix(socket_path);
  if (!sock.ok()) return 4;
  std::vector<int> fds = {uffd->fd()};
  if (extra_fd) fds.push_back(STDIN_FILENO);
  if (!send_with_fds(sock->get(), std::as_bytes(std::span(body)), fds)) return 5;
  if (hang_up) ::shutdown(sock->get(), SHUT_WR);
  (void)mem[len / 2];  // blocks on the uffd until the agent installs the page or fails the VM
  return 0;
}

// A refused handshake fails the VM however it was refused: its memory poisoned where the message
// said where it is, else the VM killed (through the pidfd taken at accept). Firecracker does not
// notice its handler closing the socket: these refusals closed the uffd and left the vCPUs
// blocked for good (the children below hung until their alarm, 128+SIGALRM).
TEST_F(AgentTest, EveryRefusedHandshakeFailsTheVm) {
  RAW_IMAGE(image, 1 * kMiB, 53, loc);
  agent::DaemonOptions o;
  o.firecracker_socket = dir_.path() + "/fc.sock";
  o.firecracker_snapshot = loc;
  start_daemon(o);
  const std::string ok_body = R"([{{"base_host_virt_addr": {}, "size": {}, "offset": 0, "page_size": 4096}}])";
  const std::string huge_pages = R"([{{"base_host_virt_addr": {}, "size": {}, "offset": 0, "page_size": 2097152}}])";
  // 2 MiB pages over a 1 MiB range: no ranges the agent would take, so killed.
  EXPECT_EQ(in_child([&] { return refused_vm(o.firecracker_socket, huge_pages, false, false); }), 128 + SIGKILL);
  // Half a message, then the connection shut: killed.
  EXPECT_EQ(in_child([&] { return refused_vm(o.firecracker_socket, R"([{{"base_host_virt_addr": {}, "size": {})",
                                             true, false); }),
            128 + SIGKILL);
  // A whole message with a descriptor too many: its ranges are known, so poisoned where the
  // kernel can (SIGBUS at the access), else killed.
  EXPECT_EQ(in_child([&] { return refused_vm(o.firecracker_socket, ok_body, false, true); }),
            kf_.has_uffd_poison() ? 128 + SIGBUS : 128 + SIGKILL);
  // And a VM that does it right is served, every byte.
  EXPECT_EQ(in_child([&] { return firecracker_vm(o.firecracker_socket, image, false); }), 0);
}

// `lazymem-agent restore` makes a per-VM handshake socket on a running agent, prints
// "listening on PATH", and follows the restore to "restore complete".
TEST_F(AgentTest, RestoreCliServesAFirecrackerVm) {
  ASSERT_FALSE(agent_bin().empty());
  RAW_IMAGE(image, 16 * kMiB, 48, loc);
  start_daemon();
  std::string fc = dir_.path() + "/vm1.sock";
  FILE* cli = ::popen((agent_bin() + " restore --socket " + socket_ + " --firecracker-socket " + fc + " --snapshot " +
                       loc + " 2>&1").c_str(), "r");
  ASSERT_NE(cli, nullptr);
  char line[4096];
  ASSERT_NE(std::fgets(line, sizeof line, cli), nullptr);
  ASSERT_EQ(std::string(line), "listening on " + fc + "\n");
  struct stat st {};
  ASSERT_EQ(::stat(fc.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_EQ(in_child([&] { return firecracker_vm(fc, image, false); }), 0);
  std::string rest;
  while (std::fgets(line, sizeof line, cli) != nullptr) rest += line;
  EXPECT_EQ(::pclose(cli), 0) << rest;
  // The VM (which checked every byte) may exit before the agent has installed the rest of the
  // chunk its last page came in: the CLI reports that, and does not wait for more.
  EXPECT_TRUE(rest.find("restore complete") != std::string::npos ||
              rest.find("VM exited before its restore completed") != std::string::npos)
      << rest;
  EXPECT_NE(::stat(fc.c_str(), &st), 0) << "a per-VM socket is gone after its one handshake";
  // A snapshot that is not a raw image, or a path that is not ours to replace: refused, said why.
  auto [out, rc] = run_cli(agent_bin() + " restore --socket " + socket_ + " --firecracker-socket " + dir_.path() +
                           "/vm2.sock --snapshot " + capture(4 * kMiB, 49));
  EXPECT_NE(rc, 0);
  EXPECT_NE(out.find("not a raw memory image"), std::string::npos) << out;
  std::ofstream(dir_.path() + "/file") << "x";
  std::tie(out, rc) = run_cli(agent_bin() + " restore --socket " + socket_ + " --firecracker-socket " + dir_.path() +
                              "/file --snapshot " + loc);
  EXPECT_NE(rc, 0);
  EXPECT_NE(out.find("not a socket"), std::string::npos) << out;
}

// A VM whose guest memory is `image`, in two regions (6 MiB, then the rest), mapped with huge
// pages (MAP_HUGETLB, as Firecracker does for a hugetlbfs-backed VM) or with 4 KiB pages on
// 2 MiB boundaries; its message says `page_size`, and the second region `short_by` bytes shorter
// than it is. Returns 0 when every byte equals `image`.
int vm_of_page_size(const std::string& socket_path, const std::vector<std::byte>& image, bool huge, uint64_t page_size,
                    size_t short_by = 0) {
  ::alarm(30);                // a hang ends as SIGALRM, not as the suite's timeout
  ::signal(SIGBUS, SIG_DFL);  // sanitizers install their own handler; we want the plain death
  const size_t a = 6 * kMiB, b = image.size() - a;
  auto map = [&](size_t len) -> std::byte* {
    if (huge) {
      void* p = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
      return p == MAP_FAILED ? nullptr : static_cast<std::byte*>(p);
    }
    void* p = ::mmap(nullptr, len + testing::kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return nullptr;
    return reinterpret_cast<std::byte*>((reinterpret_cast<uintptr_t>(p) + testing::kHugePage - 1) & ~(testing::kHugePage - 1));
  };
  std::byte* r1 = map(a);
  std::byte* r2 = map(b);
  if (r1 == nullptr || r2 == nullptr) return 2;
  auto uffd = sys::Uffd::open(UFFD_FEATURE_EVENT_REMOVE);
  if (!uffd.ok() || !uffd->register_missing(reinterpret_cast<uintptr_t>(r1), a).ok() ||
      !uffd->register_missing(reinterpret_cast<uintptr_t>(r2), b).ok())
    return 3;
  nlohmann::json regions = nlohmann::json::array(
      {{{"base_host_virt_addr", reinterpret_cast<uintptr_t>(r1)}, {"size", a}, {"offset", 0}, {"page_size", page_size}},
       {{"base_host_virt_addr", reinterpret_cast<uintptr_t>(r2)}, {"size", b - short_by}, {"offset", a},
        {"page_size_kib", page_size / 1024}}});
  const std::string body = regions.dump();
  auto sock = agent::connect_unix(socket_path);
  if (!sock.ok()) return 4;
  if (!agent::send_with_fd(sock->get(), std::as_bytes(std::span(body)), uffd->fd()).ok()) return 5;
  // Out of order, as a guest touches its memory; then all of it.
  for (size_t page : {4, 0, 2}) (void)*reinterpret_cast<volatile char*>(r2 + page * testing::kHugePage + 4096 * page);
  if (std::memcmp(r1, image.data(), a) != 0) return 6;
  if (std::memcmp(r2, image.data() + a, b) != 0) return 7;
  return 0;
}

// A Firecracker VM backed by huge pages is served, every byte: each 2 MiB page installed whole.
TEST_F(AgentTest, FirecrackerVmOnHugePages) {
  testing::HugePages pages(8);
  if (!pages.unavailable().empty()) GTEST_SKIP() << pages.unavailable();
  RAW_IMAGE(image, 16 * kMiB, 57, loc);
  agent::DaemonOptions o;
  o.firecracker_socket = dir_.path() + "/fc.sock";
  o.firecracker_snapshot = loc;
  start_daemon(o);
  EXPECT_EQ(in_child([&] { return vm_of_page_size(o.firecracker_socket, image, true, testing::kHugePage); }), 0);
  // Its session, ended, says what it was served in.
  auto st = agent_query(socket_, false);
  ASSERT_TRUE(st.ok()) << st.error().message();
  auto j = nlohmann::json::parse(*st);
  ASSERT_EQ(j["sessions"].size(), 1u) << *st;
  EXPECT_EQ(j["sessions"][0]["page_size"], testing::kHugePage) << *st;
  EXPECT_NE(agent::format_status(*st).find("(2048 KiB pages)"), std::string::npos) << agent::format_status(*st);
}

// The same from a page server: a page's chunks come back in batches, out of order, and are
// gathered all the same.
TEST_F(AgentTest, FirecrackerVmOnHugePagesFromAPageServer) {
  const char* pageserver = std::getenv("LAZYMEM_PAGESERVER");
  ASSERT_NE(pageserver, nullptr) << "run through meson test";
  testing::HugePages pages(8);
  if (!pages.unavailable().empty()) GTEST_SKIP() << pages.unavailable();
  std::filesystem::create_directories(dir_.path() + "/store");
  RAW_IMAGE_AT(image, 16 * kMiB, 60, vm, dir_.path() + "/store/vm");
  testing::SpawnedServer server(pageserver, dir_.path() + "/store", {});
  server.start();
  agent::DaemonOptions o;
  o.firecracker_socket = dir_.path() + "/fc.sock";
  o.firecracker_snapshot = fmt::format("lazymem://127.0.0.1:{}/vm", server.port());
  start_daemon(o);
  EXPECT_EQ(in_child([&] { return vm_of_page_size(o.firecracker_socket, image, true, testing::kHugePage); }), 0);
}

// A VM whose message gives its memory the wrong page size is refused and failed (poisoned, or
// killed), not served pages the kernel would refuse to install one by one.
TEST_F(AgentTest, AVmWhosePagesAreNotWhatItSaidIsFailed) {
  RAW_IMAGE(image, 16 * kMiB, 58, loc);
  agent::DaemonOptions o;
  o.firecracker_socket = dir_.path() + "/fc.sock";
  o.firecracker_snapshot = loc;
  start_daemon(o);
  const int failed = kf_.has_uffd_poison() ? 128 + SIGBUS : 128 + SIGKILL;
  // 4 KiB pages said to be huge ones.
  EXPECT_EQ(in_child([&] { return vm_of_page_size(o.firecracker_socket, image, false, testing::kHugePage); }), failed);
  testing::HugePages pages(8);
  if (!pages.unavailable().empty()) GTEST_SKIP() << pages.unavailable();
  // Huge pages said to be 4 KiB ones.
  EXPECT_EQ(in_child([&] { return vm_of_page_size(o.firecracker_socket, image, true, 4096); }), failed);
  // And a range that ends inside a huge page, which cannot be poisoned either: killed.
  EXPECT_EQ(in_child([&] { return vm_of_page_size(o.firecracker_socket, image, true, 4096, 4096); }), 128 + SIGKILL);
}

// `--metrics HOST:PORT` answers an HTTP GET with the counters in Prometheus text format.
TEST_F(AgentTest, MetricsInPrometheusText) {
  sys::UniqueFd probe(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t alen = sizeof a;
  ASSERT_EQ(::bind(probe.get(), reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ASSERT_EQ(::getsockname(probe.get(), reinterpret_cast<sockaddr*>(&a), &alen), 0);
  int port = ntohs(a.sin_port);
  probe = sys::UniqueFd();  // a free port, for the agent
  std::string loc = capture(4 * kMiB, 50);
  agent::DaemonOptions o;
  o.metrics_address = fmt::format("127.0.0.1:{}", port);
  start_daemon(o);
  ASSERT_EQ(in_child([&] {
              auto r = AgentRestore::start(socket_, loc);
              return r.ok() && (*r)->wait_complete(std::chrono::seconds(30)).ok() ? 0 : 3;
            }),
            0);
  sys::UniqueFd c(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  ASSERT_EQ(::connect(c.get(), reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  std::string get = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
  ASSERT_GT(::send(c.get(), get.data(), get.size(), 0), 0);
  std::string resp;
  char buf[4096];
  ssize_t n;
  while ((n = ::recv(c.get(), buf, sizeof buf, 0)) > 0) resp.append(buf, static_cast<size_t>(n));
  EXPECT_EQ(resp.rfind("HTTP/1.0 200 OK\r\n", 0), 0u) << resp;
  EXPECT_NE(resp.find("# TYPE lazymem_faults_total counter"), std::string::npos) << resp;
  EXPECT_NE(resp.find("region=\"heap\",how=\"fault\"}"), std::string::npos) << resp;
  EXPECT_EQ(resp.find("region=\"heap\",state="), std::string::npos) << "a state label on a counter: " << resp;
  EXPECT_NE(resp.find("# TYPE lazymem_session_state gauge"), std::string::npos) << resp;
  EXPECT_NE(resp.find(",state=\"complete\"} 1\n"), std::string::npos) << resp;
  EXPECT_NE(resp.find(",state=\"restoring\"} 0\n"), std::string::npos) << resp;
  EXPECT_NE(resp.find("lazymem_fault_latency_seconds{"), std::string::npos) << resp;
}

// `lazymem-agent snapshot --pid` captures ranges of another process (stopped by its owner here,
// and left so); the snapshot then restores through the agent byte for byte.
constexpr size_t kUntouched = size_t{2} << 30;

TEST_F(AgentTest, SnapshotCliCapturesAProcess) {
  ASSERT_FALSE(agent_bin().empty());
  size_t len = 8 * kMiB;
  uint64_t seed = 51;
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  pid_t app = ::fork();
  ASSERT_GE(app, 0);
  if (app == 0) {
    auto* p = static_cast<std::byte*>(testing::map_for_capture(len, seed));
    if (p == nullptr) _exit(3);
    testing::fill_mixed(p, len, seed);
    // And a large range it never touched (a heap arena, a VM's unused memory): its address is
    // the ready message.
    const auto untouched = reinterpret_cast<uintptr_t>(testing::map_for_capture(kUntouched, seed + 1));
    if (untouched == 0) _exit(4);
    (void)!::write(ready[1], &untouched, sizeof untouched);
    for (;;) ::pause();  // until killed
  }
  ::close(ready[1]);  // a child that exits early is seen (EOF), not waited for
  uintptr_t untouched = 0;
  ASSERT_EQ(::read(ready[0], &untouched, sizeof untouched), static_cast<ssize_t>(sizeof untouched)) << "the app failed";
  ::close(ready[0]);
  auto* expect = static_cast<std::byte*>(testing::map_for_capture(len, seed));  // the same bytes, here
  ASSERT_NE(expect, nullptr);
  testing::fill_mixed(expect, len, seed);
  expected_.assign(expect, expect + len);
  len_ = len;
  uintptr_t at = reinterpret_cast<uintptr_t>(expect);
  ::munmap(expect, len);
  std::string loc = dir_.path() + "/proc";
  ::kill(app, SIGSTOP);
  auto [out, rc] = run_cli(fmt::format("{} snapshot --pid {} --region {:x}-{:x}=heap {}", agent_bin(), app, at, at + len, loc));
  // The untouched reservation is read as zeros and costs the capture no memory: its peak
  // (the largest of this test's children so far, all small) stays far below the 2 GiB.
  auto [big, big_rc] = run_cli(fmt::format("{} snapshot --pid {} --region {:x}-{:x}=untouched {}", agent_bin(), app,
                                           untouched, untouched + kUntouched, dir_.path() + "/untouched"));
  EXPECT_EQ(big_rc, 0) << big;
  EXPECT_NE(big.find("2048.0 MiB"), std::string::npos) << big;
#if !defined(__SANITIZE_THREAD__)  // ThreadSanitizer's shadow memory makes every child large
  rusage ru{};
  ASSERT_EQ(::getrusage(RUSAGE_CHILDREN, &ru), 0);
  EXPECT_LT(ru.ru_maxrss, 512 * 1024) << "KiB at the peak of a child: the capture copied the untouched range";
#endif
  ::kill(app, SIGKILL);
  ::waitpid(app, nullptr, 0);
  ASSERT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("8.0 MiB"), std::string::npos) << out;
  std::tie(out, rc) = run_cli(fmt::format("{} snapshot --pid {} --region {:x}-{:x} {}", agent_bin(), ::getpid(), at, at + len,
                                          dir_.path() + "/bad"));
  EXPECT_NE(rc, 0);
  EXPECT_NE(out.find("is not mapped in process"), std::string::npos) << out;
  start_daemon();
  EXPECT_EQ(in_child([&] {
              auto r = AgentRestore::start(socket_, loc);
              if (!r.ok()) return 3;
              if ((*r)->regions()[0].name != "heap") return 4;
              const auto* got = static_cast<const std::byte*>((*r)->regions()[0].address);
              for (size_t off = 0; off < len_; off += 4096)
                if (!same(got, off, 4096)) return 5;
              return 0;
            }),
            0);
}

// A Unix socket at `path`, bound and listening (a live peer's) or bound and closed (stale).
sys::UniqueFd unix_socket_at(const std::string& path, bool listening) {
  sys::UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::strncpy(a.sun_path, path.c_str(), sizeof a.sun_path - 1);
  EXPECT_EQ(::bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a), 0) << path;
  if (listening) EXPECT_EQ(::listen(fd.get(), 4), 0);
  else fd.reset();
  return fd;
}

// A socket somebody listens on is never taken over: a second daemon on the running one's path,
// or a VM socket on a path another process listens on, is refused with the reason, and the
// listener is not even connected to (a per-VM socket takes one handshake only). A stale socket
// (its owner died) is replaced. A daemon that cannot start says why and exits.
TEST_F(AgentTest, SocketInUseIsNotTaken) {
  ASSERT_FALSE(agent_bin().empty());
  start_daemon();
  auto [out, rc] = run_cli("timeout 20 " + agent_bin() + " run --socket " + socket_);
  EXPECT_EQ(rc, 1) << out;
  EXPECT_NE(out.find(socket_ + " is in use"), std::string::npos) << out;
  std::tie(out, rc) = run_cli(agent_bin() + " status --socket " + socket_);
  EXPECT_EQ(rc, 0) << "the running daemon lost its socket: " << out;

  RAW_IMAGE(image, 1 * kMiB, 50, loc);
  std::string taken = dir_.path() + "/taken.sock";
  sys::UniqueFd peer = unix_socket_at(taken, true);
  std::tie(out, rc) = run_cli("timeout 20 " + agent_bin() + " restore --socket " + socket_ + " --firecracker-socket " +
                              taken + " --snapshot " + loc);
  EXPECT_NE(rc, 0);
  EXPECT_NE(out.find(taken + " is in use"), std::string::npos) << out;
  EXPECT_LT(::accept4(peer.get(), nullptr, nullptr, SOCK_CLOEXEC), 0) << "the listener was connected to";
  EXPECT_EQ(errno, EAGAIN);

  std::string stale = dir_.path() + "/stale.sock";
  (void)unix_socket_at(stale, false);
  FILE* cli = ::popen(("timeout 20 " + agent_bin() + " restore --socket " + socket_ + " --firecracker-socket " + stale +
                       " --snapshot " + loc + " 2>&1").c_str(), "r");
  ASSERT_NE(cli, nullptr);
  char line[4096];
  ASSERT_NE(std::fgets(line, sizeof line, cli), nullptr);
  EXPECT_EQ(std::string(line), "listening on " + stale + "\n");
  EXPECT_EQ(in_child([&] { return firecracker_vm(stale, image, false); }), 0);
  while (std::fgets(line, sizeof line, cli) != nullptr) {
  }
  EXPECT_EQ(::pclose(cli), 0);

  std::tie(out, rc) = run_cli(agent_bin() + " run --socket " + dir_.path() + "/no/such/dir/agent.sock");
  EXPECT_EQ(rc, 1) << out;
  EXPECT_NE(out.find("does it exist?"), std::string::npos) << out;
}

// Relative paths are the client's: a snapshot (and a VM's handshake socket) named relative to the
// client's working directory is the one served, never one of the same name where the agent runs.
TEST_F(AgentTest, RelativePathsAreTheClients) {
  ASSERT_FALSE(agent_bin().empty());
  const std::string ours = dir_.path() + "/client", theirs = dir_.path() + "/agent";
  std::filesystem::create_directories(ours + "/kvs");
  std::filesystem::create_directories(theirs + "/kvs");
  capture(8 * kMiB, 52, "agent/kvs/snap");   // the same name in the agent's directory: other bytes
  capture(8 * kMiB, 53, "client/kvs/snap");  // expected_ holds these
  RAW_IMAGE_AT(image, 4 * kMiB, 54, vm, ours + "/vm");
  start_daemon({}, theirs);
  EXPECT_EQ(restore_in_child("kvs/snap", ours), 0);
  // `lazymem-agent restore` with both paths relative: the socket is made, and the image found,
  // in the directory it was run in.
  FILE* cli = ::popen(("cd " + ours + " && " + agent_bin() + " restore --socket " + socket_ +
                       " --firecracker-socket vm.sock --snapshot vm 2>&1").c_str(), "r");
  ASSERT_NE(cli, nullptr);
  char line[4096];
  ASSERT_NE(std::fgets(line, sizeof line, cli), nullptr);
  ASSERT_EQ(std::string(line), "listening on vm.sock\n");
  EXPECT_EQ(in_child([&] { return firecracker_vm(ours + "/vm.sock", image, false); }), 0);
  while (std::fgets(line, sizeof line, cli) != nullptr) {
  }
  EXPECT_EQ(::pclose(cli), 0);
}

// A snapshot replaced in the store after the agent has served it: the next restore gets the
// version it read, never the old one's pages. A request for a version the agent does not find,
// or with a relative path (an older client's), is refused with the reason.
TEST_F(AgentTest, ServesTheVersionTheClientRead) {
  std::string loc = capture(8 * kMiB, 55);
  start_daemon();
  EXPECT_EQ(restore_in_child(loc), 0);
  auto first = read_manifest(loc);
  ASSERT_TRUE(first.ok()) << first.error().message();
  capture(8 * kMiB, 56, "snap", true);  // replaced: other bytes, at another address
  EXPECT_EQ(restore_in_child(loc), 0) << "served the pages of the version it replaced";

  void* mapped = ::mmap(nullptr, 8 * kMiB, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);  // where the range lies
  ASSERT_NE(mapped, MAP_FAILED);
  std::string stale = ask_restore(loc, reinterpret_cast<uintptr_t>(mapped), 8 * kMiB, true, first->checksum);
  EXPECT_NE(stale.find("another version of the snapshot than the client read"), std::string::npos) << stale;
  std::string relative = ask_restore("snap", reinterpret_cast<uintptr_t>(mapped), 8 * kMiB, true);
  EXPECT_NE(relative.find("snapshot path 'snap' is relative"), std::string::npos) << relative;
  ::munmap(mapped, 8 * kMiB);
}

// The handshake sockets waiting for Firecracker, as `status --json` lists them.
std::vector<std::string> waiting_sockets(const nlohmann::json& status) {
  std::vector<std::string> out;
  for (const auto& h : status["handshakes"]) out.push_back(h["socket"].get<std::string>());
  return out;
}

// An interrupted `lazymem-agent restore` (Ctrl-C while it waits for Firecracker) leaves nothing
// armed: the agent closes and removes the VM's socket, and the same command then works again.
// With --no-wait the socket stays, as asked, until its VM comes. Status shows a waiting socket.
// The agent runs as root and removes the sockets it made: only those. A user who owns the
// socket's directory swaps it for a symlink to another directory holding a file of the socket's
// name, then lets the restore go: that file stays (the removal goes through the directory the
// socket was made in, and checks the name still holds the socket it bound).
TEST_F(AgentTest, RemovingASocketFollowsNoSymlink) {
  RAW_IMAGE(image, 1 * kMiB, 58, loc);
  start_daemon();
  const std::string d = dir_.path() + "/vmdir", moved = dir_.path() + "/vmdir.moved", victim = dir_.path() + "/victim";
  ASSERT_TRUE(std::filesystem::create_directory(d));
  ASSERT_TRUE(std::filesystem::create_directory(victim));
  std::ofstream(victim + "/vm.sock") << "precious";
  // A restore request whose connection closes before the handshake (cancelOnClose).
  FirecrackerServeOptions fo;
  fo.socket_path = d + "/vm.sock";
  fo.snapshot = loc;
  auto serve = AgentFirecrackerServe::start(socket_, fo);
  ASSERT_TRUE(serve.ok()) << serve.error().message();
  std::filesystem::rename(d, moved);
  std::filesystem::create_directory_symlink(victim, d);
  auto js = agent_query(socket_, false);
  ASSERT_TRUE(js.ok()) << js.error().message();
  serve->reset();  // the connection closes (cancel_on_close): the agent removes its socket
  while (js.ok() && !waiting_sockets(nlohmann::json::parse(*js)).empty()) {
    js = agent_wait_change(socket_, nlohmann::json::parse(*js)["generation"].get<uint64_t>(), std::chrono::seconds(5));
  }
  ASSERT_TRUE(js.ok()) << js.error().message();
  EXPECT_TRUE(std::filesystem::exists(victim + "/vm.sock")) << "the agent removed a file through a symlink";
  EXPECT_FALSE(std::filesystem::exists(moved + "/vm.sock")) << "its own socket was left";
}

TEST_F(AgentTest, InterruptedRestoreCliLeavesNoSocket) {
  ASSERT_FALSE(agent_bin().empty());
  RAW_IMAGE(image, 4 * kMiB, 57, loc);
  start_daemon();
  const std::string fc = dir_.path() + "/vm.sock";
  const std::string restore = agent_bin() + " restore --socket " + socket_ + " --firecracker-socket " + fc + " --snapshot " + loc;
  int out[2];
  ASSERT_EQ(::pipe2(out, O_CLOEXEC), 0);
  pid_t cli = ::fork();
  ASSERT_GE(cli, 0);
  if (cli == 0) {
    ::dup2(out[1], 1);
    ::dup2(out[1], 2);
    ::execl("/bin/sh", "sh", "-c", ("exec " + restore).c_str(), nullptr);
    _exit(127);
  }
  ::close(out[1]);
  FILE* said = ::fdopen(out[0], "r");
  char line[4096];
  ASSERT_NE(std::fgets(line, sizeof line, said), nullptr);
  ASSERT_EQ(std::string(line), "listening on " + fc + "\n");
  auto js = agent_query(socket_, false);
  ASSERT_TRUE(js.ok()) << js.error().message();
  EXPECT_EQ(waiting_sockets(nlohmann::json::parse(*js)), std::vector<std::string>{fc}) << *js;
  auto [table, rc] = run_cli(agent_bin() + " status --socket " + socket_);
  EXPECT_NE(table.find("waiting for a Firecracker handshake on " + fc), std::string::npos) << table;

  ::kill(cli, SIGINT);
  ::waitpid(cli, nullptr, 0);
  ::fclose(said);
  // The agent sees the connection close: each status change is awaited, never slept for.
  while (js.ok() && !waiting_sockets(nlohmann::json::parse(*js)).empty()) {
    js = agent_wait_change(socket_, nlohmann::json::parse(*js)["generation"].get<uint64_t>(), std::chrono::seconds(5));
  }
  ASSERT_TRUE(js.ok()) << "the socket still waits: " << js.error().message();
  struct stat st {};
  EXPECT_NE(::stat(fc.c_str(), &st), 0) << "the interrupted restore's socket was left behind";

  FILE* again = ::popen((restore + " 2>&1").c_str(), "r");
  ASSERT_NE(again, nullptr);
  ASSERT_NE(std::fgets(line, sizeof line, again), nullptr);
  ASSERT_EQ(std::string(line), "listening on " + fc + "\n");
  EXPECT_EQ(in_child([&] { return firecracker_vm(fc, image, false); }), 0);
  while (std::fgets(line, sizeof line, again) != nullptr) {
  }
  EXPECT_EQ(::pclose(again), 0);

  std::string output;
  std::tie(output, rc) = run_cli(restore + " --no-wait");
  ASSERT_EQ(rc, 0) << output;
  js = agent_query(socket_, false);
  ASSERT_TRUE(js.ok()) << js.error().message();
  EXPECT_EQ(waiting_sockets(nlohmann::json::parse(*js)), std::vector<std::string>{fc}) << *js;
  EXPECT_EQ(in_child([&] { return firecracker_vm(fc, image, false); }), 0);
}

// The agent's --token-file is for its own --snapshot: a `restore` request for a page server's
// snapshot that names no token is refused by that server, never let in on the agent's token.
TEST_F(AgentTest, TokenIsNotLentToRequests) {
  const char* pageserver = std::getenv("LAZYMEM_PAGESERVER");
  ASSERT_NE(pageserver, nullptr) << "run through meson test";
  std::filesystem::create_directories(dir_.path() + "/store");
  RAW_IMAGE_AT(image, 1 * kMiB, 58, vm, dir_.path() + "/store/vm");
  const std::string token = dir_.path() + "/token";
  std::ofstream(token) << "a secret only root can read\n";
  testing::SpawnedServer server(pageserver, dir_.path() + "/store", {"--token-file", token});
  server.start();
  // The daemon's own VM snapshot is the same location, opened with its token at start: that
  // open source is not lent to a request without the token either.
  const std::string remote = fmt::format("lazymem://127.0.0.1:{}/vm", server.port());
  agent::DaemonOptions o;
  o.firecracker_socket = dir_.path() + "/fc.sock";
  o.firecracker_snapshot = remote;
  o.token_file = token;
  start_daemon(o);
  FirecrackerServeOptions f;
  f.socket_path = dir_.path() + "/vm.sock";
  f.snapshot = remote;
  auto refused = AgentFirecrackerServe::start(socket_, f);
  ASSERT_FALSE(refused.ok()) << "served on the agent's token";
  EXPECT_NE(refused.error().message().find("requires a token"), std::string::npos) << refused.error().message();
  f.token_file = token;  // its own: served
  auto served = AgentFirecrackerServe::start(socket_, f);
  ASSERT_TRUE(served.ok()) << served.error().message();
  EXPECT_EQ(in_child([&] { return firecracker_vm(f.socket_path, image, false); }), 0);
}

// The page server is gone between a VM restore's request (its manifest read then) and the
// VM's handshake (when the agent opens its reader): the restore fails at once, and the VM's
// accesses fail visibly (SIGBUS), never wait forever on a session nobody reads.
class ServerGoneTest : public AgentTest {
 protected:
  // `vm` (given its socket and its memory's image, `len` bytes) handshakes on a VM socket the
  // agent made for a snapshot on a page server, killed after; returns how the VM ended.
  int vm_with_its_server_gone(size_t len, uint64_t seed,
                              const std::function<int(const std::string&, const std::vector<std::byte>&)>& vm) {
    int status = -1;
    run(len, seed, vm, status);
    return status;
  }

 private:
  void run(size_t len, uint64_t seed, const std::function<int(const std::string&, const std::vector<std::byte>&)>& vm,
           int& status) {
    const char* pageserver = std::getenv("LAZYMEM_PAGESERVER");
    ASSERT_NE(pageserver, nullptr) << "run through meson test";
    std::filesystem::create_directories(dir_.path() + "/store");
    RAW_IMAGE_AT(image, len, seed, loc, dir_.path() + "/store/vm");
    testing::SpawnedServer server(pageserver, dir_.path() + "/store", {});
    server.start();
    agent::DaemonOptions o;
    o.engine.demand_deadline = std::chrono::seconds(2);
    start_daemon(o);
    FirecrackerServeOptions f;
    f.socket_path = dir_.path() + "/vm.sock";
    f.snapshot = fmt::format("lazymem://127.0.0.1:{}/vm", server.port());
    auto serve = AgentFirecrackerServe::start(socket_, f);
    ASSERT_TRUE(serve.ok()) << serve.error().message();
    server.kill();
    status = in_child([&] { return vm(f.socket_path, image); });
  }
};

TEST_F(ServerGoneTest, BeforeTheHandshakeFailsTheVmVisibly) {
  const int status = vm_with_its_server_gone(1 * kMiB, 59, [](const std::string& socket, const auto& image) {
    ::alarm(60);                // a hang ends as SIGALRM, not as the suite's timeout
    ::signal(SIGBUS, SIG_DFL);  // sanitizers install their own handler; we want the plain death
    return firecracker_vm(socket, image, false);
  });
  EXPECT_EQ(status, 128 + SIGBUS) << "the VM was not failed visibly (128+14: it hung)";
}

// The same for a VM on huge pages: a page that cannot be had fails whole, visibly.
TEST_F(ServerGoneTest, HugePagesFailVisibly) {
  testing::HugePages pages(8);
  if (!pages.unavailable().empty()) GTEST_SKIP() << pages.unavailable();
  const int status = vm_with_its_server_gone(16 * kMiB, 61, [](const std::string& socket, const auto& image) {
    return vm_of_page_size(socket, image, true, testing::kHugePage);
  });
  EXPECT_EQ(status, kf_.has_uffd_poison() ? 128 + SIGBUS : 128 + SIGKILL) << "(128+14: the VM hung)";
}

// Opening a snapshot can wait on a page server, up to its deadline: the agent does it off its
// loop. With the page server stopped (its kernel still accepts; nothing answers), a VM socket
// asked for from it waits, shown in status as opening, while another process restores from a
// local snapshot; once the server runs again the VM is served, every byte. (The whole agent
// used to wait on the open: the other restore and the status went unanswered.)
TEST_F(AgentTest, OpeningASnapshotHoldsUpNobodyElse) {
  const char* pageserver = std::getenv("LAZYMEM_PAGESERVER");
  ASSERT_NE(pageserver, nullptr) << "run through meson test";
  std::filesystem::create_directories(dir_.path() + "/store");
  RAW_IMAGE_AT(image, 1 * kMiB, 63, vm, dir_.path() + "/store/vm");
  const std::string local = capture(8 * kMiB, 64);
  testing::SpawnedServer server(pageserver, dir_.path() + "/store", {});
  server.start();
  start_daemon();
  server.stop();

  // The VM socket's request, by hand: the client library would wait for the answer.
  const std::string vm_socket = dir_.path() + "/vm.sock";
  auto asker = agent::connect_unix(socket_);
  ASSERT_TRUE(asker.ok());
  capnp::MallocMessageBuilder b;
  auto rq = b.initRoot<proto::agent::Request>();
  rq.setId(7);
  auto fc = rq.initServeFirecracker();
  fc.setSocketPath(vm_socket);
  fc.setSnapshot(fmt::format("lazymem://127.0.0.1:{}/vm", server.port()));
  fc.setPrefetch(true);
  ASSERT_TRUE(agent::send_frame_fd(asker->get(), b, {}, -1).ok());

  uint64_t generation = 0;
  for (bool opening = false; !opening;) {
    auto st = agent_wait_change(socket_, generation, std::chrono::seconds(20));
    ASSERT_TRUE(st.ok()) << "no status within 20 s: " << st.error().message();
    auto j = nlohmann::json::parse(*st);
    generation = j["generation"].get<uint64_t>();
    opening = j.contains("opening") && j["opening"].size() == 1;
    if (opening) {
      EXPECT_NE(agent::format_status(*st).find(": opening lazymem://"), std::string::npos) << *st;
    }
  }
  EXPECT_EQ(restore_in_child(local), 0);
  pollfd p{asker->get(), POLLIN, 0};
  EXPECT_EQ(::poll(&p, 1, 0), 0) << "answered while its page server was stopped";

  server.resume();
  net::FrameBuffer buf;
  std::deque<sys::UniqueFd> fds;
  for (;;) {
    auto f = buf.next();
    ASSERT_TRUE(f.ok());
    if (f->has_value()) {
      auto hd = net::Header::parse((*f)->header);
      ASSERT_TRUE(hd.ok());
      auto reply = (*hd)->root<proto::agent::Reply>();
      ASSERT_EQ(reply.getId(), 7u);
      ASSERT_TRUE(reply.isAccepted()) << (reply.isError() ? reply.getError().cStr() : "not accepted");
      break;
    }
    ASSERT_TRUE(agent::recv_some(asker->get(), buf, fds, 20000).ok()) << "no answer once the server ran again";
  }
  EXPECT_EQ(in_child([&] {
              ::alarm(60);
              return firecracker_vm(vm_socket, image, false);
            }),
            0);
}

// A client that gives up while its snapshot is still opening (it closes its connection, then
// unmaps its regions) is let go at once: the agent drops its copy of the uffd when the
// connection closes, or the client's munmap would wait on the unmap event until the open ended.
TEST_F(AgentTest, ClientGivingUpWhileOpeningIsLetGo) {
  const char* pageserver = std::getenv("LAZYMEM_PAGESERVER");
  ASSERT_NE(pageserver, nullptr) << "run through meson test";
  std::filesystem::create_directories(dir_.path() + "/store");
  capture(4 * kMiB, 65, "store/proc");
  testing::SpawnedServer server(pageserver, dir_.path() + "/store", {});
  server.start();
  start_daemon();
  server.stop();
  const std::string loc = fmt::format("lazymem://127.0.0.1:{}/proc", server.port());
  int sent[2], go[2];
  ASSERT_EQ(::pipe(sent), 0);
  ASSERT_EQ(::pipe(go), 0);
  pid_t kid = ::fork();
  ASSERT_GE(kid, 0);
  if (kid == 0) {
    ::alarm(10);  // the open's deadline is 30 s: held until then, the munmap below dies of SIGALRM
    void* p = testing::map_for_capture(len_, 65);
    auto uffd = sys::Uffd::open(UFFD_FEATURE_EVENT_UNMAP);
    if (p == nullptr || !uffd.ok() || !uffd->register_missing(reinterpret_cast<uintptr_t>(p), len_).ok()) _exit(2);
    auto s = agent::connect_unix(socket_);
    if (!s.ok()) _exit(3);
    capnp::MallocMessageBuilder b;
    auto rq = b.initRoot<proto::agent::Request>();
    rq.setId(1);
    auto rs = rq.initRestore();
    rs.setSnapshot(loc);
    rs.setUffdFeatures(uffd->features());
    auto rr = rs.initRanges(1);
    rr[0].setStart(reinterpret_cast<uintptr_t>(p));
    rr[0].setLength(len_);
    if (!agent::send_frame_fd(s->get(), b, {}, uffd->fd()).ok()) _exit(4);
    char c = 1;
    if (::write(sent[1], &c, 1) != 1 || ::read(go[0], &c, 1) != 1) _exit(5);
    s->reset();  // gives up, as AgentRestore does: the connection first
    *uffd = sys::Uffd();
    ::munmap(p, len_);
    _exit(0);
  }
  char c;
  ASSERT_EQ(::read(sent[0], &c, 1), 1);
  uint64_t generation = 0;
  for (bool opening = false; !opening;) {
    auto st = agent_wait_change(socket_, generation, std::chrono::seconds(20));
    ASSERT_TRUE(st.ok()) << st.error().message();
    auto j = nlohmann::json::parse(*st);
    generation = j["generation"].get<uint64_t>();
    opening = j["opening"].size() == 1;
  }
  ASSERT_EQ(::write(go[1], &c, 1), 1);
  int status = 0;
  ASSERT_EQ(::waitpid(kid, &status, 0), kid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
      << "the client's munmap waited on the uffd the agent held (status " << status << ")";
}

// A "page server" that takes connections into its backlog and never answers.
struct SilentServer {
  sys::UniqueFd fd{::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)};
  std::string location;
  SilentServer() {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    EXPECT_EQ(::bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
    EXPECT_EQ(::listen(fd.get(), 512), 0);
    ::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&a), &len);
    location = fmt::format("lazymem://127.0.0.1:{}/snap", ntohs(a.sin_port));
  }
};

// A VM's handshake is opened at once, however many opens other requests have waiting on a page
// server that never answers: a VM cannot ask again. (With 64 under way it was refused, and the
// VM's memory failed.)
TEST_F(AgentTest, VmIsServedWhileOthersWaitOnASilentServer) {
  std::filesystem::create_directories(dir_.path() + "/store");
  RAW_IMAGE_AT(image, 1 * kMiB, 67, vm, dir_.path() + "/store/vm");
  SilentServer silent;
  agent::DaemonOptions o;
  o.firecracker_socket = dir_.path() + "/fc.sock";
  o.firecracker_snapshot = vm;
  start_daemon(o);
  std::vector<sys::UniqueFd> askers;
  for (int i = 0; i < 80; ++i) {
    auto s = agent::connect_unix(socket_);
    ASSERT_TRUE(s.ok());
    capnp::MallocMessageBuilder b;
    auto fc = b.initRoot<proto::agent::Request>().initServeFirecracker();
    fc.setSocketPath(dir_.path() + fmt::format("/vm{}.sock", i));
    fc.setSnapshot(silent.location);
    ASSERT_TRUE(agent::send_frame_fd(s->get(), b, {}, -1).ok());
    askers.push_back(std::move(*s));
  }
  uint64_t generation = 0;
  for (size_t opening = 0; opening < 80;) {
    auto st = agent_wait_change(socket_, generation, std::chrono::seconds(20));
    ASSERT_TRUE(st.ok()) << st.error().message();
    auto j = nlohmann::json::parse(*st);
    generation = j["generation"].get<uint64_t>();
    opening = j["opening"].size();
  }
  EXPECT_EQ(in_child([&] {
              ::alarm(60);
              ::signal(SIGBUS, SIG_DFL);
              return firecracker_vm(o.firecracker_socket, image, false);
            }),
            0);
}

// Opens are shared fairly between users: one user's opens waiting on a page server that never
// answers do not hold up another's.
TEST(SourceOpenerTest, OneUsersSilentServerHoldsUpNoOtherUser) {
  ScratchDir dir;
  std::vector<std::byte> image(256 * 1024);
  testing::fill_mixed(image.data(), image.size(), 68);
  const std::string file = dir.path() + "/guest.mem";
  std::ofstream(file, std::ios::binary).write(reinterpret_cast<const char*>(image.data()), static_cast<std::streamsize>(image.size()));
  ASSERT_TRUE(capture_raw_file(dir.path() + "/local", file, {}).ok());
  SilentServer silent;
  agent::SourceOpener opener;
  constexpr uid_t kA = 1000, kB = 1001;
  for (uint64_t job = 1; job <= 100; ++job) {
    ASSERT_TRUE(opener.submit(job, kA, agent::OpenSpec{silent.location, "", std::nullopt, {}, {}}, false).ok());
  }
  ASSERT_TRUE(opener.submit(100, kB, agent::OpenSpec{dir.path() + "/local", "", std::nullopt, {}, {}}, false).ok());
  for (;;) {
    pollfd p[2] = {{opener.fd(), POLLIN, 0}, {opener.timer_fd(), POLLIN, 0}};
    ASSERT_GT(::poll(p, 2, 20000), 0) << "user B's open never finished";
    auto done = opener.take();
    ASSERT_LE(done.size(), 1u);
    if (done.empty()) continue;
    EXPECT_EQ(done[0].first, 100u) << "an open of the silent server finished first";
    ASSERT_TRUE(done[0].second.ok()) << done[0].second.error().message();
    EXPECT_EQ(done[0].second->source->manifest().regions.size(), 1u);
    break;
  }
}

// Every open is answered by its deadline, under way or still waiting its turn; one cancelled
// (its requester left) is never answered.
TEST(SourceOpenerTest, AnsweredByTheDeadlineCancelledNever) {
  SilentServer silent;
  agent::OpenLimits limits;
  limits.running_per_user = 1;  // job 2 waits behind job 1; job 3 behind both
  limits.deadline = std::chrono::milliseconds(300);
  agent::SourceOpener opener(limits);
  for (uint64_t job = 1; job <= 3; ++job) {
    ASSERT_TRUE(opener.submit(job, 1000, agent::OpenSpec{silent.location, "", std::nullopt, {}, {}}, false).ok());
  }
  opener.cancel(3);
  std::set<uint64_t> answered;
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (answered.size() < 2) {
    pollfd p[2] = {{opener.fd(), POLLIN, 0}, {opener.timer_fd(), POLLIN, 0}};
    ASSERT_GT(::poll(p, 2, 20000), 0) << "an open past its deadline was not answered";
    for (auto& [job, r] : opener.take()) {
      ASSERT_FALSE(r.ok()) << "job " << job << " opened a silent server";
      EXPECT_EQ(r.error().code(), Errc::kTimeout) << r.error().message();
      EXPECT_TRUE(answered.insert(job).second) << "job " << job << " answered twice";
    }
    ASSERT_LT(std::chrono::steady_clock::now(), until);
  }
  EXPECT_EQ(answered, (std::set<uint64_t>{1, 2}));
  pollfd p[2] = {{opener.fd(), POLLIN, 0}, {opener.timer_fd(), POLLIN, 0}};
  if (::poll(p, 2, 500) > 0) {
    EXPECT_TRUE(opener.take().empty()) << "the cancelled open was answered";
  }
}

// A VM's request names no version (Firecracker reads no manifest): the agent serves the store's
// version at the time, never the one it opened for an earlier VM before the snapshot was replaced.
TEST_F(AgentTest, ReplacedVmSnapshotIsServedNew) {
  std::filesystem::create_directories(dir_.path() + "/store");
  RAW_IMAGE_AT(first, 1 * kMiB, 60, vm, dir_.path() + "/store/vm");
  start_daemon();
  FirecrackerServeOptions f;
  f.socket_path = dir_.path() + "/vm.sock";
  f.snapshot = vm;
  {
    auto serve = AgentFirecrackerServe::start(socket_, f);
    ASSERT_TRUE(serve.ok()) << serve.error().message();
    EXPECT_EQ(in_child([&] { return firecracker_vm(f.socket_path, first, false); }), 0);
  }
  std::vector<std::byte> second(1 * kMiB);
  testing::fill_mixed(second.data(), second.size(), 61);
  std::ofstream(dir_.path() + "/guest2.mem", std::ios::binary)
      .write(reinterpret_cast<const char*>(second.data()), static_cast<std::streamsize>(second.size()));
  auto [out, rc] = run_cli(agent_bin() + " snapshot --replace --raw " + dir_.path() + "/guest2.mem " + vm);
  ASSERT_EQ(rc, 0) << out;
  auto serve = AgentFirecrackerServe::start(socket_, f);
  ASSERT_TRUE(serve.ok()) << serve.error().message();
  EXPECT_EQ(in_child([&] { return firecracker_vm(f.socket_path, second, false); }), 0) << "served the old version";
}

// Runs `cmd` through sh as `uid` (gid the same, no other groups); returns output and status.
std::pair<std::string, int> run_as(uid_t uid, const std::string& cmd) {
  int out[2];
  if (::pipe(out) != 0) return {"pipe", -1};
  pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(out[1], 1);
    ::dup2(out[1], 2);
    ::close(out[0]);
    if (::setgroups(0, nullptr) != 0 || ::setgid(uid) != 0 || ::setuid(uid) != 0) _exit(99);
    ::execl("/bin/sh", "sh", "-c", cmd.c_str(), nullptr);
    _exit(98);
  }
  ::close(out[1]);
  std::string text;
  char buf[4096];
  for (ssize_t n; (n = ::read(out[0], buf, sizeof buf)) > 0;) text.append(buf, static_cast<size_t>(n));
  ::close(out[0]);
  int st = 0;
  ::waitpid(pid, &st, 0);
  return {text, WIFEXITED(st) ? WEXITSTATUS(st) : -1};
}

// The agent runs as root: a user allowed on its socket (--group) gets served only what that user
// could read itself. A snapshot in a store only root can read is refused, not read on its behalf.
TEST_F(AgentTest, UsersAreServedOnlyWhatTheyCouldRead) {
  ASSERT_FALSE(agent_bin().empty());
  constexpr uid_t kNobody = 65534;
  const std::string store = dir_.path() + "/store", vmdir = dir_.path() + "/vms";
  std::filesystem::create_directories(store);
  RAW_IMAGE_AT(image, 1 * kMiB, 62, vm, store + "/vm");
  ASSERT_EQ(::chmod(dir_.path().c_str(), 0711), 0);  // the socket reachable, the store not listable
  ASSERT_EQ(::chmod(store.c_str(), 0700), 0);
  std::filesystem::create_directories(vmdir);
  ASSERT_EQ(::chown(vmdir.c_str(), kNobody, kNobody), 0);
  agent::DaemonOptions o;
  o.socket_group = kNobody;
  start_daemon(o);
  const std::string restore = agent_bin() + " restore --no-wait --socket " + socket_ + " --snapshot " + vm +
                              " --firecracker-socket " + vmdir + "/vm.sock";
  auto [out, rc] = run_as(kNobody, restore);
  EXPECT_EQ(rc, 1) << out;
  EXPECT_NE(out.find("cannot be read by uid 65534"), std::string::npos) << out;
  ASSERT_EQ(::chmod(store.c_str(), 0755), 0);  // readable by all now: served
  std::tie(out, rc) = run_as(kNobody, restore);
  EXPECT_EQ(rc, 0) << out;
}

// Replaces symlink `link` with one to `target`, atomically (as a user swapping its own link).
void swap_symlink(const std::string& link, const std::string& target) {
  const std::string tmp = link + ".new";
  ASSERT_EQ(::symlink(target.c_str(), tmp.c_str()), 0) << std::strerror(errno);
  ASSERT_EQ(::rename(tmp.c_str(), link.c_str()), 0) << std::strerror(errno);
}

// Files a user may and may not read for the agent's opens on its behalf: the user's snapshot
// and token (owned by `kNobody`), and another snapshot and token only root can read.
class UserFilesTest : public AgentTest {
 protected:
  static constexpr uid_t kNobody = 65534;
  void SetUp() override {
    AgentTest::SetUp();
    if (IsSkipped()) return;
    if (::geteuid() != 0) GTEST_SKIP() << "needs root, to open as another user";
    ASSERT_EQ(::chmod(dir_.path().c_str(), 0711), 0);
    std::filesystem::create_directories(dir_.path() + "/locked");
    ASSERT_EQ(::chmod((dir_.path() + "/locked").c_str(), 0700), 0);  // root's alone
    mine_ = capture(1 * kMiB, 71, "mine");
    secret_ = capture(2 * kMiB, 72, "locked/secret");
    for (const char* f : {"", "/manifest", "/data"}) ASSERT_EQ(::chown((mine_ + f).c_str(), kNobody, kNobody), 0);
    ASSERT_EQ(::chmod(mine_.c_str(), 0700), 0);  // the user's alone
    my_token_ = dir_.path() + "/my-token";
    secret_token_ = dir_.path() + "/locked/secret-token";
    std::ofstream(my_token_) << "the user's token, long enough\n";
    std::ofstream(secret_token_) << "root's own token, long enough\n";
    ASSERT_EQ(::chown(my_token_.c_str(), kNobody, kNobody), 0);
    ASSERT_EQ(::chmod(my_token_.c_str(), 0600), 0);
    ASSERT_EQ(::chmod(secret_token_.c_str(), 0600), 0);
  }
  static agent::Requester nobody() { return agent::Requester{::getpid(), kNobody, kNobody, {}}; }
  static ino_t inode(const std::string& path) {
    struct stat st{};
    EXPECT_EQ(::stat(path.c_str(), &st), 0) << path;
    return st.st_ino;
  }
  std::string mine_, secret_, my_token_, secret_token_;
};

// A path the user names that leads (through a symlink of its own) to a file only root can read
// is refused, naming it: the agent opens nothing for a user that the user could not.
TEST_F(UserFilesTest, WhatTheUserCannotOpenIsRefused) {
  const std::string token_link = dir_.path() + "/token-link", snap_link = dir_.path() + "/snap-link";
  swap_symlink(token_link, secret_token_);
  swap_symlink(snap_link, secret_);
  auto opened = agent::open_source(agent::OpenSpec{mine_, token_link, nobody(), {}, {}});
  ASSERT_FALSE(opened.ok()) << "the user was given root's token";
  EXPECT_EQ(opened.error().code(), Errc::kPermission);
  EXPECT_NE(opened.error().message().find(token_link + " cannot be read by uid 65534"), std::string::npos)
      << opened.error().message();
  opened = agent::open_source(agent::OpenSpec{snap_link, my_token_, nobody(), {}, {}});
  ASSERT_FALSE(opened.ok()) << "the user was given root's snapshot";
  EXPECT_NE(opened.error().message().find(snap_link + "/manifest cannot be read by uid 65534"), std::string::npos)
      << opened.error().message();
  opened = agent::open_source(agent::OpenSpec{mine_, my_token_, nobody(), {}, snap_link});  // as a base
  ASSERT_FALSE(opened.ok()) << "the user was given root's snapshot as a base";
  EXPECT_NE(opened.error().message().find(snap_link + "/manifest cannot be read by uid 65534"), std::string::npos)
      << opened.error().message();
  opened = agent::open_source(agent::OpenSpec{mine_, my_token_, nobody(), {}, {}});  // its own: opened
  ASSERT_TRUE(opened.ok()) << opened.error().message();
  EXPECT_EQ(opened->token, "the user's token, long enough");
}

// What the agent reads for a user is what the user opened, not what the paths name afterwards.
// The user's token and snapshot are reached through symlinks the user controls, and each link
// is swapped to root's file the moment the user's file is opened: fanotify holds every open of
// the user's files (FAN_OPEN_PERM, after the path was looked up) until this test has swapped
// the link. The agent then has the user's files open, and must read those: reading by path
// again (as it did, as root, after checking that the user could open them) gets root's token
// and snapshot.
TEST_F(UserFilesTest, TheAgentReadsWhatTheUserOpened) {
  const std::string token_link = dir_.path() + "/token-link", snap_link = dir_.path() + "/snap-link";
  swap_symlink(token_link, my_token_);
  swap_symlink(snap_link, mine_);
  auto mine = read_manifest(mine_), secret = read_manifest(secret_);
  ASSERT_TRUE(mine.ok() && secret.ok());
  ASSERT_NE(mine->checksum, secret->checksum);
  sys::UniqueFd fan(::fanotify_init(FAN_CLASS_CONTENT | FAN_CLOEXEC, O_RDONLY | O_CLOEXEC));
  if (!fan.valid()) GTEST_SKIP() << "no fanotify: " << std::strerror(errno);
  for (const std::string& f : {my_token_, mine_ + "/data"}) {
    if (::fanotify_mark(fan.get(), FAN_MARK_ADD, FAN_OPEN_PERM, AT_FDCWD, f.c_str()) != 0) {
      GTEST_SKIP() << "no fanotify permission events: " << std::strerror(errno);
    }
  }
  const ino_t token_ino = inode(my_token_), data_ino = inode(mine_ + "/data");
  sys::UniqueFd stop(::eventfd(0, EFD_CLOEXEC));
  ASSERT_TRUE(stop.valid());
  int token_opens = 0, data_opens = 0;
  std::thread held([&] {
    for (;;) {
      pollfd p[2] = {{fan.get(), POLLIN, 0}, {stop.get(), POLLIN, 0}};
      if (::poll(p, 2, -1) < 0 && errno != EINTR) return;
      if (p[1].revents != 0) return;
      if (p[0].revents == 0) continue;
      alignas(fanotify_event_metadata) char buf[4096];
      const ssize_t n = ::read(fan.get(), buf, sizeof buf);
      if (n <= 0) continue;
      auto* ev = reinterpret_cast<fanotify_event_metadata*>(buf);
      for (ssize_t len = n; FAN_EVENT_OK(ev, len); ev = FAN_EVENT_NEXT(ev, len)) {
        struct stat st{};
        ::fstat(ev->fd, &st);
        if (st.st_ino == token_ino && token_opens++ == 0) swap_symlink(token_link, secret_token_);
        if (st.st_ino == data_ino && data_opens++ == 0) swap_symlink(snap_link, secret_);
        fanotify_response allow{ev->fd, FAN_ALLOW};
        (void)!::write(fan.get(), &allow, sizeof allow);
        ::close(ev->fd);
      }
    }
  });
  auto opened = agent::open_source(agent::OpenSpec{snap_link, token_link, nobody(), {}, {}});
  const uint64_t one = 1;
  (void)!::write(stop.get(), &one, sizeof one);
  held.join();
  fan.reset();
  ASSERT_GE(token_opens, 1) << "the token file was not opened";
  ASSERT_GE(data_opens, 1) << "the data file was not opened";
  EXPECT_EQ(std::filesystem::read_symlink(snap_link).string(), secret_);  // swapped, both
  EXPECT_EQ(std::filesystem::read_symlink(token_link).string(), secret_token_);
  ASSERT_TRUE(opened.ok()) << opened.error().message();
  EXPECT_EQ(opened->token, "the user's token, long enough") << "root's token was read for the user";
  EXPECT_EQ(opened->source->manifest().checksum, mine->checksum) << "root's snapshot was read for the user";
  auto* local = dynamic_cast<snapshot::LocalSnapshot*>(opened->source.get());
  ASSERT_NE(local, nullptr);
  struct stat st{};
  ASSERT_EQ(::fstat(local->data_fd(), &st), 0);
  EXPECT_EQ(st.st_ino, data_ino) << "the data is read from another file than the user opened";
}

// A VM socket's snapshot is opened again when its VM connects (the store's version then), and as
// whoever asked for the socket: by then a path of theirs may lead elsewhere. (It was opened as
// root, unchecked: a user's symlink swapped to root's snapshot had root's pages served to the
// user's VM.)
TEST_F(AgentTest, AVmSocketsSnapshotIsOpenedAsWhoAskedForIt) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root, to connect as another user";
  ASSERT_FALSE(agent_bin().empty());
  constexpr uid_t kNobody = 65534;
  const std::string vmdir = dir_.path() + "/vms", locked = dir_.path() + "/locked", link = dir_.path() + "/vm-link";
  std::filesystem::create_directories(locked);
  RAW_IMAGE_AT(mine, 1 * kMiB, 64, mine_loc, dir_.path() + "/mine");
  RAW_IMAGE_AT(secret, 1 * kMiB, 65, secret_loc, locked + "/secret");
  ASSERT_EQ(::chmod(dir_.path().c_str(), 0711), 0);
  ASSERT_EQ(::chmod(locked.c_str(), 0700), 0);  // root's alone
  std::filesystem::create_directories(vmdir);
  ASSERT_EQ(::chown(vmdir.c_str(), kNobody, kNobody), 0);
  swap_symlink(link, mine_loc);
  agent::DaemonOptions o;
  o.socket_group = kNobody;
  start_daemon(o);
  for (const char* vm : {"/vm1.sock", "/vm2.sock"}) {
    auto [out, rc] = run_as(kNobody, agent_bin() + " restore --no-wait --socket " + socket_ + " --snapshot " + link +
                                         " --firecracker-socket " + vmdir + vm);
    ASSERT_EQ(rc, 0) << out;
  }
  EXPECT_EQ(in_child([&] { return firecracker_vm(vmdir + "/vm1.sock", mine, false); }), 0);
  swap_symlink(link, secret_loc);  // the user's link leads to root's snapshot now
  EXPECT_NE(in_child([&] { return firecracker_vm(vmdir + "/vm2.sock", secret, false); }), 0)
      << "the user's VM was served root's snapshot";
}

// Who asks is who connected, taken when the agent accepted the connection: the groups that let
// a user read a snapshot are those it had then. (They were read from /proc/PID/status when the
// request came: by then the pid could be gone, or another process's, its groups not the peer's.)
// Here the process that connected has exited when its child, holding the connection, asks.
TEST_F(AgentTest, RequesterIsWhoConnected) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root, to connect as another user";
  ASSERT_FALSE(agent_bin().empty());
  constexpr uid_t kNobody = 65534;
  constexpr gid_t kReaders = 4242;  // the store's group, a supplementary group of the peer
  const std::string store = dir_.path() + "/store", vmdir = dir_.path() + "/vms";
  std::filesystem::create_directories(store);
  RAW_IMAGE_AT(image, 1 * kMiB, 63, vm, store + "/vm");
  ASSERT_EQ(::chmod(dir_.path().c_str(), 0711), 0);
  ASSERT_EQ(::chown(store.c_str(), 0, kReaders), 0);
  ASSERT_EQ(::chmod(store.c_str(), 0750), 0);
  std::filesystem::create_directories(vmdir);
  ASSERT_EQ(::chown(vmdir.c_str(), kNobody, kNobody), 0);
  agent::DaemonOptions o;
  o.socket_group = kNobody;
  start_daemon(o);
  int go[2], answer[2];
  ASSERT_EQ(::pipe2(go, O_CLOEXEC), 0);
  ASSERT_EQ(::pipe2(answer, O_CLOEXEC), 0);
  const pid_t connector = ::fork();
  ASSERT_GE(connector, 0);
  if (connector == 0) {
    ::alarm(60);
    ::close(go[1]);
    ::close(answer[0]);
    if (::setgroups(1, &kReaders) != 0 || ::setresgid(kNobody, kNobody, kNobody) != 0 ||
        ::setresuid(kNobody, kNobody, kNobody) != 0)
      _exit(99);
    auto s = agent::connect_unix(socket_);
    if (!s.ok()) _exit(98);
    // A status answered: the agent has accepted the connection.
    capnp::MallocMessageBuilder b;
    auto rq = b.initRoot<proto::agent::Request>();
    rq.setId(1);
    rq.setStatus();
    if (!agent::send_frame_fd(s->get(), b, {}, -1).ok()) _exit(97);
    net::FrameBuffer buf;
    std::deque<sys::UniqueFd> fds;
    for (;;) {
      auto f = buf.next();
      if (!f.ok()) _exit(96);
      if (f->has_value()) break;
      if (!agent::recv_some(s->get(), buf, fds, 10000).ok()) _exit(95);
    }
    buf.consume();
    if (::fork() != 0) _exit(0);  // the connector goes; its child keeps the connection
    char c;
    (void)!::read(go[0], &c, 1);  // until the connector has been reaped
    capnp::MallocMessageBuilder b2;
    auto rq2 = b2.initRoot<proto::agent::Request>();
    rq2.setId(2);
    auto fc = rq2.initServeFirecracker();
    fc.setSocketPath(vmdir + "/vm.sock");
    fc.setSnapshot(vm);
    if (!agent::send_frame_fd(s->get(), b2, {}, -1).ok()) _exit(94);
    for (;;) {
      auto f = buf.next();
      if (!f.ok()) _exit(93);
      if (f->has_value()) {
        auto hd = net::Header::parse((*f)->header);  // holds what the reply reads
        auto reply = (*hd)->root<proto::agent::Reply>();
        const std::string said = reply.isAccepted() ? "accepted" : reply.isError() ? reply.getError().cStr() : "?";
        (void)!::write(answer[1], said.data(), said.size());
        _exit(0);
      }
      if (!agent::recv_some(s->get(), buf, fds, 10000).ok()) _exit(92);
    }
  }
  ::close(go[0]);
  int st = 0;
  ASSERT_EQ(::waitpid(connector, &st, 0), connector);
  ASSERT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0) << st;
  ::close(go[1]);  // the child asks now
  ::close(answer[1]);
  std::string said;
  char chunk[512];
  for (ssize_t n; (n = ::read(answer[0], chunk, sizeof chunk)) > 0;) said.append(chunk, static_cast<size_t>(n));
  ::close(answer[0]);
  EXPECT_EQ(said, "accepted") << "the connector's child was refused (its groups read after the connector had gone)";
}

// Status long polls are limited per user: one user's cannot lock out another's. (The limit was
// global: 1024 waitChange requests of one user, and root's status long poll was refused.)
TEST_F(AgentTest, OneUsersLongPollsLockOutNoOneElse) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root, to connect as another user";
  constexpr uid_t kNobody = 65534;
  ASSERT_EQ(::chmod(dir_.path().c_str(), 0711), 0);  // the socket reachable by that user
  agent::DaemonOptions o;
  o.socket_group = kNobody;
  start_daemon(o);
  auto generation = [&] {
    auto js = agent_query(socket_, false);
    EXPECT_TRUE(js.ok());
    return js.ok() ? nlohmann::json::parse(*js)["generation"].get<uint64_t>() : 0;
  };
  // Another user's 1024 long polls, waiting for a generation that never comes, then a status
  // request: its answer says the agent has handled them all. The child says how many it had
  // refused, and keeps its connection (and the long polls) until we are done.
  constexpr uint64_t kPolls = 1024;
  int told[2], done[2];
  ASSERT_EQ(::pipe2(told, O_CLOEXEC), 0);
  ASSERT_EQ(::pipe2(done, O_CLOEXEC), 0);
  const pid_t kid = ::fork();
  ASSERT_GE(kid, 0);
  if (kid == 0) {
    ::alarm(60);
    ::close(done[1]);  // or it would never see the parent close its end
    ::close(told[0]);
    if (::setgroups(0, nullptr) != 0 || ::setresgid(kNobody, kNobody, kNobody) != 0 ||
        ::setresuid(kNobody, kNobody, kNobody) != 0)
      _exit(99);
    auto s = agent::connect_unix(socket_);
    if (!s.ok()) _exit(98);
    std::vector<std::byte> all;
    for (uint64_t id = 1; id <= kPolls + 1; ++id) {
      capnp::MallocMessageBuilder b;
      auto rq = b.initRoot<proto::agent::Request>();
      rq.setId(id);
      if (id <= kPolls) rq.setWaitChange(~uint64_t{0} - 1);
      else rq.setStatus();
      std::vector<std::byte> frame = net::encode_frame(b, 0);
      all.insert(all.end(), frame.begin(), frame.end());
    }
    // Sent while the replies are read: its refusals could otherwise fill the socket and the agent
    // stop reading, with this one stopped in send().
    ::fcntl(s->get(), F_SETFL, O_NONBLOCK);
    net::FrameBuffer buf;
    std::deque<sys::UniqueFd> fds;
    uint64_t refused = 0;
    size_t sent = 0;
    for (bool answered = false; !answered;) {
      pollfd p{s->get(), static_cast<short>(POLLIN | (sent < all.size() ? POLLOUT : 0)), 0};
      if (::poll(&p, 1, -1) < 0) _exit(97);
      if (p.revents & POLLOUT) {
        ssize_t n = ::send(s->get(), all.data() + sent, all.size() - sent, MSG_NOSIGNAL);
        if (n > 0) sent += static_cast<size_t>(n);
      }
      if (!(p.revents & (POLLIN | POLLHUP))) continue;
      if (!agent::recv_some(s->get(), buf, fds, 0).ok()) _exit(96);
      for (;;) {
        auto f = buf.next();
        if (!f.ok()) _exit(95);
        if (!f->has_value()) break;
        auto hd = net::Header::parse((*f)->header);  // holds what the reply reads
        auto reply = (*hd)->root<proto::agent::Reply>();
        if (reply.getId() == kPolls + 1) answered = true;
        else if (reply.isError()) ++refused;
        buf.consume();
      }
    }
    (void)!::write(told[1], &refused, sizeof refused);
    char c;
    (void)!::read(done[0], &c, 1);  // until the parent closes it
    _exit(0);
  }
  ::close(told[1]);
  ::close(done[0]);
  sys::UniqueFd done_w(done[1]);
  uint64_t refused = 0;
  ASSERT_EQ(::read(told[0], &refused, sizeof refused), static_cast<ssize_t>(sizeof refused));
  ::close(told[0]);
  EXPECT_EQ(refused, kPolls - 256) << "past its own limit, that user's long polls are refused";

  // Root's long poll is taken, and answered once something changes (another client asks for a
  // VM socket of a snapshot that is not there).
  auto root = agent::connect_unix(socket_);
  ASSERT_TRUE(root.ok());
  {
    capnp::MallocMessageBuilder b;
    auto rq = b.initRoot<proto::agent::Request>();
    rq.setId(7);
    rq.setWaitChange(generation());
    ASSERT_TRUE(agent::send_frame_fd(root->get(), b, {}, -1).ok());
  }
  auto other = agent::connect_unix(socket_);
  ASSERT_TRUE(other.ok());
  {
    capnp::MallocMessageBuilder b;
    auto fc = b.initRoot<proto::agent::Request>().initServeFirecracker();
    fc.setSocketPath(dir_.path() + "/vm.sock");
    fc.setSnapshot(dir_.path() + "/no-such-snapshot");
    ASSERT_TRUE(agent::send_frame_fd(other->get(), b, {}, -1).ok());
  }
  net::FrameBuffer buf;
  std::deque<sys::UniqueFd> fds;
  for (;;) {
    auto f = buf.next();
    ASSERT_TRUE(f.ok());
    if (!f->has_value()) {
      ASSERT_TRUE(agent::recv_some(root->get(), buf, fds, 10000).ok()) << "root's long poll was never answered";
      continue;
    }
    auto hd = net::Header::parse((*f)->header);  // holds what the reply reads
    auto reply = (*hd)->root<proto::agent::Reply>();
    ASSERT_EQ(reply.getId(), 7u);
    EXPECT_TRUE(reply.isJson()) << (reply.isError() ? reply.getError().cStr() : "neither json nor an error");
    break;
  }
  done_w = sys::UniqueFd();
  int st = 0;
  ::waitpid(kid, &st, 0);
  EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0) << st;
}

// A damaged chunk restored through the agent (fixture for the next two tests). A child restores
// it with its stderr full (a pipe nobody reads yet: what it says waits in write()) and touches
// the damaged page: it must die of SIGBUS, never read the bad bytes, never hang.
class DamagedChunkTest : public AgentTest {
 protected:
  void SetUp() override {
    AgentTest::SetUp();
    if (IsSkipped()) return;
    if (!kf_.has_uffd_poison()) GTEST_SKIP() << "kernel lacks UFFDIO_POISON (Linux 6.6)";
    loc_ = capture(4 * kMiB, 59);
    auto m = read_manifest(loc_);
    ASSERT_TRUE(m.ok()) << m.error().message();
    const ChunkInfo& c0 = m->regions[0].chunks[0];
    ASSERT_NE(c0.codec, Codec::kZero);
    std::fstream f(loc_ + "/data", std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(c0.offset + c0.stored_length / 2));
    char ch;
    f.get(ch);
    f.seekp(static_cast<std::streamoff>(c0.offset + c0.stored_length / 2));
    f.put(static_cast<char>(ch ^ 0x10));
  }
  void TearDown() override {
    if (stderr_ >= 0) ::close(stderr_);
    if (reader_ > 0) {
      ::kill(reader_, SIGKILL);
      ::waitpid(reader_, nullptr, 0);
    }
    AgentTest::TearDown();
  }

  // Forks the child; stderr_ is the read end of its stderr.
  void start_reader() {
    int err[2];
    ASSERT_EQ(::pipe2(err, O_CLOEXEC), 0);
    reader_ = ::fork();
    ASSERT_GE(reader_, 0);
    if (reader_ == 0) {
      ::dup2(err[1], STDERR_FILENO);
      AgentRestoreOptions o;
      o.prefetch = false;  // the access below is what finds the damage
      auto r = AgentRestore::start(socket_, loc_, o);
      if (!r.ok()) _exit(3);
      volatile const std::byte* got = static_cast<const std::byte*>((*r)->regions()[0].address);
      if (!same(const_cast<const std::byte*>(got), kDefaultChunkSize, 4096)) _exit(4);  // the next chunk is fine
      ::fcntl(STDERR_FILENO, F_SETFL, O_NONBLOCK);
      while (::write(STDERR_FILENO, "................", 16) > 0) {
      }
      ::fcntl(STDERR_FILENO, F_SETFL, 0);
      ::signal(SIGBUS, SIG_DFL);  // sanitizers install their own handler; we want the plain death
      (void)got[0];
      _exit(5);
    }
    ::close(err[1]);
    stderr_ = err[0];
  }

  // Waits (each status change awaited) until the agent reports the chunk failed.
  void await_failure() {
    auto js = agent_query(socket_, false);
    for (bool failed = false; js.ok() && !failed;) {
      auto j = nlohmann::json::parse(*js);
      for (const auto& e : j["sessions"]) failed = failed || e["failed"].get<bool>();
      if (!failed) js = agent_wait_change(socket_, j["generation"].get<uint64_t>(), std::chrono::seconds(30));
    }
    ASSERT_TRUE(js.ok()) << "the agent never reported the damaged chunk: " << js.error().message();
  }

  // The child's end: how it died ("" for SIGBUS), within `within`.
  std::string reader_end(std::chrono::milliseconds within) {
    sys::UniqueFd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, reader_, 0)));
    pollfd p{pidfd.get(), POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(within.count())) != 1) return "still running: a thread was left waiting";
    int status = 0;
    ::waitpid(reader_, &status, 0);
    reader_ = -1;
    if (!WIFSIGNALED(status)) return fmt::format("exited with {}", WEXITSTATUS(status));
    return WTERMSIG(status) == SIGBUS ? "" : fmt::format("died of signal {}", WTERMSIG(status));
  }

  std::string loc_;
  pid_t reader_ = -1;
  int stderr_ = -1;
};

// The process says why on its own stderr, once, before the access dies of SIGBUS, as an
// in-process restore does: the agent holds the poison until the client has said it. Its stderr
// is read only once the agent has failed the chunk and served a whole other restore (its engine
// thread has moved on past the failure, milliseconds ago): a poison that did not wait for the
// line has killed the process by then, not only when its threads happen to run in that order.
// The agent is given far longer than that restore can take to wait for the line (under a
// sanitizer it can take more than the 1 s default), so only a poison that does not wait fails.
TEST_F(DamagedChunkTest, ClientSaysWhyBeforeSigbus) {
  agent::DaemonOptions o;
  o.failure_notice = std::chrono::minutes(2);
  start_daemon(o);
  start_reader();
  await_failure();
  std::string other = capture(1 * kMiB, 60, "other");
  EXPECT_EQ(restore_in_child(other), 0);
  std::string said;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(stderr_, buf, sizeof buf)) > 0) said.append(buf, static_cast<size_t>(n));
  said.erase(0, said.find_first_not_of('.'));
  EXPECT_EQ(reader_end(std::chrono::seconds(30)), "") << said;
  const std::string line = "; failing accesses to the pages that could not be had";
  size_t at = said.find(line);
  EXPECT_NE(at, std::string::npos) << "nothing said before SIGBUS: " << said;
  EXPECT_EQ(said.find(line, at + 1), std::string::npos) << "said more than once: " << said;
  EXPECT_NE(said.find("session " + loc_ + ": lazymem-agent: "), std::string::npos) << said;
}

// A restore whose prefetch meets the damaged chunk ends with every page present or poisoned:
// the agent lets the session go, and remembers it as failed, not complete (its log says so too).
TEST_F(DamagedChunkTest, ARestoreThatEndsFailedIsRememberedFailed) {
  start_daemon();
  int go[2];
  ASSERT_EQ(::pipe2(go, O_CLOEXEC), 0);
  pid_t kid = ::fork();
  ASSERT_GE(kid, 0);
  if (kid == 0) {
    ::close(go[1]);
    auto r = AgentRestore::start(socket_, loc_, {});  // prefetch on: it finds the damage
    char c;
    _exit(r.ok() && ::read(go[0], &c, 1) == 0 ? 0 : 3);  // alive until told, touching nothing
  }
  ::close(go[0]);
  sys::UniqueFd release(go[1]);
  std::string state;
  auto js = agent_query(socket_, true);
  while (js.ok() && state.empty()) {
    auto j = nlohmann::json::parse(*js);
    for (const auto& e : j["sessions"]) {
      if (e["pid"].get<int>() == kid && e["complete"].get<bool>()) state = e["state"].get<std::string>();
    }
    if (state.empty()) js = agent_wait_change(socket_, j["generation"].get<uint64_t>(), std::chrono::seconds(30));
  }
  ASSERT_TRUE(js.ok()) << "the session never ended: " << js.error().message();
  EXPECT_EQ(state, "failed");
  release.reset();
  int status = 0;
  ASSERT_EQ(::waitpid(kid, &status, 0), kid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child status " << status;
}

// A client that never says it (stuck writing to a stderr nobody reads) does not keep its
// faulting thread waiting: the agent poisons the pages after a bounded wait (the default's).
TEST_F(DamagedChunkTest, ClientThatNeverSaysIsNotLeftHanging) {
  start_daemon();
  start_reader();
  await_failure();
  EXPECT_EQ(reader_end(std::chrono::seconds(30)), "");
}

}  // namespace
}  // namespace lazymem
