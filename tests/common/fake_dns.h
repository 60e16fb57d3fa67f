// Test helper: a DNS server of our own that the C library's resolver really asks, for tests of
// what looks page servers' names up. It answers one name with its IPv4 addresses (A records,
// in the order given) and no IPv6 address; other names do not exist. Told to hold(), it keeps the queries it gets unanswered
// (a DNS server that is down, as the resolver sees one) until answer_held(); told to
// answer_after(), it answers each query that long after it came.
//
// use_for_this_thread() points /etc/resolv.conf at it for the calling thread and every thread it
// starts from then on (a mount namespace of their own), until this goes.
#pragma once

#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "sys/unique_fd.h"

namespace lazymem::testing {

class FakeDns {
 public:
  // Listens on `address`:53 (UDP); use_for_this_thread() says if it could not.
  FakeDns(std::string name, std::string address, const std::vector<std::string>& answers = {"127.0.0.1"})
      : name_(std::move(name)), address_(std::move(address)) {
    for (const std::string& a : answers) {
      in_addr v4{};
      ::inet_pton(AF_INET, a.c_str(), &v4);
      answers_.push_back(v4);
    }
    sock_.reset(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(53);
    ::inet_pton(AF_INET, address_.c_str(), &a.sin_addr);
    if (!sock_.valid() || ::bind(sock_.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
      skip_ = "cannot listen on " + address_ + ":53 for a DNS server of our own: " + std::strerror(errno);
      return;
    }
    int p[2];
    if (::pipe2(p, O_CLOEXEC) != 0) {
      skip_ = std::string("pipe: ") + std::strerror(errno);
      return;
    }
    stop_r_.reset(p[0]);
    stop_w_.reset(p[1]);
    thread_ = std::thread([this] { serve(); });
  }
  ~FakeDns() {
    if (thread_.joinable()) {
      (void)!::write(stop_w_.get(), "x", 1);
      thread_.join();
    }
    if (mounted_) ::umount2("/etc/resolv.conf", MNT_DETACH);
  }
  FakeDns(const FakeDns&) = delete;
  FakeDns& operator=(const FakeDns&) = delete;

  // Needs CAP_SYS_ADMIN; an empty string says it worked, else why the test cannot use this
  // server (it could not listen, or the resolver could not be pointed at it): a test skips with
  // it. `resolv_conf` is a file of the test's own (written here).
  std::string use_for_this_thread(const std::string& resolv_conf) {
    if (!skip_.empty()) return skip_;
    const std::string cannot = "cannot point the resolver at a DNS server of our own: ";
    // One try per server, waiting 30 s (the most resolv.conf allows): a held query stays asked.
    std::ofstream(resolv_conf) << "nameserver " << address_ << "\noptions timeout:30 attempts:1\n";
    if (::unshare(CLONE_NEWNS) != 0) return cannot + "unshare(CLONE_NEWNS): " + std::strerror(errno);
    if (::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0)
      return cannot + "making / private: " + std::strerror(errno);
    if (::mount(resolv_conf.c_str(), "/etc/resolv.conf", nullptr, MS_BIND, nullptr) != 0)
      return cannot + "bind-mounting /etc/resolv.conf: " + std::strerror(errno);
    mounted_ = true;
    return "";
  }

  void hold() {
    std::lock_guard lock(mu_);
    holding_ = true;
  }
  // Answers each query `delay` after it came (a slow resolver: its first nameserver down).
  void answer_after(std::chrono::milliseconds delay) {
    std::lock_guard lock(mu_);
    delay_ = delay;
  }
  // Answers what was held, and everything from now on.
  void answer_held() {
    std::lock_guard lock(mu_);
    holding_ = false;
    for (const Query& q : held_) reply(q);
    held_.clear();
  }
  size_t held() const {
    std::lock_guard lock(mu_);
    return held_.size();
  }
  // Waits until a query is held (true), or `limit` has passed.
  bool wait_held(std::chrono::milliseconds limit) {
    std::unique_lock lock(mu_);
    return got_held_.wait_for(lock, limit, [this] { return !held_.empty(); });
  }
  size_t queries() const { return queries_.load(); }

 private:
  struct Query {
    std::chrono::steady_clock::time_point due{};  // answered then, when delayed
    sockaddr_storage from{};
    socklen_t from_len = 0;
    std::vector<uint8_t> bytes;
  };

  void serve() {
    for (;;) {
      pollfd p[2] = {{sock_.get(), POLLIN, 0}, {stop_r_.get(), POLLIN, 0}};
      if (::poll(p, 2, answer_due()) < 0) continue;
      if (p[1].revents != 0) return;
      if (p[0].revents == 0) continue;
      Query q;
      q.bytes.resize(512);
      q.from_len = sizeof q.from;
      ssize_t n = ::recvfrom(sock_.get(), q.bytes.data(), q.bytes.size(), 0, reinterpret_cast<sockaddr*>(&q.from),
                             &q.from_len);
      if (n < 12) continue;
      q.bytes.resize(static_cast<size_t>(n));
      ++queries_;
      std::lock_guard lock(mu_);
      if (holding_ || delay_.count() > 0) {
        q.due = std::chrono::steady_clock::now() + delay_;
        held_.push_back(std::move(q));
        got_held_.notify_all();
      } else {
        reply(q);
      }
    }
  }

  // Answers the delayed queries that are due; the poll() timeout until the next one (-1: none).
  int answer_due() {
    std::lock_guard lock(mu_);
    if (holding_ || held_.empty()) return -1;
    const auto now = std::chrono::steady_clock::now();
    auto next = std::chrono::steady_clock::time_point::max();
    std::vector<Query> later;
    for (Query& q : held_) {
      if (q.due <= now) {
        reply(q);
      } else {
        next = std::min(next, q.due);
        later.push_back(std::move(q));
      }
    }
    held_ = std::move(later);
    if (held_.empty()) return -1;
    return static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(next - now).count()) + 1;
  }

  // The question's name (dotted) and where its type begins; empty if malformed.
  static std::string question(const std::vector<uint8_t>& b, size_t& end) {
    std::string name;
    size_t i = 12;
    while (i < b.size() && b[i] != 0) {
      const size_t len = b[i];
      if (len > 63 || i + 1 + len > b.size()) return "";
      if (!name.empty()) name += '.';
      name.append(reinterpret_cast<const char*>(&b[i + 1]), len);
      i += 1 + len;
    }
    end = i + 1;  // past the root label
    return end + 4 <= b.size() ? name : "";
  }

  void reply(const Query& q) {
    size_t end = 0;
    const std::string name = question(q.bytes, end);
    if (name.empty()) return;
    const uint16_t type = static_cast<uint16_t>(q.bytes[end] << 8 | q.bytes[end + 1]);
    const bool ours = strcasecmp(name.c_str(), name_.c_str()) == 0;
    const size_t answers = ours && type == 1 ? answers_.size() : 0;  // A; AAAA and the rest: none
    std::vector<uint8_t> r(q.bytes.begin(), q.bytes.begin() + static_cast<long>(end + 4));  // header, question
    r[2] = static_cast<uint8_t>(0x84 | (q.bytes[2] & 0x01));  // QR, AA, RD as asked
    r[3] = ours ? 0x80 : 0x83;                                // RA; NXDOMAIN for other names
    r[4] = 0, r[5] = 1;                                       // one question
    r[6] = 0, r[7] = static_cast<uint8_t>(answers);
    for (int k = 8; k < 12; ++k) r[k] = 0;
    for (size_t k = 0; k < answers; ++k) {
      const uint8_t rr[] = {0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4};  // name at 12, A, IN, TTL 0, 4 bytes:
      r.insert(r.end(), std::begin(rr), std::end(rr));
      const auto* ip = reinterpret_cast<const uint8_t*>(&answers_[k].s_addr);  // network order
      r.insert(r.end(), ip, ip + 4);
    }
    (void)::sendto(sock_.get(), r.data(), r.size(), 0, reinterpret_cast<const sockaddr*>(&q.from), q.from_len);
  }

  std::string name_, address_, skip_;
  std::vector<in_addr> answers_;
  sys::UniqueFd sock_, stop_r_, stop_w_;
  std::thread thread_;
  mutable std::mutex mu_;
  std::condition_variable got_held_;
  bool holding_ = false;
  std::chrono::milliseconds delay_{0};
  std::vector<Query> held_;
  std::atomic<size_t> queries_{0};
  bool mounted_ = false;
};

}  // namespace lazymem::testing
