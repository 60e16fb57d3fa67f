// lazymem-pageserver: holds snapshots and streams their chunks. This file only parses options.
//   serve  --store DIR --listen HOST:PORT [--token-file F]
//   import --store DIR --raw FILE --name N [--chunk-kib K] [--zstd-level L] [--format 1|2]
//   ls     --store DIR | --server lazymem://HOST:PORT [--token-file F]
//   rm     --store DIR | --server lazymem://HOST:PORT [--token-file F] --name N
//   verify --store DIR [--name N] | --server lazymem://HOST:PORT [--token-file F] --name N
#include <sys/resource.h>
#include <unistd.h>

#include <csignal>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <algorithm>
#include <fmt/format.h>
#include <iostream>
#include <nlohmann/json.hpp>

#include "cli/options.h"
#include "core/log.h"
#include "lazymem/snapshot.h"
#include "net/auth.h"
#include "net/client.h"
#include "page_server.h"
#include "snapshot/manifest.h"
#include "snapshot/store.h"

namespace po = boost::program_options;
using namespace lazymem;

namespace {

constexpr const char* kUsage =
    "usage: lazymem-pageserver <command> [options]\n"
    "  serve   --store DIR --listen HOST:PORT [--token-file F]   serve every snapshot in DIR\n"
    "  import  --store DIR --raw FILE --name N                   snapshot a raw memory file (e.g. VM memory)\n"
    "  ls      --store DIR | --server lazymem://HOST:PORT        list snapshots, sizes, compression\n"
    "  rm      --store DIR | --server lazymem://HOST:PORT --name N   remove a snapshot\n"
    "  verify  --store DIR [--name N] | --server lazymem://HOST:PORT --name N   read and check every chunk\n"
    "  stats   --server lazymem://HOST:PORT[,...] [--json]       counters of running servers\n"
    "every command: --help for its options\n";

pageserver::PageServer* g_server = nullptr;  // for the signal handler only
void on_signal(int) {
  if (g_server) g_server->stop();
}

// The token of --token-file, or none.
std::string token_from(const po::variables_map& vm) {
  if (!vm.count("token-file")) return {};
  auto t = net::read_token_file(vm["token-file"].as<std::string>());
  if (!t.ok()) throw std::runtime_error(t.error().message());
  return *t;
}

// Snapshot `name` on the servers of --server (lazymem://HOST:PORT[,HOST:PORT...]); no name: the
// servers alone.
Result<SnapshotLocation> on_servers(const po::variables_map& vm, const std::string& name) {
  const std::string servers = vm["server"].as<std::string>();
  if (servers.rfind("lazymem://", 0) != 0 || servers.find('/', 10) != std::string::npos) {
    return Error(Errc::kInvalidArgument, "--server wants lazymem://HOST:PORT[,HOST:PORT...], got '" + servers + "'");
  }
  for (size_t at = 10;;) {  // each HOST:PORT, said alone when it is wrong
    size_t end = std::min(servers.find(',', at), servers.size());
    auto s = SnapshotLocation::Server::parse(std::string_view(servers).substr(at, end - at));
    if (!s.ok()) return Error(Errc::kInvalidArgument, "--server: " + s.error().message());
    if (end == servers.size()) break;
    at = end + 1;
  }
  auto loc = SnapshotLocation::parse(servers + "/" + (name.empty() ? "x" : name));
  if (loc.ok() && name.empty()) loc->name.clear();  // the servers alone (ls, stats): messages name no snapshot
  return loc;
}

// --store or --server, one of them; --token-file only with --server (flags that would do nothing
// are refused, not ignored: a store is read directly, with no token).
void check_store_or_server(const po::variables_map& vm) {
  if (vm.count("store") == vm.count("server")) throw std::invalid_argument("give exactly one of --store and --server");
  if (vm.count("store") && vm.count("token-file")) {
    throw std::invalid_argument("--token-file is the token for --server; --store is read directly, with no token");
  }
}

// Snapshot `name` in --store (its name checked as given) or on --server.
Result<SnapshotLocation> location_of(const po::variables_map& vm, const std::string& name) {
  if (vm.count("store")) return SnapshotLocation::in_store(vm["store"].as<std::string>(), name);
  return on_servers(vm, name);
}

// Exit status 1 when a listed snapshot is damaged.
int print_list(const std::vector<snapshot::SnapshotSummary>& list) {
  std::printf("%-32s %12s %12s %8s %8s %7s\n", "name", "size", "stored", "ratio", "regions", "format");
  size_t damaged = 0;
  for (const auto& s : list) {
    if (!s.damage.empty()) {
      std::printf("%-32s DAMAGED: %s\n", snapshot::escape_name(s.name).c_str(), s.damage.c_str());
      ++damaged;
      continue;
    }
    // Escaped: a listing from a server may hold names no lazymem server accepts.
    const std::string ratio = s.stored_bytes ? fmt::format("{:.2f}x", s.compression_ratio()) : "all zero";
    std::printf("%-32s %9.1f MiB %9.1f MiB %8s %8zu %7u\n", snapshot::escape_name(s.name).c_str(), s.total_bytes / 1048576.0,
                s.stored_bytes / 1048576.0, ratio.c_str(), s.regions, s.format_version);
  }
  if (damaged) std::fprintf(stderr, "%zu damaged: `verify --name NAME` says what, `rm --name NAME` removes it\n", damaged);
  return damaged ? 1 : 0;
}

int serve(const std::vector<std::string>& args) {
  po::options_description desc("lazymem-pageserver serve");
  desc.add_options()("store", po::value<std::string>()->required(), "snapshot store directory")(
      "listen", po::value<std::string>()->default_value("127.0.0.1:7070"), "HOST:PORT to listen on")(
      "token-file", po::value<std::string>(), "shared token clients must prove they know")(
      "cache-mib", po::value<size_t>()->default_value(256), "chunk data kept in memory after it was read (MiB)")(
      "no-zerocopy", "never send with MSG_ZEROCOPY")(
      "no-datagrams", "serve getPage on TCP connections only (no UDP socket on the port)")(
      "poll-after-page-us", po::value<unsigned>()->default_value(100),
      "after a page request, poll this long instead of sleeping (lower fault latency for CPU; 0: never)")(
      "metrics", po::value<std::string>(), "serve the stats in Prometheus text format on HOST:PORT (e.g. 127.0.0.1:9478)")(
      "keep-replaced-s", po::value<unsigned>()->default_value(60),
      "a snapshot replaced or removed while restores read it stays readable to them, and this long after the last "
      "one disconnects (its disk space is held meanwhile)");
  auto vm = cli::parse(args, desc);
  pageserver::ServerOptions o;
  const size_t cache_mib = vm["cache-mib"].as<size_t>();
  const size_t ram_mib = static_cast<size_t>(::sysconf(_SC_PHYS_PAGES)) * static_cast<size_t>(::sysconf(_SC_PAGESIZE)) >> 20;
  if (cache_mib > ram_mib) {
    throw std::invalid_argument(fmt::format("--cache-mib {} is more than this machine's memory ({} MiB)", cache_mib, ram_mib));
  }
  o.cache_bytes = cache_mib << 20;
  o.zerocopy = vm.count("no-zerocopy") == 0;
  o.datagrams = vm.count("no-datagrams") == 0;
  // Past these, a typo: a core spun for minutes after each page, disk space held for days.
  if (vm["poll-after-page-us"].as<unsigned>() > 10000) throw std::invalid_argument("--poll-after-page-us wants 0 to 10000");
  if (vm["keep-replaced-s"].as<unsigned>() > 86400) throw std::invalid_argument("--keep-replaced-s wants 0 to 86400");
  o.poll_after_page = std::chrono::microseconds(vm["poll-after-page-us"].as<unsigned>());
  o.keep_replaced = std::chrono::seconds(vm["keep-replaced-s"].as<unsigned>());
  if (vm.count("metrics")) {
    o.metrics = vm["metrics"].as<std::string>();
    auto at = SnapshotLocation::Server::parse(o.metrics, true);
    if (!at.ok()) throw std::invalid_argument("--metrics: " + at.error().message());
  }
  o.store_dir = vm["store"].as<std::string>();
  std::string listen = vm["listen"].as<std::string>();
  auto where = SnapshotLocation::Server::parse(listen, true);
  if (!where.ok()) throw std::invalid_argument("--listen: " + where.error().message());
  o.host = where->host;
  o.port = where->port;
  if (vm.count("token-file")) {
    auto t = net::read_token_file(vm["token-file"].as<std::string>());
    if (!t.ok()) throw std::runtime_error(t.error().message());
    o.token = *t;
  }
  auto list = snapshot::list_store(o.store_dir);
  if (!list.ok()) throw std::runtime_error(list.error().message());
  for (const auto& s : *list) {
    if (!s.damage.empty()) log::get("pageserver")->warn("snapshot {} cannot be served: {}", s.name, s.damage);
  }
  if (size_t n = snapshot::gc_leftovers(o.store_dir)) {
    log::get("pageserver")->info("deleted {} leftovers of uploads or removals whose process died", n);
  }
  // Each connection may hold two descriptors (its socket, its datagram session's own socket):
  // the soft limit goes up to the hard one, as servers do, and a shortfall is said once here
  // (sockets that cannot be had are refused or fall back, never crash the loop).
  rlimit nofile{};
  if (::getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur < nofile.rlim_max) {
    nofile.rlim_cur = nofile.rlim_max;
    (void)::setrlimit(RLIMIT_NOFILE, &nofile);
  }
  if (::getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur < 2 * o.max_connections + 64) {
    log::get("pageserver")->warn("open-file limit {} is below what {} connections may need ({}): raise it (ulimit -n)",
                                 nofile.rlim_cur, o.max_connections, 2 * o.max_connections + 64);
  }
  auto server = pageserver::PageServer::listen(o);
  if (!server.ok()) throw std::runtime_error(server.error().message());
  g_server = server->get();
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  log::get("pageserver")->info("serving {} snapshots from {} on {}:{}{}",
                               std::count_if(list->begin(), list->end(), [](const auto& s) { return s.damage.empty(); }),
                               o.store_dir, o.host,
                               (*server)->port(), o.token.empty() ? " (no token: anyone who can connect may read, upload, replace and remove snapshots)" : "");
  // One line on stdout once connections are accepted: scripts wait for it instead of polling.
  std::printf("listening on %s:%u\n", o.host.c_str(), static_cast<unsigned>((*server)->port()));
  std::fflush(stdout);
  Status s = (*server)->run();
  auto st = (*server)->stats();
  log::get("pageserver")->info("stopped: {} connections, {} requests, {} chunks, {} pages, {} bytes, {} restores "
                               "completed; errors: {} protocol, "
                               "{} auth, {} not-found, {} range, {} io, {} corrupt, {} handshake timeouts, {} stalled; datagrams: "
                               "{} page requests, {} dropped, {} replies unsent, {} over the path MTU, {} answered on the connection",
                               st.connections, st.requests, st.chunks, st.pages, st.bytes, st.restores_completed,
                               st.errors_protocol,
                               st.errors_auth, st.errors_not_found, st.errors_range, st.errors_io, st.errors_corrupt,
                               st.handshake_timeouts, st.connections_stalled, st.datagram_requests, st.datagrams_dropped, st.datagrams_unsent,
                               st.datagrams_over_mtu, st.datagrams_on_stream);
  if (!s.ok()) throw std::runtime_error(s.error().message());
  return 0;
}

int import_raw(const std::vector<std::string>& args) {
  po::options_description desc("lazymem-pageserver import");
  desc.add_options()("store", po::value<std::string>()->required(), "snapshot store directory")(
      "raw", po::value<std::string>()->required(), "raw memory file")("name", po::value<std::string>()->required(),
                                                                     "snapshot name")(
      "chunk-kib", po::value<uint32_t>()->default_value(64), "chunk size in KiB")(
      "zstd-level", po::value<int>()->default_value(1), "zstd level")(
      "format", po::value<uint32_t>()->default_value(2),
      "snapshot format: 2, or 1 for hosts running lazymem older than format 2")(
      "replace", "replace a snapshot of that name (or what is left of a damaged one)");
  auto vm = cli::parse(args, desc);
  CaptureOptions o;
  o.replace = vm.count("replace") > 0;
  o.format_version = vm["format"].as<uint32_t>();
  o.chunk_size = cli::chunk_bytes(vm, "chunk-kib");
  o.zstd_level = vm["zstd-level"].as<int>();
  // Before any work, as the import checks them: a wrong one is a usage error (2), not a failure.
  if (auto s = check_capture_options(o); !s.ok()) throw std::invalid_argument(s.error().message());
  auto target = SnapshotLocation::in_store(vm["store"].as<std::string>(), vm["name"].as<std::string>());
  if (!target.ok()) throw std::invalid_argument(target.error().message());
  auto rep = capture_raw_file(target->to_string(),
                              vm["raw"].as<std::string>(), o);
  if (!rep.ok()) throw std::runtime_error(rep.error().message());
  std::printf("imported %s: %.1f MiB stored of %.1f MiB (%s) in %.2f s\n", rep->location.c_str(),
              rep->stored_bytes / 1048576.0, rep->total_bytes / 1048576.0,
              rep->stored_bytes ? fmt::format("{:.2f}x", double(rep->total_bytes) / double(rep->stored_bytes)).c_str()
                                : "all zero",
              rep->seconds);
  return 0;
}

int ls(const std::vector<std::string>& args) {
  po::options_description desc("lazymem-pageserver ls");
  desc.add_options()("store", po::value<std::string>(), "snapshot store directory")(
      "server", po::value<std::string>(), "lazymem://HOST:PORT of a running server")(
      "token-file", po::value<std::string>(), "token for --server");
  auto vm = cli::parse(args, desc);
  check_store_or_server(vm);
  if (vm.count("store")) {
    auto list = snapshot::list_store(vm["store"].as<std::string>());
    if (!list.ok()) throw std::runtime_error(list.error().message());
    return print_list(*list);
  }
  auto loc = on_servers(vm, "");
  if (!loc.ok()) throw std::invalid_argument(loc.error().message());
  const std::string token = token_from(vm);
  auto list = net::list_remote(*loc, token, std::chrono::steady_clock::now() + std::chrono::seconds(10));
  if (!list.ok()) throw std::runtime_error(list.error().message());
  return print_list(*list);
}

int rm(const std::vector<std::string>& args) {
  po::options_description desc("lazymem-pageserver rm");
  desc.add_options()("store", po::value<std::string>(), "snapshot store directory")(
      "server", po::value<std::string>(), "lazymem://HOST:PORT of a running server")(
      "token-file", po::value<std::string>(), "token for --server")(
      "name", po::value<std::string>()->required(), "the snapshot to remove");
  auto vm = cli::parse(args, desc);
  check_store_or_server(vm);
  const std::string name = vm["name"].as<std::string>();
  auto loc = location_of(vm, name);
  if (!loc.ok()) throw std::invalid_argument(loc.error().message());
  Status s = ok_status();
  if (loc->remote()) {
    s = net::remove_remote(*loc, token_from(vm), std::chrono::steady_clock::now() + std::chrono::seconds(10));
  } else {
    s = snapshot::remove_snapshot(*loc);
  }
  if (!s.ok()) throw std::runtime_error(s.error().message());
  std::printf("removed %s\n", name.c_str());
  return 0;
}

// Exit status 1 when any snapshot is damaged, 3 when none is but some could not be checked (the
// server down, the store unreadable): scripts (a nightly scrub) act on each differently.
int verify(const std::vector<std::string>& args) {
  po::options_description desc("lazymem-pageserver verify (exit status 1: a snapshot is damaged; 3: one could not be checked)");
  desc.add_options()("store", po::value<std::string>(), "snapshot store directory")(
      "server", po::value<std::string>(), "lazymem://HOST:PORT of a running server (checks what it serves)")(
      "token-file", po::value<std::string>(), "token for --server")(
      "name", po::value<std::string>(), "the snapshot (default with --store: every snapshot)");
  auto vm = cli::parse(args, desc);
  check_store_or_server(vm);
  if (vm.count("server") && !vm.count("name")) throw std::invalid_argument("--server needs --name");
  const std::string where = vm.count("store") ? vm["store"].as<std::string>() : vm["server"].as<std::string>();
  std::vector<std::string> names;
  if (vm.count("name")) {
    names.push_back(vm["name"].as<std::string>());
  } else {
    auto list = snapshot::list_store(where);  // damaged ones too
    if (!list.ok()) throw std::runtime_error(list.error().message());
    for (const auto& s : *list) names.push_back(s.name);
    if (names.empty()) std::fprintf(stderr, "no snapshots in %s\n", where.c_str());
  }
  const std::string token_file = vm.count("token-file") ? vm["token-file"].as<std::string>() : "";
  size_t bad = 0, unchecked = 0;
  for (const std::string& name : names) {
    auto loc = location_of(vm, name);
    auto rep = loc.ok() ? verify_snapshot(loc->to_string(), token_file) : Result<VerifyReport>(std::move(loc).error());
    if (!rep.ok() && vm.count("name") && rep.error().code() == Errc::kNotFound &&
        !(vm.count("store") && snapshot::is_snapshot_dir(where + "/" + name))) {
      throw std::runtime_error(rep.error().message());  // a name that is not there: nothing to verify
    }
    if (!rep.ok()) {
      // A manifest that fails its checks is damage; a server that cannot be reached, a store
      // that cannot be read, says nothing about the snapshot.
      const Errc code = rep.error().code();
      const bool damage = code == Errc::kCorrupt || (code == Errc::kNotFound && vm.count("store") &&
                                                     snapshot::is_snapshot_dir(where + "/" + name));  // a file gone
      std::printf("%s: %s: %s\n", name.c_str(), damage ? "DAMAGED" : "not checked", rep.error().message().c_str());
      ++(damage ? bad : unchecked);
      continue;
    }
    std::printf("%s: %s, %llu chunks, %.1f MiB stored, %.1f MiB decoded in %.2f s\n", name.c_str(),
                rep->damaged.empty() ? "ok" : "DAMAGED", static_cast<unsigned long long>(rep->chunks),
                rep->stored_bytes / 1048576.0, rep->bytes / 1048576.0, rep->seconds);
    for (const auto& d : rep->damaged) std::printf("  %s\n", d.c_str());
    bad += !rep->damaged.empty();
  }
  std::fflush(stdout);  // the details before the summary, also when both go to one pipe
  if (bad) {
    std::fprintf(stderr, "%zu of %zu snapshots damaged: capture or upload them again (--replace)\n", bad, names.size());
  }
  if (unchecked) {
    std::fprintf(stderr, "%zu of %zu snapshots could not be checked (why: above); verify them again once that is mended\n",
                 unchecked, names.size());
  }
  return bad ? 1 : unchecked ? 3 : 0;
}

// Counters of a running server; of each, for a list of servers (lazymem://A:P,B:P): one that
// cannot be asked is reported and the others still shown.
int stats(const std::vector<std::string>& args) {
  po::options_description desc("lazymem-pageserver stats");
  desc.add_options()("server", po::value<std::string>()->required(), "lazymem://HOST:PORT[,HOST:PORT...] of running servers")(
      "token-file", po::value<std::string>(), "token")("json", "print JSON (an object by HOST:PORT for several servers)");
  auto vm = cli::parse(args, desc);
  auto loc = on_servers(vm, "");
  if (!loc.ok()) throw std::invalid_argument(loc.error().message());
  const std::string token = token_from(vm);
  const auto servers = loc->servers();
  nlohmann::json all = nlohmann::json::object();
  int failed = 0;
  for (size_t i = 0; i < servers.size(); ++i) {
    auto js = net::server_stats_json(loc->at(i), token, std::chrono::steady_clock::now() + std::chrono::seconds(10));
    if (!js.ok()) {
      if (servers.size() == 1) throw std::runtime_error(js.error().message());
      std::fprintf(stderr, "lazymem-pageserver stats: %s\n", js.error().message().c_str());
      ++failed;
      continue;
    }
    auto j = nlohmann::json::parse(*js);
    if (vm.count("json")) {
      all[servers[i].to_string()] = j;
      continue;
    }
    if (servers.size() > 1) std::printf("%s== %s\n", i == 0 ? "" : "\n", servers[i].to_string().c_str());
    for (auto& [k, v] : j.items()) std::printf("%-24s %s\n", k.c_str(), v.dump().c_str());
  }
  if (vm.count("json")) std::printf("%s\n", (servers.size() == 1 ? all.begin().value() : all).dump().c_str());
  return failed ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << kUsage;
    return 2;
  }
  std::string cmd = argv[1];
  std::vector<std::string> args(argv + 2, argv + argc);
  if (cmd == "-h" || cmd == "--help" || cmd == "help") {
    std::cout << kUsage;
    return 0;
  }
  using Command = int (*)(const std::vector<std::string>&);
  const std::pair<const char*, Command> commands[] = {{"serve", serve}, {"import", import_raw}, {"ls", ls},
                                                      {"rm", rm},       {"verify", verify},     {"stats", stats}};
  for (const auto& [name, fn] : commands) {
    if (cmd == name) return cli::run("lazymem-pageserver", cmd, [&, fn = fn] { return fn(args); });
  }
  std::cerr << "lazymem-pageserver: unknown command '" << cmd << "'\n" << kUsage;
  return 2;
}
