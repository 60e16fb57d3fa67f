// lazymem-bench-list: what `list` requests cost a page server's loop, for work on the listing
// (docs/design-notes.md, "The listing"). A store of --snapshots copies of one heap snapshot; one
// client asks for one cached chunk at a time (a restore's fault) alone, then again while a
// second client sends list requests back to back (one in flight, as `ls --server` in a loop
// does). Prints the chunk round trip alone and under the lists (the ratio is what the lists
// cost everyone else) and a list's own round trip. Server on the last CPU, clients on CPU 0.
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <thread>

#include "cli/options.h"
#include "../common/bench_util.h"
#include "../common/loopback.h"
#include "../common/page_server_proc.h"
#include "net/client.h"
#include "net/frame.h"
#include "wire.capnp.h"

namespace po = boost::program_options;
using namespace lazymem::bench;
namespace wire = lazymem::proto::wire;

namespace {

auto deadline() { return Clock::now() + std::chrono::seconds(30); }

// A connection to the server, past its hello (no token).
struct Client {
  lazymem::sys::UniqueFd fd;
  lazymem::net::FrameBuffer in;
  uint64_t next_id = 1;

  bool open(uint16_t port) {
    auto d = lazymem::net::dial("127.0.0.1", port, deadline());
    if (!d.ok()) return false;
    fd = std::move(*d);
    return ask([](wire::Request::Builder rq) {
      auto h = rq.initHello();
      h.setVersion(wire::PROTOCOL_VERSION);
      const std::array<kj::byte, 32> nonce{};
      h.setClientNonce(capnp::Data::Reader(nonce.data(), nonce.size()));
    }) == wire::Reply::HELLO;
  }
  // Sends one request and waits for its reply; what the reply is (ERROR on no reply).
  template <typename Fill>
  wire::Reply::Which ask(Fill fill) {
    capnp::MallocMessageBuilder m;
    auto rq = m.initRoot<wire::Request>();
    rq.setId(next_id++);
    fill(rq);
    if (!lazymem::net::send_frame(fd.get(), m, {}, deadline()).ok()) return wire::Reply::ERROR;
    auto f = lazymem::net::recv_frame(fd.get(), in, deadline());
    if (!f.ok()) return wire::Reply::ERROR;
    return f->header->root<wire::Reply>().which();
  }
};

struct Latency {
  double p50 = 0, p99 = 0, max = 0;
};

Latency summarize(std::vector<double> us) {
  Latency l{percentile(us, 50), percentile(us, 99), 0};
  for (double v : us) l.max = std::max(l.max, v);
  return l;
}

}  // namespace

static int run_bench(int argc, char** argv) {
  po::options_description desc("lazymem-bench-list [options]");
  desc.add_options()("json", "also print one JSON object on the last line")(
      "snapshots", po::value<int>()->default_value(100), "snapshots in the store")(
      "mib", po::value<size_t>()->default_value(4), "size of each (a heap-like snapshot, 64 KiB chunks)")(
      "rounds", po::value<int>()->default_value(5000), "chunk round trips, alone and under the lists")(
      "lists", po::value<int>()->default_value(200), "list round trips timed alone")(
      "dir", po::value<std::string>()->default_value("/var/tmp"), "where to put the store");
  auto vm = lazymem::cli::parse({argv + 1, argv + argc}, desc);
  const int snapshots = vm["snapshots"].as<int>(), rounds = vm["rounds"].as<int>(), lists = vm["lists"].as<int>();
  const size_t len = vm["mib"].as<size_t>() << 20;
  const std::string work = make_work_dir(vm["dir"].as<std::string>(), "list",
                                         {{"snapshots", snapshots}, {"mib", static_cast<long>(len >> 20)},
                                          {"rounds", rounds}, {"lists", lists}});
  const std::string store = work + "/store";
  if (!make_heap_snapshot(store + "/s0000", len).ok) {
    std::cerr << "lazymem-bench-list: could not build the snapshot in " << work << "\n";
    std::filesystem::remove_all(work);
    return 1;
  }
  for (int i = 1; i < snapshots; ++i) {
    char name[32];
    std::snprintf(name, sizeof name, "/s%04d", i);
    std::filesystem::copy(store + "/s0000", store + name);
  }

  // The server first, while this process has no threads.
  const PageServerProc server = spawn_page_server(store);
  const pid_t ps = server.pid;
  const uint16_t port = server.port;
  auto stop = [&] {
    ::kill(ps, SIGKILL);
    ::waitpid(ps, nullptr, 0);
    std::filesystem::remove_all(work);
  };
  pin_to(0);

  auto get_chunk = [](wire::Request::Builder rq) {
    auto gc = rq.initGetChunks();
    gc.setSnapshot("s0000");
    gc.setDemand(true);
    auto c = gc.initChunks(1)[0];
    c.setRegion(0);
    c.setChunk(0);
    c.setTag(1);
  };
  auto list = [](wire::Request::Builder rq) { rq.setList(); };
  Client faults, lister;
  if (!port || !faults.open(port) || !lister.open(port) || faults.ask(get_chunk) != wire::Reply::CHUNK ||
      lister.ask(list) != wire::Reply::SNAPSHOTS) {
    std::cerr << "lazymem-bench-list: the page server did not answer\n";
    stop();
    return 1;
  }
  auto chunk_round_trips = [&] {
    std::vector<double> us;
    us.reserve(static_cast<size_t>(rounds));
    for (int i = 0; i < rounds; ++i) {
      auto t = Clock::now();
      if (faults.ask(get_chunk) != wire::Reply::CHUNK) return std::vector<double>{};
      us.push_back(since(t) * 1e6);
    }
    return us;
  };
  // A list alone, start to answer.
  std::vector<double> list_us;
  for (int i = 0; i < lists; ++i) {
    auto t = Clock::now();
    if (lister.ask(list) != wire::Reply::SNAPSHOTS) break;
    list_us.push_back(since(t) * 1e6);
  }
  const auto alone = chunk_round_trips();
  std::atomic<bool> done{false};
  std::atomic<uint64_t> listed{0};
  std::thread flood([&] {
    while (!done.load() && lister.ask(list) == wire::Reply::SNAPSHOTS) listed.fetch_add(1);
  });
  const auto t_under = Clock::now();
  const auto under = chunk_round_trips();
  const double under_s = since(t_under);
  done = true;
  flood.join();
  stop();
  if (alone.empty() || under.empty() || list_us.size() != static_cast<size_t>(lists)) {
    std::cerr << "lazymem-bench-list: a request failed\n";
    return 1;
  }
  const Latency a = summarize(alone), u = summarize(under), l = summarize(list_us);
  std::printf("store: %d snapshots of %zu MiB; %d chunk round trips each way\n", snapshots, len >> 20, rounds);
  std::printf("%-36s %10s %10s %10s\n", "", "p50 us", "p99 us", "max us");
  std::printf("%-36s %10.1f %10.1f %10.1f\n", "list, alone", l.p50, l.p99, l.max);
  std::printf("%-36s %10.1f %10.1f %10.1f\n", "chunk, alone", a.p50, a.p99, a.max);
  std::printf("%-36s %10.1f %10.1f %10.1f\n", "chunk, another client listing", u.p50, u.p99, u.max);
  std::printf("%-36s %10.2fx %9.2fx %9.2fx\n", "chunk under lists / alone", u.p50 / a.p50, u.p99 / a.p99, u.max / a.max);
  std::printf("lists answered meanwhile: %llu (%.0f/s)\n", static_cast<unsigned long long>(listed.load()),
              static_cast<double>(listed.load()) / under_s);
  if (vm.count("json")) {
    nlohmann::json j{{"snapshots", snapshots}, {"mib", len >> 20},
                     {"list_us", {{"p50", l.p50}, {"p99", l.p99}, {"max", l.max}}},
                     {"chunk_alone_us", {{"p50", a.p50}, {"p99", a.p99}, {"max", a.max}}},
                     {"chunk_under_lists_us", {{"p50", u.p50}, {"p99", u.p99}, {"max", u.max}}},
                     {"lists_per_s", static_cast<double>(listed.load()) / under_s}};
    std::cout << j.dump() << "\n";
  }
  return 0;
}

int main(int argc, char** argv) {
  return lazymem::cli::run("lazymem-bench-list", "", [&] { return run_bench(argc, argv); });
}
