// lazymem-test-busy-writer: a process that does not link liblazymem and writes its memory without
// pause, from two threads, user mode and kernel (read() into it), with a third blocked in a
// system call, for the agent's `migrate --pid` to move while it runs.
//
//   lazymem-test-busy-writer ADDRESS MIB [huge]
//                                           maps MIB MiB at ADDRESS (hex; with `huge`, on 2 MiB
//                                           huge pages), fills them, prints "ready" and writes on
//                                           until killed, printing "w" after each 2^20 writes to
//                                           its hot set (the first sixteenth; never waiting on a
//                                           full stdout)
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

int main(int argc, char** argv) {
  if (argc != 3 && !(argc == 4 && std::strcmp(argv[3], "huge") == 0)) {
    std::fprintf(stderr, "usage: lazymem-test-busy-writer ADDRESS MIB [huge]\n");
    return 2;
  }
  const uintptr_t address = std::strtoull(argv[1], nullptr, 16);
  const size_t bytes = std::strtoull(argv[2], nullptr, 10) << 20;
  const int huge = argc == 4 ? MAP_HUGETLB : 0;
  void* m = ::mmap(reinterpret_cast<void*>(address), bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE | huge, -1, 0);
  if (m == MAP_FAILED) {
    std::perror("mmap");
    return 1;
  }
  auto* words = static_cast<uint64_t*>(m);
  const size_t n = bytes / sizeof(uint64_t);
  // Every page different, a quarter of them left zero (some chunks stay all-zero).
  for (size_t i = 0; i < n; ++i) words[i] = (i / 512) % 4 == 3 ? 0 : i * 0x9e3779b97f4a7c15ULL;
  const int random = ::open("/dev/urandom", O_RDONLY | O_CLOEXEC);
  if (random < 0) {
    std::perror("open /dev/urandom");
    return 1;
  }
  // A second writer, on a hot set of its own (the ninth sixteenth), and a thread that only waits.
  std::thread([words, n] {
    for (uint64_t x = 1;; ++x) words[n / 2 + (x * 2654435761u) % (n / 16)] = x;
  }).detach();
  int never[2];
  if (::pipe(never) != 0) return 1;
  std::thread([fd = never[0]] {
    char c;
    (void)!::read(fd, &c, 1);
  }).detach();
  std::printf("ready\n");
  std::fflush(stdout);
  (void)::fcntl(STDOUT_FILENO, F_SETFL, ::fcntl(STDOUT_FILENO, F_GETFL) | O_NONBLOCK);
  uint64_t x = 88172645463325252ULL;
  for (uint64_t round = 0;; ++round) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    // A hot set (the first sixteenth) written all the time, the rest of the first half now and
    // then (the second half is the other writer's: no word has two writers).
    const size_t span = (round % (1u << 20) == 0) ? n / 2 : n / 16;
    words[x % span] = round;
    if (round % (1u << 20) == 0) (void)!::write(STDOUT_FILENO, "w", 1);  // a full pipe: not said
    if (round % (1u << 20) == 1) {
      // The kernel writes too: a page's worth read straight into it.
      const size_t page = (x >> 20) % (bytes / 2 / 4096);
      if (::read(random, static_cast<char*>(m) + page * 4096, 4096) != 4096) return 1;
    }
  }
}
