// lazymem-bench-floor: the latency floor of a remote fault served on the faulting thread itself,
// next to plain TCP round trips measured in the same run. An experiment for the design of the
// fault path (docs/design-notes.md, "Fault latency"), not a lazymem code path: the engine serves
// faults on its own thread, which costs two more hand-offs than a round trip.
//
// The region is registered with UFFD_FEATURE_SIGBUS, so a missing page raises SIGBUS in the
// faulting thread; the handler asks a server on the other CPU for the page and installs it with
// UFFDIO_COPY. Two variants: the server sends the page decompressed (4 KiB), or the page's whole
// stored format-2 chunk, which the handler verifies and decodes one page of (runtime codec, with
// the snapshot's dictionary). Every faulted page is compared with the original.
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <iostream>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>
#include <vector>

#include "cli/options.h"
#include "../common/bench_util.h"
#include "../common/loopback.h"
#include "snapshot/chunk_codec.h"
#include "snapshot/dictionary.h"
#include "sys/cpu_latency.h"

namespace po = boost::program_options;
using namespace lazymem::bench;
namespace snap = lazymem::snapshot;

namespace {

constexpr uint32_t kPageBytes = 4096, kChunk = 64 * 1024;

// Request: what to send back. Reply: u32 length, then the bytes.
struct Ask {
  uint32_t kind;  // 0: `size` filler bytes (plain round trip); 1: page decompressed; 2: its stored chunk
  uint32_t size;
  uint64_t page;
};

struct Snapshot {
  std::vector<std::byte> data;
  std::vector<std::vector<std::byte>> stored;  // per chunk
  std::vector<lazymem::ChunkInfo> info;
  std::vector<std::byte> dict;
};

void serve(int fd, const Snapshot& s) {
  pin_to(server_cpu());
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  std::vector<std::byte> filler(1 << 20);
  Ask a;
  while (read_full(fd, &a, sizeof a)) {
    std::span<const std::byte> out;
    if (a.kind == 0) out = std::span(filler).first(std::min<size_t>(a.size, filler.size()));
    else if (a.kind == 1) out = std::span(s.data).subspan(a.page * kPageBytes, kPageBytes);
    else out = s.stored[a.page * kPageBytes / kChunk];
    uint32_t n = static_cast<uint32_t>(out.size());
    std::vector<std::byte> msg(4 + n);
    std::memcpy(msg.data(), &n, 4);
    std::memcpy(msg.data() + 4, out.data(), n);
    if (!write_full(fd, msg.data(), msg.size())) break;
  }
  _exit(0);
}

// The fault handler's world: set up before the first fault, touched only by the faulting thread.
struct Handler {
  int sock = -1, uffd = -1;
  uint32_t kind = 1;
  uintptr_t base = 0;
  const Snapshot* snap = nullptr;
  snap::ChunkDecoder* dec = nullptr;
  snap::ChunkLayout layout;
  alignas(4096) std::byte page[kPageBytes];
  std::byte reply[kChunk + 4096];
  bool failed = false;
} g;

void on_sigbus(int, siginfo_t* si, void*) {
  uintptr_t addr = reinterpret_cast<uintptr_t>(si->si_addr) & ~uintptr_t{kPageBytes - 1};
  uint64_t pg = (addr - g.base) / kPageBytes;
  Ask a{g.kind, 0, pg};
  uint32_t n = 0;
  if (!write_full(g.sock, &a, sizeof a) || !read_full(g.sock, &n, 4) || n > sizeof g.reply || !read_full(g.sock, g.reply, n)) {
    g.failed = true;
    ::_exit(3);  // no page to give: never return into the access
  }
  const std::byte* src = g.reply;
  if (g.kind == 2) {
    size_t c = pg * kPageBytes / kChunk;
    const lazymem::ChunkInfo& info = g.snap->info[c];
    std::span<const std::byte> stored(g.reply, n);
    uint32_t index = static_cast<uint32_t>(pg % (kChunk / kPageBytes));
    if (info.codec == lazymem::Codec::kZstdPages) {
      if (!g.dec->verify_stored(info, stored, kChunk, kPageBytes).ok() ||
          !g.dec->decode_page(stored, kChunk, index, std::span(g.page), g.layout).ok()) {
        ::_exit(4);
      }
      src = g.page;
    } else if (info.codec == lazymem::Codec::kRaw) {
      src = g.reply + size_t{index} * kPageBytes;
    } else {
      std::memset(g.page, 0, kPageBytes);
      src = g.page;
    }
  }
  uffdio_copy cp{};
  cp.dst = addr;
  cp.src = reinterpret_cast<uintptr_t>(src);
  cp.len = kPageBytes;
  cp.mode = UFFDIO_COPY_MODE_DONTWAKE;  // SIGBUS mode: nobody sleeps on the page
  if (::ioctl(g.uffd, UFFDIO_COPY, &cp) != 0 && errno != EEXIST) ::_exit(5);
}

}  // namespace

static int run_bench(int argc, char** argv) {
  po::options_description desc("lazymem-bench-floor [options]");
  desc.add_options()("json", "also print one JSON object on the last line")(
      "mib", po::value<size_t>()->default_value(256), "heap-like data in MiB")(
      "faults", po::value<int>()->default_value(3000), "faults (and round trips) timed per mode");
  auto vm = lazymem::cli::parse({argv + 1, argv + argc}, desc);
  const size_t len = vm["mib"].as<size_t>() << 20;
  const int faults = vm["faults"].as<int>();
  if (len < kChunk || faults < 1) {
    std::fprintf(stderr, "lazymem-bench-floor: --mib and --faults must be positive\n");
    return 2;
  }
  if (std::thread::hardware_concurrency() < 2) {
    std::fprintf(stderr, "lazymem-bench-floor: needs two CPUs (client and server apart, as between hosts)\n");
    return 1;
  }

  // The data and its format-2 chunks, as a capture would store them.
  Snapshot s;
  s.data.resize(len);
  lazymem::example::KvTable table(s.data.data(), len);
  table.fill(7, 0.7);
  std::span<const std::byte> all(s.data);
  s.dict = snap::train_dictionary(std::span(&all, 1), kPageBytes);
  auto cdict = snap::EncodeDictionary::load(s.dict, 1);
  auto ddict = snap::DecodeDictionary::load(s.dict);
  if (!cdict.ok() || !ddict.ok()) return 1;
  snap::ChunkEncoder enc(1, kChunk, *cdict);
  size_t stored_total = 0;
  for (size_t off = 0; off < len; off += kChunk) {
    auto e = enc.encode_pages(all.subspan(off, kChunk), kPageBytes);
    if (!e.ok()) return 1;
    s.info.push_back(lazymem::ChunkInfo{e->codec, 0, static_cast<uint32_t>(e->stored.size()), e->checksum, e->stored_checksum});
    s.stored.emplace_back(e->stored.begin(), e->stored.end());
    stored_total += e->stored.size();
  }
  const uint32_t avg_chunk = static_cast<uint32_t>(stored_total / s.stored.size());

  uint16_t port = 0;
  int lfd = listen_loopback(port);
  pid_t server = ::fork();
  if (server == 0) {
    int c = ::accept(lfd, nullptr, nullptr);
    serve(c, s);
  }
  ::close(lfd);
  pin_to(0);  // two CPUs at least (checked above); the server has the last one
  lazymem::sys::CpuLatencyHold quick_wakeups;  // as the engine and the remote bench's baseline hold
  (void)quick_wakeups.set(true);
  g.sock = dial_loopback(port);
  if (g.sock < 0) return 1;

  auto round_trips = [&](uint32_t size) {
    std::vector<double> lat;
    for (int i = 0; i < faults; ++i) {
      Ask q{0, size, 0};
      uint32_t n;
      auto t = Clock::now();
      if (!write_full(g.sock, &q, sizeof q) || !read_full(g.sock, &n, 4) || !read_full(g.sock, g.reply, n)) std::exit(1);
      lat.push_back(since(t) * 1e6);
    }
    return percentile(lat, 50);
  };

  g.uffd = static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC));
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = UFFD_FEATURE_SIGBUS;
  if (g.uffd < 0 || ::ioctl(g.uffd, UFFDIO_API, &api) != 0) {
    std::fprintf(stderr, "lazymem-bench-floor: userfaultfd with UFFD_FEATURE_SIGBUS unavailable: %s\n", std::strerror(errno));
    return 1;
  }
  snap::ChunkDecoder dec;
  g.dec = &dec;
  g.snap = &s;
  g.layout = snap::ChunkLayout{kPageBytes, *ddict ? (*ddict)->get() : nullptr};
  struct sigaction sa{};
  sa.sa_sigaction = on_sigbus;
  sa.sa_flags = SA_SIGINFO;
  ::sigaction(SIGBUS, &sa, nullptr);

  bool wrong = false;
  auto fault_run = [&](uint32_t kind) {
    auto* m = static_cast<std::byte*>(::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    uffdio_register r{};
    r.range.start = reinterpret_cast<uintptr_t>(m);
    r.range.len = len;
    r.mode = UFFDIO_REGISTER_MODE_MISSING;
    if (::ioctl(g.uffd, UFFDIO_REGISTER, &r) != 0) std::exit(1);
    g.base = reinterpret_cast<uintptr_t>(m);
    g.kind = kind;
    std::mt19937_64 rng(kind);
    std::vector<double> lat;
    volatile const std::byte* vp = m;
    for (int i = 0; i < faults; ++i) {
      size_t pg = rng() % (len / kPageBytes);
      auto t = Clock::now();
      (void)vp[pg * kPageBytes];
      lat.push_back(since(t) * 1e6);
      if (std::memcmp(m + pg * kPageBytes, s.data.data() + pg * kPageBytes, kPageBytes) != 0) wrong = true;
    }
    ::munmap(m, len);
    return percentile(lat, 50);
  };

  double rtt_page = round_trips(kPageBytes), rtt_chunk = round_trips(avg_chunk);
  double f_page = fault_run(1), f_chunk = fault_run(2);
  double rtt_page2 = round_trips(kPageBytes), rtt_chunk2 = round_trips(avg_chunk);  // drift check
  rtt_page = (rtt_page + rtt_page2) / 2, rtt_chunk = (rtt_chunk + rtt_chunk2) / 2;
  ::close(g.sock);
  ::waitpid(server, nullptr, 0);
  if (wrong) {
    std::fprintf(stderr, "lazymem-bench-floor: a faulted page held WRONG bytes\n");
    return 1;
  }
  std::printf("lazymem-bench-floor: %zu MiB heap-like data, format 2 (%u-byte average stored chunk), server on CPU %d, "
              "faulting thread on CPU 0, p50 of %d each, every faulted page checked\n\n",
              len >> 20, avg_chunk, server_cpu(), faults);
  std::printf("%-58s %7.1f us\n", "plain TCP round trip, 4 KiB back", rtt_page);
  std::printf("%-58s %7.1f us\n", "plain TCP round trip, one stored chunk back", rtt_chunk);
  std::printf("%-58s %7.1f us  %.2fx the chunk round trip\n", "fault on the faulting thread, page sent decompressed", f_page,
              f_page / rtt_chunk);
  std::printf("%-58s %7.1f us  %.2fx the chunk round trip\n", "fault on the faulting thread, chunk sent, page decoded", f_chunk,
              f_chunk / rtt_chunk);
  if (vm.count("json")) {
    nlohmann::json j{{"rtt_page_us", rtt_page}, {"rtt_chunk_us", rtt_chunk}, {"in_thread_page_us", f_page},
                     {"in_thread_chunk_us", f_chunk}, {"in_thread_page_vs_rtt", f_page / rtt_chunk},
                     {"in_thread_chunk_vs_rtt", f_chunk / rtt_chunk}, {"avg_stored_chunk_bytes", avg_chunk}};
    std::printf("%s\n", j.dump().c_str());
  }
  return 0;
}

int main(int argc, char** argv) {
  return lazymem::cli::run("lazymem-bench-floor", "", [&] { return run_bench(argc, argv); });
}
