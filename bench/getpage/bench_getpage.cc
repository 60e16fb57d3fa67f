// lazymem-bench-getpage: what asking a page server for one page costs beyond the network, for
// work on the datagram path (docs/design-notes.md, "getPage by datagram"). The page server's
// getPage by datagram (RemotePageFetcher::fetch: request, server, reply, verified decode) next to
// a plain UDP round trip of the same sizes with a server that polls as the page server does
// (100 us after each request, then blocks), in alternating blocks from the same thread: this
// machine drifts, and a fault's other costs (trap, install) are not here to hide the difference.
// Servers on the last CPU, the client on CPU 0; every fetched page is compared with the original.
#include <netinet/in.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <random>

#include "cli/options.h"
#include "../common/bench_util.h"
#include "../common/loopback.h"
#include "../common/page_server_proc.h"
#include "net/remote.h"
#include "snapshot/chunk_source.h"
#include "sys/clock.h"
#include "sys/cpu_latency.h"

namespace po = boost::program_options;
using namespace lazymem::bench;

namespace {

constexpr size_t kBlock = 200;
constexpr int64_t kPollNs = 100'000;  // as ServerOptions::poll_after_page

// A UDP echo: the first 4 bytes of a request say how many to send back. It polls for 100 us
// after each request, then blocks, as the page server does.
[[noreturn]] void serve_udp_echo(int fd) {
  (void)::prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlives the bench
  pin_to(server_cpu());
  char buf[65536] = {};
  int64_t last = 0;
  for (;;) {
    sockaddr_storage from{};
    socklen_t len = sizeof from;
    const bool poll = lazymem::sys::monotonic_ns() - last < kPollNs;
    ssize_t n = ::recvfrom(fd, buf, sizeof buf, poll ? MSG_DONTWAIT : 0, reinterpret_cast<sockaddr*>(&from), &len);
    if (n < 4) continue;
    last = lazymem::sys::monotonic_ns();
    uint32_t want = 0;
    std::memcpy(&want, buf, 4);
    (void)::sendto(fd, buf, std::min<size_t>(want, sizeof buf), 0, reinterpret_cast<sockaddr*>(&from), len);
  }
}

}  // namespace

static int run_bench(int argc, char** argv) {
  po::options_description desc("lazymem-bench-getpage [options]");
  desc.add_options()("json", "also print one JSON object on the last line")(
      "mib", po::value<size_t>()->default_value(256), "heap-like snapshot in MiB")(
      "blocks", po::value<int>()->default_value(40), "blocks of 200 fetches and 200 round trips")(
      "dir", po::value<std::string>()->default_value("/var/tmp"), "where to put the store");
  auto vm = lazymem::cli::parse({argv + 1, argv + argc}, desc);
  const size_t len = vm["mib"].as<size_t>() << 20;
  const int blocks = vm["blocks"].as<int>();
  const std::string work = make_work_dir(vm["dir"].as<std::string>(), "getpage",
                                         {{"mib", static_cast<long>(len >> 20)}, {"blocks", blocks}});
  MadeSnapshot made = make_heap_snapshot(work + "/store/heap", len);
  if (!made.ok) {
    std::cerr << "lazymem-bench-getpage: could not build the snapshot in " << work << "\n";
    std::filesystem::remove_all(work);
    return 1;
  }
  // The same heap, to check every fetched page against (the fill is deterministic).
  std::vector<std::byte> heap(len);
  lazymem::example::KvTable(heap.data(), len).fill(7, 0.7);

  // Servers first, while this process has no threads.
  const PageServerProc server = spawn_page_server(work + "/store");
  const pid_t ps = server.pid;
  const uint16_t port = server.port;
  int udp = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t alen = sizeof a;
  ::bind(udp, reinterpret_cast<sockaddr*>(&a), sizeof a);
  ::getsockname(udp, reinterpret_cast<sockaddr*>(&a), &alen);
  pid_t es = ::fork();
  if (es == 0) serve_udp_echo(udp);
  ::close(udp);
  auto stop = [&] {
    for (pid_t p : {ps, es}) {
      ::kill(p, SIGKILL);
      ::waitpid(p, nullptr, 0);
    }
    std::filesystem::remove_all(work);
  };

  pin_to(0);
  lazymem::sys::CpuLatencyHold quick_wakeups;  // as a restore holds while faults come
  (void)quick_wakeups.set(true);
  auto loc = lazymem::SnapshotLocation::parse("lazymem://127.0.0.1:" + std::to_string(port) + "/heap");
  auto src = port && loc.ok() ? lazymem::net::open_remote_source(*loc, {}) : lazymem::Error(lazymem::Errc::kIo, "no page server");
  auto fetcher = src.ok() ? (*src)->open_page_fetcher() : std::move(src).error();
  int echo = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (!fetcher.ok() || ::connect(echo, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    std::cerr << "lazymem-bench-getpage: " << (fetcher.ok() ? std::strerror(errno) : fetcher.error().message()) << "\n";
    stop();
    return 1;
  }
  const lazymem::Manifest& m = (*src)->manifest();
  std::vector<uint32_t> framed;  // chunks stored as page frames: their pages come by datagram
  for (uint32_t c = 0; c < m.regions[0].chunks.size(); ++c)
    if (m.regions[0].chunks[c].codec == lazymem::Codec::kZstdPages) framed.push_back(c);
  if (framed.empty()) {
    std::cerr << "lazymem-bench-getpage: the snapshot has no page-frame chunks\n";
    stop();
    return 1;
  }
  const uint32_t pages_per_chunk = m.chunk_size / kPage;
  std::vector<std::byte> out(kPage);
  bool wrong = false;
  auto fetch = [&](uint32_t c, uint32_t p) {
    auto r = (*fetcher)->fetch({0, c}, p, out, lazymem::sys::monotonic_ns() + 1'000'000'000);
    wrong |= r != lazymem::snapshot::PageFetcher::Outcome::kOk ||
             std::memcmp(out.data(), heap.data() + size_t{c} * m.chunk_size + size_t{p} * kPage, kPage) != 0;
  };
  // Every chunk once first: the server has read and checked them all, as after a restore's
  // first touches (disk reads are not what this measures).
  for (uint32_t c : framed) fetch(c, 0);
  uint64_t received = 0, fetches = 0, by_datagram = 0;
  std::mt19937_64 rng(3);
  std::vector<double> lf, le;
  char rq[160] = {};
  std::vector<char> reply(65536);
  for (int b = 0; b < blocks && !wrong; ++b) {
    for (size_t i = 0; i < kBlock; ++i) {
      uint32_t c = framed[rng() % framed.size()], p = static_cast<uint32_t>(rng() % pages_per_chunk);
      auto t = Clock::now();
      fetch(c, p);
      lf.push_back(since(t) * 1e6);
      if ((*fetcher)->datagrams().answered) {  // sizes of datagram replies only
        received += (*fetcher)->received();
        ++by_datagram;
      }
      ++fetches;
    }
    if (by_datagram == 0) break;
    pause_ms(1);  // the page server stops polling before the echo server starts
    // The same sizes: a request of a getPage's ~150 bytes, a reply of what a fetch received.
    // Waited for as the fetcher waits: spinning 50 us, then in poll(); lost after a second.
    const uint32_t want = static_cast<uint32_t>(received / by_datagram);
    std::memcpy(rq, &want, sizeof want);
    for (size_t i = 0; i < kBlock && !wrong; ++i) {
      auto t = Clock::now();
      wrong |= ::send(echo, rq, sizeof rq - 10, 0) < 0;
      while (!wrong && ::recv(echo, reply.data(), reply.size(), MSG_DONTWAIT) <= 0) {
        if (since(t) < 50e-6) continue;
        pollfd p{echo, POLLIN, 0};
        wrong |= ::poll(&p, 1, 1000) != 1;
      }
      le.push_back(since(t) * 1e6);
    }
    pause_ms(1);
  }
  stop();
  if (wrong || by_datagram * 10 < fetches * 9) {
    std::cerr << "lazymem-bench-getpage: " << (wrong ? "a fetch failed or gave WRONG bytes, or the echo went silent"
                                                        : "most pages did not come by datagram")
              << "\n";
    return 1;
  }
  const double f50 = percentile(lf, 50), e50 = percentile(le, 50), bytes = double(received) / double(by_datagram);
  std::printf("lazymem-bench-getpage: %zu MiB heap-like snapshot (zstd-1, %.2fx), page server on loopback, %d blocks of "
              "%zu, every page checked\n\n",
              len >> 20, made.ratio, blocks, kBlock);
  std::printf("%-44s %7.1f us p50 %7.1f us p99  (%.0f bytes received; %.1f%% by datagram)\n",
              "getPage by datagram, fetched and decoded", f50, percentile(lf, 99), bytes,
              100.0 * double(by_datagram) / double(fetches));
  std::printf("%-44s %7.1f us p50 %7.1f us p99\n", "plain UDP round trip, same sizes", e50, percentile(le, 99));
  std::printf("\ngetPage is %.2fx the round trip, %.1f us more (server work, client framing, the page's decode)\n",
              f50 / e50, f50 - e50);
  if (vm.count("json")) {
    nlohmann::json j{{"mib", len >> 20},          {"blocks", blocks},     {"getpage_p50_us", f50},
                     {"getpage_p99_us", percentile(lf, 99)}, {"udp_rtt_p50_us", e50}, {"udp_rtt_p99_us", percentile(le, 99)},
                     {"bytes_per_fetch", bytes}, {"getpage_vs_udp_rtt", f50 / e50}};
    std::printf("%s\n", j.dump().c_str());
  }
  return 0;
}

int main(int argc, char** argv) {
  return lazymem::cli::run("lazymem-bench-getpage", "", [&] { return run_bench(argc, argv); });
}
