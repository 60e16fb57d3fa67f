// Test helper: a second "host" (a network namespace reached over a veth pair), and a scope in
// which the calling thread's sockets are made in another namespace.
#pragma once

#include <fcntl.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <sched.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

#include "sys/unique_fd.h"

namespace lazymem::testing {

// A second "host": a network namespace joined to this one by a veth pair with the given MTU on
// both ends, near() on this side, far() on the other. Gone with the object. The subnet is this
// process's own, so a pair left behind by a killed run cannot take its addresses.
struct VethHost {
  std::string ns = "lzm-ps-" + std::to_string(::getpid());
  std::string veth = "lzmv" + std::to_string(::getpid() % 100000);
  std::string net = "10." + std::to_string(100 + ::getpid() % 100) + "." + std::to_string(::getpid() / 100 % 250);
  bool made = false;
  static bool sh(const std::string& cmd) { return std::system((cmd + " >/dev/null 2>&1").c_str()) == 0; }
  std::string net6 = fmt::format("fd00:6c7a:{:x}::", ::getpid() % 65536);
  std::string near() const { return net + ".1"; }
  std::string far() const { return net + ".2"; }
  std::string near6() const { return net6 + "1"; }
  std::string far6() const { return net6 + "2"; }
  // Why it cannot be had here (the test skips), or "" once it is up; a pair that cannot be set
  // up once the namespace exists is a failure.
  std::string create(unsigned mtu = 1500) {
    if (::geteuid() != 0) return "needs root to create network namespaces";
    if (!sh("command -v ip")) return "iproute2 (ip) is not installed";
    if (!sh("ip netns add " + ns)) return "cannot create a network namespace here";
    made = true;
    const std::string m = " mtu " + std::to_string(mtu);
    EXPECT_TRUE(sh("ip link add " + veth + "a" + m + " type veth peer name " + veth + "b" + m + " netns " + ns) &&
                sh("ip addr add " + near() + "/30 dev " + veth + "a && ip link set " + veth + "a up") &&
                sh("ip -n " + ns + " addr add " + far() + "/30 dev " + veth + "b && ip -n " + ns + " link set " +
                   veth + "b up && ip -n " + ns + " link set lo up") &&
                // IPv6 too, usable at once (no duplicate address detection)
                sh("ip addr add " + near6() + "/64 dev " + veth + "a nodad") &&
                sh("ip -n " + ns + " addr add " + far6() + "/64 dev " + veth + "b nodad"))
        << "a veth pair to namespace " << ns << " could not be set up";
    return "";
  }
  // From now on the far side drops every packet of `proto` ("udp", "tcp") from the near side
  // (policy routing: a blackhole rule ahead of local delivery); the other passes.
  bool drop_from_near(const std::string& proto) const {
    const std::string rule = "ip -n " + ns + " rule ";
    return sh(rule + "add pref 10 from " + near() + " ipproto " + proto + " blackhole") &&
           sh(rule + "add pref 100 lookup local") && sh(rule + "del pref 0");
  }
  bool stop_dropping() const { return sh("ip -n " + ns + " rule del pref 10"); }
  ~VethHost() {
    if (!made) return;
    (void)sh("ip link del " + veth + "a");
    (void)sh("ip netns del " + ns);
  }
};

// Sockets made while one of these lives belong to the namespace; the calling thread goes back
// to its own when it ends.
struct InNamespace {
  sys::UniqueFd own{::open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC)};
  bool entered = false;
  explicit InNamespace(const std::string& ns) {
    sys::UniqueFd target(::open(("/var/run/netns/" + ns).c_str(), O_RDONLY | O_CLOEXEC));
    entered = own.valid() && target.valid() && ::setns(target.get(), CLONE_NEWNET) == 0;
  }
  ~InNamespace() {
    if (entered) (void)!::setns(own.get(), CLONE_NEWNET);
  }
};

}  // namespace lazymem::testing
