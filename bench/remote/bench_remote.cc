// lazymem-bench-remote: restores from a page server on loopback against the baselines, in one
// run: remote lazy (prefetch) vs local lazy vs eager download (fetch all, decompress, touch);
// single-fault latency (prefetch off, random chunks), served by the restore's handler thread and
// by the faulting thread itself (RestoreOptions::fault_on_thread), each next to a plain TCP round
// trip of the payload it receives per fault (across CPUs, as between hosts; the faulting thread's
// measured between its own faults, as the machine drifts); page-server CPU per
// GiB served next to a read()+send() server. Every server is its own process, as in production;
// every restore checks every byte.
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "cli/options.h"
#include "../common/bench_util.h"
#include "../common/loopback.h"
#include "core/log.h"
#include "lazymem/restore.h"
#include "page_server.h"
#include "snapshot/snapshot_reader.h"
#include "sys/cpu_latency.h"

namespace po = boost::program_options;
using namespace lazymem::bench;

namespace {

// What a server process has used so far: CPU seconds of every thread (io_uring workers
// included) and bytes of chunk payload sent.
struct ServerReport {
  double cpu_s = 0;
  uint64_t bytes = 0;
};

double cpu_seconds() {
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  return double(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) + double(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

// A server process: started with fork(), reports its port, serves until SIGTERM. On request
// (sample()) it reports its CPU and bytes so far, so the parent can bracket one client run.
struct ServerProc {
  pid_t pid = -1;
  uint16_t port = 0;
  int ctl_fd = -1;     // parent -> child: one byte per sample request
  int report_fd = -1;  // child -> parent: a ServerReport per request

  ServerReport sample() const {
    ServerReport r;
    char c = 's';
    if (::write(ctl_fd, &c, 1) != 1 || ::read(report_fd, &r, sizeof r) != sizeof r) r = {};
    return r;
  }
  void stop() {
    ::kill(pid, SIGTERM);
    ::close(ctl_fd);  // the sampler thread sees EOF
    ::close(report_fd);
    ::waitpid(pid, nullptr, 0);
  }
};

// Child-side state the sampler thread reads while the serving thread runs.
struct Served {
  std::atomic<uint64_t> bytes{0};                                      // the plain servers count here
  std::atomic<const lazymem::pageserver::PageServer*> server{nullptr};  // the page server counts itself
  uint64_t get() const {
    const auto* s = server.load();
    return s ? s->stats().bytes : bytes.load();
  }
};

volatile sig_atomic_t g_stop = 0;
std::atomic<lazymem::pageserver::PageServer*> g_server{nullptr};  // for the signal handler
void on_term(int) {
  g_stop = 1;
  if (auto* s = g_server.load()) s->stop();  // writes an eventfd: async-signal-safe
}

// Forks a server. serve(ready_fd, served) must write the port to ready_fd, then serve until
// g_stop. Call before this process starts any thread (see docs/design-notes.md, forking).
template <typename Serve>
ServerProc spawn_server(Serve&& serve) {
  int ready[2], ctl[2], report[2];
  if (::pipe(ready) != 0 || ::pipe(ctl) != 0 || ::pipe(report) != 0) return {};
  pid_t pid = ::fork();
  if (pid == 0) {
    ::close(ready[0]);
    ::close(ctl[1]);
    ::close(report[0]);
    struct sigaction sa {};
    sa.sa_handler = on_term;  // no SA_RESTART: a blocked accept() returns and sees g_stop
    ::sigaction(SIGTERM, &sa, nullptr);
    lazymem::log::set_level("warn");
    static Served served;  // outlives the detached sampler (the child ends with _exit)
    // The sampler blocks SIGTERM so that the signal interrupts the serving thread.
    sigset_t term, old;
    sigemptyset(&term);
    sigaddset(&term, SIGTERM);
    ::pthread_sigmask(SIG_BLOCK, &term, &old);
    std::thread([ctl = ctl[0], rep = report[1]] {
      char c;
      while (::read(ctl, &c, 1) == 1) {
        ServerReport r{cpu_seconds(), served.get()};
        if (::write(rep, &r, sizeof r) != sizeof r) break;
      }
    }).detach();
    ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
    serve(ready[1], served);
    _exit(0);
  }
  ::close(ready[1]);
  ::close(ctl[0]);
  ::close(report[1]);
  ServerProc s;
  s.pid = pid;
  s.ctl_fd = ctl[1];
  s.report_fd = report[0];
  if (::read(ready[0], &s.port, sizeof s.port) != sizeof s.port) s.port = 0;
  ::close(ready[0]);
  return s;
}

// The baseline server: for each request {u64 offset, u32 length} it pread()s the bytes from
// the data file and send()s them back. One client at a time, like the echo below.
void serve_read_send(int ready_fd, Served& served, const std::string& data_file) {
  uint16_t port;
  int lfd = listen_loopback(port);
  (void)!::write(ready_fd, &port, sizeof port);
  int dfd = ::open(data_file.c_str(), O_RDONLY | O_CLOEXEC);
  std::vector<char> buf(4 << 20);
  while (!g_stop) {
    int c = ::accept(lfd, nullptr, nullptr);
    if (c < 0) continue;
    int one = 1;
    ::setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct {
      uint64_t off;
      uint32_t len;
    } __attribute__((packed)) rq;
    while (read_full(c, &rq, sizeof rq)) {
      if (rq.len > buf.size()) break;
      ssize_t n = ::pread(dfd, buf.data(), rq.len, static_cast<off_t>(rq.off));
      if (n != static_cast<ssize_t>(rq.len) || !write_full(c, buf.data(), rq.len)) break;
      served.bytes += rq.len;
    }
    ::close(c);
  }
}

// A plain TCP round trip: 32 bytes out (the first 4: how many to send back, at most
// `max_payload`), that many bytes back. The server stays on one CPU, so a
// client can measure the round trip across CPUs (as between hosts, where there is no shared
// CPU) and on the same CPU (the scheduler's best case on loopback).
void serve_echo(int ready_fd, uint32_t max_payload) {
  pin_to(server_cpu());
  uint16_t port;
  int lfd = listen_loopback(port);
  (void)!::write(ready_fd, &port, sizeof port);
  std::vector<char> buf(max_payload, 'x');
  char rq[32];
  uint32_t n = 0;
  while (!g_stop) {
    int c = ::accept(lfd, nullptr, nullptr);
    if (c < 0) continue;
    int one = 1;
    ::setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    while (read_full(c, rq, sizeof rq) && (std::memcpy(&n, rq, sizeof n), write_full(c, buf.data(), std::min<size_t>(n, buf.size())))) {
    }
    ::close(c);
  }
}

struct Run {
  double seconds = 0;
  double p50_us = 0, p99_us = 0;
  uint64_t hash = 0;  // restores: xxh3 of every byte of the region, after timing
  int restored = 0;   // 1: a restore, whose hash must match the captured memory
  int ok = 0;
  double bytes_per_fault = 0;  // fault latency runs: what each fault received from the server
  double rtt_p50_us = 0;       // interleaved with the faults: a round trip of what a fault received
  double rtt_page_p50_us = 0;  // and of a 4 KiB page
};

Run lazy_touch_all(const std::string& loc, size_t len) {
  Run out;
  auto t0 = Clock::now();
  auto r = lazymem::LazyRestore::start(loc);
  if (!r.ok()) {
    std::fprintf(stderr, "%s: %s\n", loc.c_str(), r.error().message().c_str());
    return out;
  }
  auto* p = static_cast<const unsigned char*>((*r)->regions()[0].address);
  (void)touch_all(p, len);
  out.seconds = since(t0);
  out.hash = XXH3_64bits(p, len);
  out.restored = 1;
  out.ok = (*r)->finish().ok();
  return out;
}

Run eager_download(const std::string& loc, size_t len) {
  Run out;
  auto t0 = Clock::now();
  auto r = lazymem::restore_eager(loc);
  if (!r.ok()) return out;
  auto* p = static_cast<const unsigned char*>((*r)[0].address);
  (void)touch_all(p, len);
  out.seconds = since(t0);
  out.hash = XXH3_64bits(p, len);
  out.restored = 1;
  out.ok = 1;
  return out;
}

// One plain round trip on `fd` (32 bytes out, `payload` back); microseconds, or -1 on failure.
double round_trip_us(int fd, uint32_t payload, std::vector<char>& buf) {
  char rq[32] = {};
  std::memcpy(rq, &payload, sizeof payload);
  if (buf.size() < payload) buf.resize(payload);
  auto t = Clock::now();
  if (!write_full(fd, rq, sizeof rq) || !read_full(fd, buf.data(), payload)) return -1;
  return since(t) * 1e6;
}

// Times `faults` single faults, each on a random page of a different stored chunk (a zero
// chunk is installed without a fetch), then touches the rest and checks every byte. The faults
// are served by the restore's handler thread, or (on_thread) by the faulting thread itself.
//
// With `echo_port`, the fault's baselines are measured interleaved with the faults, from the
// same thread: blocks of kBlock faults, kBlock plain round trips bringing back as many bytes as
// a fault received (learnt from the first block), kBlock round trips of a 4 KiB page, and so on.
// This machine drifts (a round trip measured 17, 21 and 31 us within a minute), so baselines
// measured seconds apart from the faults compared the fault with another machine. Between
// blocks the thread pauses 1 ms: the page server stops polling for requests (it would take the
// echo server's CPU) and each block starts from idle servers alike.
Run fault_latency(const std::string& loc, size_t len, int faults, const lazymem::Manifest& m, bool on_thread,
                  uint16_t echo_port = 0) {
  Run out;
  // The faulting thread does the round trip itself: placed as the round trip's client is (off
  // the server's CPU, as between hosts). The handler-thread path is left to the scheduler: its
  // engine and decode threads need the CPUs too (pinning it all to one measured worse).
  if (on_thread) pin_to(server_cpu() > 0 ? 0 : server_cpu());
  // The CPU latency request a restore holds while faults come (sys/cpu_latency.h), held for the
  // round trips between them too.
  lazymem::sys::CpuLatencyHold quick_wakeups;
  (void)quick_wakeups.set(echo_port != 0);
  lazymem::RestoreOptions o;
  o.prefetch = false;
  o.fault_on_thread = on_thread;
  auto r = lazymem::LazyRestore::start(loc, o);
  if (!r.ok()) return out;
  int echo = echo_port != 0 ? dial_loopback(echo_port) : -1;
  if (echo_port != 0 && echo < 0) return out;
  auto* p = static_cast<const unsigned char*>((*r)->regions()[0].address);
  std::mt19937_64 rng(5);
  std::vector<size_t> order;
  for (size_t i = 0; i < m.regions[0].chunks.size(); ++i)
    if (m.regions[0].chunks[i].stored_length != 0 && (i + 1) * m.chunk_size <= len) order.push_back(i);
  std::shuffle(order.begin(), order.end(), rng);
  if (order.size() > static_cast<size_t>(faults)) order.resize(static_cast<size_t>(faults));
  std::vector<double> lat, rtt, rtt_page;
  lat.reserve(order.size());
  std::vector<char> buf;
  uint32_t payload = 0;
  volatile const unsigned char* vp = p;
  const size_t pages_per_chunk = m.chunk_size / kPage;
  constexpr size_t kBlock = 200;
  for (size_t i = 0; i < order.size(); ++i) {
    size_t off = order[i] * m.chunk_size + (rng() % pages_per_chunk) * kPage;
    auto t = Clock::now();
    (void)vp[off];
    lat.push_back(since(t) * 1e6);
    if (echo < 0 || ((i + 1) % kBlock != 0 && i + 1 != order.size())) continue;
    if (payload == 0) {
      lazymem::RegionStats st = (*r)->stats().total();
      payload = static_cast<uint32_t>(st.faults ? (st.bytes_fetched + st.faults / 2) / st.faults : 0);
      if (payload == 0) return out;
    }
    for (auto [size, into] : {std::pair{payload, &rtt}, std::pair{static_cast<uint32_t>(kPage), &rtt_page}}) {
      pause_ms(1);
      for (size_t k = 0; k < kBlock; ++k) {
        double us = round_trip_us(echo, size, buf);
        if (us < 0) return out;
        into->push_back(us);
      }
    }
    pause_ms(1);
  }
  if (echo >= 0) ::close(echo);
  out.p50_us = percentile(lat, 50);
  out.p99_us = percentile(lat, 99);
  if (!rtt.empty()) {
    out.rtt_p50_us = percentile(rtt, 50);
    out.rtt_page_p50_us = percentile(rtt_page, 50);
  }
  lazymem::RegionStats st = (*r)->stats().total();
  out.bytes_per_fault = st.faults ? static_cast<double>(st.bytes_fetched) / static_cast<double>(st.faults) : 0;
  (void)touch_all(p, len);
  out.hash = XXH3_64bits(p, len);
  out.restored = 1;
  out.ok = (*r)->finish().ok() && !lat.empty();
  return out;
}

Run plain_rtt(uint16_t port, uint32_t payload, int n, int cpu) {
  pin_to(cpu);
  // The same CPU latency request a restore holds (sys/cpu_latency.h), so the baseline gets the
  // same quick wake-ups as the fault path it is compared with.
  lazymem::sys::CpuLatencyHold quick_wakeups;
  (void)quick_wakeups.set(true);
  Run out;
  int fd = dial_loopback(port);
  if (fd < 0) return out;
  std::vector<char> buf;
  std::vector<double> lat;
  for (int i = 0; i < n; ++i) {
    double us = round_trip_us(fd, payload, buf);
    if (us < 0) return out;
    lat.push_back(us);
  }
  ::close(fd);
  out.p50_us = percentile(lat, 50);
  out.p99_us = percentile(lat, 99);
  out.ok = 1;
  return out;
}

// Fetches every stored chunk once through the read()+send() server.
Run fetch_all_baseline(uint16_t port, const lazymem::Manifest& m) {
  Run out;
  int fd = dial_loopback(port);
  if (fd < 0) return out;
  std::vector<char> buf(m.chunk_size);
  auto t0 = Clock::now();
  for (const auto& c : m.regions[0].chunks) {
    if (c.stored_length == 0) continue;
    struct {
      uint64_t off;
      uint32_t len;
    } __attribute__((packed)) rq{c.offset, c.stored_length};
    if (!write_full(fd, &rq, sizeof rq) || !read_full(fd, buf.data(), c.stored_length)) return out;
  }
  out.seconds = since(t0);
  ::close(fd);
  out.ok = 1;
  return out;
}

}  // namespace

static int run_bench(int argc, char** argv) {
  po::options_description desc("lazymem-bench-remote [options]");
  desc.add_options()("json", "also print one JSON object on the last line")(
      "mib", po::value<size_t>()->default_value(1024), "snapshot size in MiB")(
      "rounds", po::value<int>()->default_value(3), "runs of each mode (median reported)")(
      "faults", po::value<int>()->default_value(2000), "single faults timed per latency run")(
      "chunk-kib", po::value<uint32_t>()->default_value(64), "snapshot chunk size (smaller: faster faults, less compression)")(
      "dir", po::value<std::string>()->default_value("/var/tmp"), "where to put the store");
  auto vm = lazymem::cli::parse({argv + 1, argv + argc}, desc);
  const size_t len = vm["mib"].as<size_t>() << 20;
  const int rounds = vm["rounds"].as<int>(), faults = vm["faults"].as<int>();
  const std::string work = make_work_dir(vm["dir"].as<std::string>(), "remote",
                                         {{"mib", static_cast<long>(len >> 20)}, {"rounds", rounds}, {"faults", faults}});
  const std::string local = work + "/store/heap";
  MadeSnapshot made = make_heap_snapshot(local, len, "", lazymem::cli::chunk_bytes(vm, "chunk-kib"));
  auto manifest = lazymem::read_manifest(local);
  if (!made.ok || !manifest.ok()) {
    std::fprintf(stderr, "lazymem-bench-remote: could not build the snapshot in %s\n", work.c_str());
    std::filesystem::remove_all(work);
    return 1;
  }
  uint32_t avg_chunk = static_cast<uint32_t>(made.stored / std::max<uint64_t>(1, made.chunks));

  // Servers first, while this process has no threads.
  auto page_server = [&](bool datagrams) {
    return [&, datagrams](int ready, Served& served) {
      lazymem::pageserver::ServerOptions o;
      o.store_dir = work + "/store";
      o.host = "127.0.0.1";
      o.port = 0;
      o.datagrams = datagrams;
      auto s = lazymem::pageserver::PageServer::listen(o);
      if (!s.ok()) {
        std::fprintf(stderr, "page server: %s\n", s.error().message().c_str());
        return;
      }
      g_server = s->get();
      served.server = s->get();
      uint16_t port = (*s)->port();
      (void)!::write(ready, &port, sizeof port);
      if (!g_stop) (void)(*s)->run();
      g_server = nullptr;
      served.bytes = (*s)->stats().bytes;
      served.server = nullptr;
    };
  };
  ServerProc ps = spawn_server(page_server(true));
  // The same without datagrams: faults on the faulting thread then ask on the TCP connection.
  ServerProc ps_stream = spawn_server(page_server(false));
  ServerProc base = spawn_server([&](int ready, Served& served) { serve_read_send(ready, served, local + "/data"); });
  ServerProc echo = spawn_server([&](int ready, Served&) { serve_echo(ready, manifest->chunk_size); });
  auto stop_all = [&] {
    for (ServerProc* p : {&ps, &ps_stream, &base, &echo})
      if (p->pid > 0) p->stop();
    std::filesystem::remove_all(work);
  };
  if (!ps.port || !ps_stream.port || !base.port || !echo.port) {
    std::fprintf(stderr, "lazymem-bench-remote: a server did not start\n");
    stop_all();
    return 1;
  }
  const std::string remote = "lazymem://127.0.0.1:" + std::to_string(ps.port) + "/heap";
  const std::string remote_stream = "lazymem://127.0.0.1:" + std::to_string(ps_stream.port) + "/heap";

  constexpr double kGiB = double(1ULL << 30);
  std::vector<double> t_remote, t_local, t_eager, f50, f99, r50, r99, s50, s99, t50, t99, t_bytes, rt50, rp50, ts50;
  std::vector<double> ps_cpu_gib, ps_cpu_s, ps_gib, base_cpu_gib, base_cpu_s, base_gib, t_base;
  bool bad = false;
  auto check = [&](const Run& r, const char* what, int round) {
    bool wrong = r.ok && r.restored && r.hash != made.hash;
    if (!r.ok || wrong) {
      std::fprintf(stderr, "%s: round %d %s\n", what, round, wrong ? "restored WRONG bytes" : "failed");
      bad = true;
      return false;
    }
    return true;
  };
  // Server CPU and bytes over exactly one client run (the client is a separate process that has
  // exited, so the server has nothing else to do in between).
  auto bracket = [](const ServerProc& server, auto&& run, std::vector<double>& cpu_gib, std::vector<double>& cpu_s,
                    std::vector<double>& gib) {
    ServerReport a = server.sample();
    bool ok = run();
    ServerReport b = server.sample();
    if (!ok || b.bytes <= a.bytes) return;  // a failed run, or a sample that failed
    double bytes = double(b.bytes - a.bytes);
    cpu_s.push_back(b.cpu_s - a.cpu_s);
    gib.push_back(bytes / kGiB);
    cpu_gib.push_back((b.cpu_s - a.cpu_s) / (bytes / kGiB));
  };
  for (int round = 0; round < rounds; ++round) {  // interleaved, so drift hits every mode alike
    bracket(
        ps,
        [&] {
          Run a = in_child<Run>([&] { return lazy_touch_all(remote, len); });
          if (!check(a, "remote lazy", round)) return false;
          t_remote.push_back(a.seconds);
          return true;
        },
        ps_cpu_gib, ps_cpu_s, ps_gib);
    Run b = in_child<Run>([&] { return lazy_touch_all(local, len); });
    if (check(b, "local lazy", round)) t_local.push_back(b.seconds);
    Run c = in_child<Run>([&] { return eager_download(remote, len); });
    if (check(c, "eager download", round)) t_eager.push_back(c.seconds);
    Run f = in_child<Run>([&] { return fault_latency(remote, len, faults, *manifest, false); });
    if (check(f, "fault latency", round)) {
      f50.push_back(f.p50_us);
      f99.push_back(f.p99_us);
    }
    const int other_cpu = server_cpu() > 0 ? 0 : server_cpu();
    // Its baselines, measured between its faults: a round trip bringing back as many bytes as
    // each fault received; and the page the touch needed, 4 KiB, as it would travel uncompressed.
    Run ft = in_child<Run>([&] { return fault_latency(remote, len, faults, *manifest, true, echo.port); });
    if (check(ft, "fault latency, on the faulting thread", round)) {
      t50.push_back(ft.p50_us);
      t99.push_back(ft.p99_us);
      t_bytes.push_back(ft.bytes_per_fault);
      rt50.push_back(ft.rtt_p50_us);
      rp50.push_back(ft.rtt_page_p50_us);
    }
    Run fs = in_child<Run>([&] { return fault_latency(remote_stream, len, faults, *manifest, true); });
    if (check(fs, "fault latency, on the faulting thread, TCP only", round)) ts50.push_back(fs.p50_us);
    Run e = in_child<Run>([&] { return plain_rtt(echo.port, avg_chunk, faults, other_cpu); });
    if (check(e, "plain round trip", round)) {
      r50.push_back(e.p50_us);
      r99.push_back(e.p99_us);
    }
    Run e1 = in_child<Run>([&] { return plain_rtt(echo.port, avg_chunk, faults, server_cpu()); });
    if (check(e1, "plain round trip, same CPU", round)) {
      s50.push_back(e1.p50_us);
      s99.push_back(e1.p99_us);
    }
    bracket(
        base,
        [&] {
          Run g = in_child<Run>([&] { return fetch_all_baseline(base.port, *manifest); });
          if (!check(g, "read()+send() fetch", round)) return false;
          t_base.push_back(g.seconds);
          return true;
        },
        base_cpu_gib, base_cpu_s, base_gib);
  }
  stop_all();
  if (bad) return 1;

  const double cpu_ps = median(ps_cpu_gib), cpu_base = median(base_cpu_gib);
  const double fault_engine_vs_rtt = median(f50) / median(r50);
  // Paired: each round's fault against the round trips measured between its faults.
  auto paired = [](const std::vector<double>& a, const std::vector<double>& b) {
    std::vector<double> r;
    for (size_t i = 0; i < a.size() && i < b.size(); ++i)
      if (b[i] > 0) r.push_back(a[i] / b[i]);  // a round without its baseline is left out
    return r.empty() ? 0.0 : median(r);
  };
  const double fault_vs_rtt = paired(t50, rt50), fault_vs_rtt_page = paired(t50, rp50);
  const double remote_vs_eager = median(t_remote) / median(t_eager);
  const double cpu_ratio = cpu_base > 0 ? cpu_ps / cpu_base : 0;
  const bool met_fault = fault_vs_rtt > 0 && fault_vs_rtt <= 1.5, met_touch = remote_vs_eager <= 1.1, met_cpu = cpu_ratio <= 0.5;

  std::printf("lazymem-bench-remote: %zu MiB heap-like snapshot (%u KiB chunks, zstd-1, %.2fx, %u-byte average stored chunk), "
              "page server on loopback, median of %d runs, every byte checked\n\n",
              len >> 20, manifest->chunk_size / 1024, made.ratio, avg_chunk, rounds);
  std::printf("%-36s %12.1f ms\n", "remote lazy restore, touch all", median(t_remote) * 1e3);
  std::printf("%-36s %12.1f ms\n", "local lazy restore, touch all", median(t_local) * 1e3);
  std::printf("%-36s %12.1f ms\n", "eager download, touch all", median(t_eager) * 1e3);
  std::printf("%-36s %9.0f us p50 %9.0f us p99  (%d faults; %.2fx the round trip below)\n",
              "remote fault, handler thread", median(f50), median(f99), faults, fault_engine_vs_rtt);
  std::printf("%-36s %9.0f us p50 %9.0f us p99\n", "plain TCP round trip, across CPUs", median(r50), median(r99));
  std::printf("%-36s %9.0f us p50 %9.0f us p99  (fault_on_thread; %.0f bytes per fault)\n",
              "remote fault, faulting thread", median(t50), median(t99), median(t_bytes));
  std::printf("%-36s %9.0f us p50               (a server without datagrams: getPage on the TCP connection)\n",
              "remote fault, faulting thread, TCP", median(ts50));
  std::printf("%-36s %9.0f us p50               (as many bytes back as that fault got; between its faults)\n",
              "plain TCP round trip, same payload", median(rt50));
  std::printf("%-36s %9.0f us p50               (the page uncompressed, between the faults; the fault is %.2fx it)\n",
              "plain TCP round trip, 4 KiB", median(rp50), fault_vs_rtt_page);
  std::printf("%-36s %9.0f us p50 %9.0f us p99  (not the baseline: no host pair shares a CPU)\n",
              "plain TCP round trip, same CPU", median(s50), median(s99));
  std::printf("%-36s %12.3f CPU-s/GiB  (%.3f CPU-s for %.3f GiB, one remote restore)\n", "page server", cpu_ps,
              median(ps_cpu_s), median(ps_gib));
  std::printf("%-36s %12.3f CPU-s/GiB  (%.3f CPU-s for %.3f GiB, every chunk once, %.1f ms)\n", "read()+send() server",
              cpu_base, median(base_cpu_s), median(base_gib), median(t_base) * 1e3);
  std::printf("\ntargets: fault p50 (faulting thread) <= 1.5x round trip: %.2fx %s; remote touch-all <= 1.1x eager download: %.2fx %s; "
              "server CPU <= 0.5x read()+send(): %.2fx %s\n",
              fault_vs_rtt, met_fault ? "(met)" : "(MISSED)", remote_vs_eager, met_touch ? "(met)" : "(MISSED)", cpu_ratio,
              met_cpu ? "(met)" : "(MISSED)");
  if (vm.count("json")) {
    nlohmann::json j;
    j["mib"] = len >> 20;
    j["chunk_kib"] = manifest->chunk_size / 1024;
    j["rounds"] = rounds;
    j["faults"] = faults;
    j["compression_ratio"] = made.ratio;
    j["stored_bytes"] = made.stored;
    j["chunks"] = made.chunks;
    j["avg_stored_chunk_bytes"] = avg_chunk;
    j["remote_lazy_touch_all_s"] = median(t_remote);
    j["local_lazy_touch_all_s"] = median(t_local);
    j["eager_download_touch_all_s"] = median(t_eager);
    j["fault_p50_us"] = median(t50);
    j["fault_p99_us"] = median(t99);
    j["fault_bytes_per_fault"] = median(t_bytes);
    j["fault_tcp_only_p50_us"] = median(ts50);
    j["rtt_same_payload_p50_us"] = median(rt50);
    j["rtt_page_p50_us"] = median(rp50);
    j["fault_p50_vs_rtt_page"] = fault_vs_rtt_page;
    j["fault_handler_thread_p50_us"] = median(f50);
    j["fault_handler_thread_p99_us"] = median(f99);
    j["fault_handler_thread_p50_vs_rtt"] = fault_engine_vs_rtt;
    j["rtt_p50_us"] = median(r50);
    j["rtt_p99_us"] = median(r99);
    j["rtt_same_cpu_p50_us"] = median(s50);
    j["rtt_same_cpu_p99_us"] = median(s99);
    j["server_cpu_s_per_gib"] = cpu_ps;
    j["server_cpu_s_per_restore"] = median(ps_cpu_s);
    j["server_gib_per_restore"] = median(ps_gib);
    j["baseline_cpu_s_per_gib"] = cpu_base;
    j["baseline_cpu_s_per_fetch_all"] = median(base_cpu_s);
    j["baseline_gib_per_fetch_all"] = median(base_gib);
    j["baseline_fetch_all_s"] = median(t_base);
    j["fault_p50_vs_rtt"] = fault_vs_rtt;
    j["touch_all_remote_vs_eager_download"] = remote_vs_eager;
    j["server_cpu_vs_baseline"] = cpu_ratio;
    j["targets"] = {{"fault_p50_vs_rtt", {{"max", 1.5}, {"met", met_fault}}},
                    {"touch_all_remote_vs_eager_download", {{"max", 1.1}, {"met", met_touch}}},
                    {"server_cpu_vs_baseline", {{"max", 0.5}, {"met", met_cpu}}}};
    std::printf("%s\n", j.dump().c_str());
  }
  return 0;
}

int main(int argc, char** argv) {
  return lazymem::cli::run("lazymem-bench-remote", "", [&] { return run_bench(argc, argv); });
}
