// Restoring through lazymem-agent: map, create and register the uffd here, hand it over.
#include "lazymem/agent_client.h"

#include <fmt/format.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <condition_variable>
#include <filesystem>
#include <functional>
#include <mutex>
#include <thread>

#include "agent.capnp.h"
#include "agent_client/unix_channel.h"
#include "core/log.h"
#include "fault/fault_engine.h"
#include "sys/before_fork.h"
#include "sys/mapping.h"
#include "sys/uapi_compat.h"
#include "sys/uffd.h"

namespace lazymem {
namespace pa = proto::agent;
namespace {

// How long a client waits for the agent to accept or refuse a request. The agent opens the
// snapshot first, which may take up to its page-server deadline (30 s by default): waiting
// longer than that, the client hears the agent's reason rather than a timeout of its own.
constexpr int kAgentAnswerMs = 60000;
constexpr std::string_view kAgent = "lazymem-agent";  // who sent a malformed reply (Header::read)

// The agent opens the paths a request names in its own working directory, not ours: a relative
// one would name another file there (another snapshot's pages served for our manifest). Local
// paths go to it absolute.
Result<std::string> absolute_for_agent(const std::string& path) {
  if (path.empty() || path.front() == '/') return path;
  std::error_code ec;
  std::filesystem::path abs = std::filesystem::absolute(path, ec);
  if (ec) return sys_error(fmt::format("{}: cannot make it absolute for lazymem-agent", path), ec.value());
  return abs.string();
}

// A snapshot location for the agent: lazymem:// ones name the same snapshot everywhere.
Result<std::string> location_for_agent(const std::string& location) {
  LAZYMEM_ASSIGN_OR_RETURN(SnapshotLocation loc, SnapshotLocation::parse(location));
  if (loc.remote()) return location;
  return absolute_for_agent(location);
}

}  // namespace

struct AgentRestore::Impl {
  std::string location;  // as the application gave it: names the restore in messages
  uint64_t session = 0;  // the agent's id for it
  Manifest manifest;
  std::vector<sys::Mapping> mappings;
  std::vector<RestoredRegion> regions;
  sys::Uffd uffd;  // our copy: kept until complete, so the agent's death cannot zero-fill pages
  sys::UniqueFd sock;
  net::FrameBuffer buf;
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  std::optional<Error> failure;
  std::mutex send_mu;  // the watchdog's failureSeen and a fork's fetchRest share `sock`

  // The process is about to fork: its child's copy of the memory would be the agent's alone to
  // fill (the child gets a uffd of its own, held by the agent only), and were the agent to die,
  // the kernel would zero-fill every page still missing there. So the restore completes first:
  // the agent fetches the rest now, and the fork waits for the complete (or the agent's end,
  // which poisons the rest here; the child then inherits those marks).
  void complete_before_fork() {
    {
      std::lock_guard lock(mu);
      if (done) return;
    }
    {
      capnp::MallocMessageBuilder b;
      auto rq = b.initRoot<pa::Request>();
      rq.setId(5);
      rq.setFetchRest(session);
      std::lock_guard lock(send_mu);
      (void)agent::send_frame_fd(sock.get(), b, {}, -1);  // if it cannot be sent, the agent is gone: done follows
    }
    std::unique_lock lock(mu);
    cv.wait(lock, [&] { return done; });
  }

  // Runs until the agent says complete, or dies. Owns `sock` reads.
  void watch() {
    std::deque<sys::UniqueFd> fds;
    for (;;) {
      auto f = buf.next();
      if (!f.ok()) return on_agent_gone(f.error().message());
      if (f->has_value()) {
        auto h = net::Header::parse((*f)->header);
        if (!h.ok()) return on_agent_gone(h.error().message());
        // Whether the restore is complete; a malformed reply is an agent gone wrong, as gone.
        Result<bool> complete = (*h)->read(kAgent, [&]() -> Result<bool> {
          auto reply = (*h)->root<pa::Reply>();
          if (reply.isComplete()) return true;
          if (reply.isFailed()) {
            // Said here, in this process's stderr, as an in-process restore says it: the agent
            // poisons the failed pages (the next access to one dies of SIGBUS) only once told it
            // has been said. The rest keeps being served.
            std::string why = fmt::format("lazymem-agent: {}", reply.getFailed().cStr());
            fault::log_restore_failure(location, why);
            (void)failure_seen();  // if it cannot be sent, the agent is gone: the next read says so
            std::lock_guard lock(mu);
            failure = Error(Errc::kIo, why);
            cv.notify_all();
          }
          return false;
        });
        buf.consume();
        if (!complete.ok()) return on_agent_gone(complete.error().message());
        if (*complete) return finish(std::nullopt);
        continue;
      }
      Status s = agent::recv_some(sock.get(), buf, fds, -1);
      if (!s.ok()) return on_agent_gone(s.error().message());
    }
  }

  // Tells the agent the failure has been said, so it poisons the failed pages now.
  Status failure_seen() {
    capnp::MallocMessageBuilder b;
    auto rq = b.initRoot<pa::Request>();
    rq.setId(4);
    rq.setFailureSeen(session);
    std::lock_guard lock(send_mu);
    return agent::send_frame_fd(sock.get(), b, {}, -1);
  }

  void finish(std::optional<Error> err) {
    std::lock_guard lock(mu);
    if (err && !failure) failure = std::move(err);
    done = true;
    uffd = sys::Uffd();  // every page is present (or poisoned): nothing left to zero-fill
    cv.notify_all();
  }

  // The agent is gone with pages still missing: nobody will ever fill them. Poison them so an
  // access fails visibly (SIGBUS) instead of hanging or reading zeros.
  void on_agent_gone(const std::string& why) {
    log::get("runtime")->error("lazymem-agent went away before the restore completed ({}); "
                               "pages not yet restored will raise SIGBUS",
                               why);
    for (const auto& m : mappings) {
      for (size_t off = 0; off < m.size(); off += 4096) {
        sys::InstallResult r = uffd.poison(m.address() + off, 4096);
        if (r.outcome == sys::InstallOutcome::kFailed && r.err == EINVAL) {
          // No UFFDIO_POISON here: the only visible failure left is to stop the process.
          log::get("runtime")->error("kernel has no UFFDIO_POISON; terminating");
          ::kill(::getpid(), SIGKILL);
        }
      }
    }
    finish(Error(Errc::kPeerGone, "lazymem-agent went away before the restore completed: " + why));
  }

  sys::BeforeFork fork_hook;  // last: unregistered (and waited for) before the rest is destroyed
};

AgentRestore::AgentRestore(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

AgentRestore::~AgentRestore() {
  // The memory is the application's, and the agent keeps serving it: the watchdog (which owns
  // a reference to our state) lives on until the restore completes or the agent goes away.
  for (auto& m : impl_->mappings) m.release();
}

Result<std::unique_ptr<AgentRestore>> AgentRestore::start(const std::string& socket_path, const std::string& location,
                                                          const AgentRestoreOptions& options) {
  auto impl = std::make_unique<Impl>();
  impl->location = location;
  LAZYMEM_ASSIGN_OR_RETURN(impl->manifest, read_manifest(location, options.token_file));
  const Manifest& m = impl->manifest;
  for (size_t i = 0; i < m.regions.size(); ++i) {
    const RegionInfo& r = m.regions[i];
    if (r.kind != RegionKind::kProcess) {
      return Error(Errc::kInvalidArgument, fmt::format("{}: region '{}' is a raw memory image; hand it to the agent "
                                                       "with the Firecracker handshake instead",
                                                       location, r.name));
    }
    int prot = static_cast<int>(r.protection) & (PROT_READ | PROT_WRITE | PROT_EXEC);
    auto map = sys::Mapping::anonymous_at(r.start_address, r.length, prot | PROT_READ);
    if (!map.ok()) return std::move(map).error().wrap(fmt::format("{}: region '{}'", location, r.name));
    impl->regions.push_back(RestoredRegion{r.name, map->data(), r.length});
    impl->mappings.push_back(std::move(*map));
  }
  uint64_t wanted = UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMAP |
                    UFFD_FEATURE_EVENT_FORK;
  LAZYMEM_ASSIGN_OR_RETURN(impl->uffd, sys::Uffd::open(wanted, 0, true));
  for (const auto& mp : impl->mappings) {
    auto ioctls = impl->uffd.register_missing(mp.address(), mp.size());
    if (!ioctls.ok()) return std::move(ioctls).error();
  }
  LAZYMEM_ASSIGN_OR_RETURN(std::string agent_location, location_for_agent(location));
  LAZYMEM_ASSIGN_OR_RETURN(std::string agent_token_file, absolute_for_agent(options.token_file));
  LAZYMEM_ASSIGN_OR_RETURN(impl->sock, agent::connect_unix(socket_path));

  capnp::MallocMessageBuilder b;
  auto rq = b.initRoot<pa::Request>();
  rq.setId(1);
  auto rs = rq.initRestore();
  rs.setSnapshot(agent_location);
  rs.setPrefetch(options.prefetch);
  rs.setUffdFeatures(impl->uffd.features());
  rs.setTokenFile(agent_token_file);
  rs.setManifestChecksum(m.checksum);  // the agent serves this version or refuses
  rs.setAnnouncesFailures(true);       // the watchdog says why before pages are poisoned
  if (!options.base.empty()) {
    LAZYMEM_ASSIGN_OR_RETURN(std::string agent_base, location_for_agent(options.base));
    rs.setBase(agent_base);
  }
  auto ranges = rs.initRanges(static_cast<unsigned>(m.regions.size()));
  for (unsigned i = 0; i < m.regions.size(); ++i) {
    ranges[i].setStart(m.regions[i].start_address);
    ranges[i].setLength(m.regions[i].length);
    ranges[i].setRegion(i);
    ranges[i].setRegionOffset(0);
  }
  LAZYMEM_TRY(agent::send_frame_fd(impl->sock.get(), b, {}, impl->uffd.fd()));
  std::deque<sys::UniqueFd> fds;
  for (;;) {
    auto f = impl->buf.next();
    if (!f.ok()) return std::move(f).error();
    if (f->has_value()) {
      LAZYMEM_ASSIGN_OR_RETURN(auto h, net::Header::parse((*f)->header));
      impl->buf.consume();
      LAZYMEM_TRY(h->read(kAgent, [&]() -> Status {
        auto reply = h->root<pa::Reply>();
        if (reply.isError()) return Error(Errc::kInvalidArgument, fmt::format("lazymem-agent refused the restore: {}", reply.getError().cStr()));
        if (!reply.isAccepted()) return Error(Errc::kProtocol, "lazymem-agent: unexpected reply to restore");
        impl->session = reply.getAccepted();
        return ok_status();
      }));
      break;
    }
    LAZYMEM_TRY(agent::recv_some(impl->sock.get(), impl->buf, fds, kAgentAnswerMs));
  }
  std::shared_ptr<Impl> shared = std::move(impl);
  shared->fork_hook = sys::BeforeFork([self = shared.get()] { self->complete_before_fork(); });
  // Detached at once: it holds the state it needs, and ends on its own when the restore does
  // (a finished thread nobody joins is a leak to the sanitizers, if the process exits first).
  std::thread([shared] { shared->watch(); }).detach();
  return std::unique_ptr<AgentRestore>(new AgentRestore(std::move(shared)));
}

const std::vector<RestoredRegion>& AgentRestore::regions() const { return impl_->regions; }

const RestoredRegion* AgentRestore::region(std::string_view name) const {
  for (const auto& r : impl_->regions)
    if (r.name == name) return &r;
  return nullptr;
}

const std::vector<std::byte>& AgentRestore::app_state() const { return impl_->manifest.app_state; }

Status AgentRestore::wait_complete(std::chrono::milliseconds timeout) {
  std::unique_lock lock(impl_->mu);
  if (!impl_->cv.wait_for(lock, timeout, [&] { return impl_->done; })) {
    return Error(Errc::kTimeout, "restore through lazymem-agent not complete yet");
  }
  if (impl_->failure) return *impl_->failure;
  return ok_status();
}

struct AgentFirecrackerServe::Impl {
  sys::UniqueFd sock;
  net::FrameBuffer buf;
  uint64_t session = 0;
  bool complete = false;
  bool exited = false;
};

AgentFirecrackerServe::AgentFirecrackerServe(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
AgentFirecrackerServe::~AgentFirecrackerServe() = default;
uint64_t AgentFirecrackerServe::session() const { return impl_->session; }
bool AgentFirecrackerServe::complete() const { return impl_->complete; }
bool AgentFirecrackerServe::exited() const { return impl_->exited; }

Result<std::unique_ptr<AgentFirecrackerServe>> AgentFirecrackerServe::start(const std::string& agent_socket,
                                                                            const FirecrackerServeOptions& options) {
  auto impl = std::make_unique<Impl>();
  LAZYMEM_ASSIGN_OR_RETURN(std::string socket_path, absolute_for_agent(options.socket_path));
  LAZYMEM_ASSIGN_OR_RETURN(std::string snapshot, location_for_agent(options.snapshot));
  LAZYMEM_ASSIGN_OR_RETURN(std::string token_file, absolute_for_agent(options.token_file));
  LAZYMEM_ASSIGN_OR_RETURN(impl->sock, agent::connect_unix(agent_socket));
  capnp::MallocMessageBuilder b;
  auto rq = b.initRoot<pa::Request>();
  rq.setId(3);
  auto fc = rq.initServeFirecracker();
  fc.setSocketPath(socket_path);
  fc.setSnapshot(snapshot);
  fc.setTokenFile(token_file);
  fc.setPrefetch(options.prefetch);
  fc.setCancelOnClose(options.cancel_on_close);
  LAZYMEM_TRY(agent::send_frame_fd(impl->sock.get(), b, {}, -1));
  std::unique_ptr<AgentFirecrackerServe> out(new AgentFirecrackerServe(std::move(impl)));
  Status first = out->wait_event(std::chrono::milliseconds(kAgentAnswerMs));  // the socket listens, or why not
  if (!first.ok()) return std::move(first).error();
  return out;
}

Status AgentFirecrackerServe::wait_event(std::chrono::milliseconds timeout) {
  std::deque<sys::UniqueFd> fds;
  for (;;) {
    auto f = impl_->buf.next();
    if (!f.ok()) return std::move(f).error();
    if (f->has_value()) {
      LAZYMEM_ASSIGN_OR_RETURN(auto h, net::Header::parse((*f)->header));
      impl_->buf.consume();
      return h->read(kAgent, [&]() -> Status {
        auto reply = h->root<pa::Reply>();
        if (reply.isError()) return Error(Errc::kInvalidArgument, fmt::format("lazymem-agent: {}", reply.getError().cStr()));
        if (reply.isFailed()) return Error(Errc::kIo, fmt::format("lazymem-agent: {}", reply.getFailed().cStr()));
        if (reply.isAccepted()) {
          if (reply.getAccepted() != 0) impl_->session = reply.getAccepted();
          return ok_status();
        }
        if (reply.isComplete()) {
          impl_->complete = true;
          return ok_status();
        }
        if (reply.isExited()) {
          impl_->exited = true;
          return ok_status();
        }
        return Error(Errc::kProtocol, "lazymem-agent: unexpected reply");
      });
    }
    Status s = agent::recv_some(impl_->sock.get(), impl_->buf, fds, static_cast<int>(timeout.count()));
    if (!s.ok() && s.error().code() == Errc::kPeerGone) {
      // Firecracker keeps its own copy of the uffd, so the kernel neither zero-fills nor fails
      // its missing pages: vCPUs touching them would block. Whoever holds this must stop the VM.
      return Error(Errc::kPeerGone, "lazymem-agent went away before the VM's memory was complete: vCPUs touching "
                                    "pages not yet restored will block; stop the VM (see lazymem-agent's log)");
    }
    if (!s.ok()) return s;
  }
}

namespace {

// One request on a fresh connection, its json reply within `timeout_ms`.
Result<std::string> ask_json(const std::string& socket_path, const std::function<void(pa::Request::Builder)>& fill,
                             int timeout_ms) {
  LAZYMEM_ASSIGN_OR_RETURN(sys::UniqueFd sock, agent::connect_unix(socket_path));
  capnp::MallocMessageBuilder b;
  auto rq = b.initRoot<pa::Request>();
  rq.setId(2);
  fill(rq);
  LAZYMEM_TRY(agent::send_frame_fd(sock.get(), b, {}, -1));
  net::FrameBuffer buf;
  std::deque<sys::UniqueFd> fds;
  for (;;) {
    auto f = buf.next();
    if (!f.ok()) return std::move(f).error();
    if (f->has_value()) {
      LAZYMEM_ASSIGN_OR_RETURN(auto h, net::Header::parse((*f)->header));
      return h->read(kAgent, [&]() -> Result<std::string> {
        auto reply = h->root<pa::Reply>();
        if (reply.isError()) return Error(Errc::kPermission, std::string("lazymem-agent: ") + reply.getError().cStr());
        if (reply.isJson()) return std::string(reply.getJson().cStr());
        return Error(Errc::kProtocol, "lazymem-agent: unexpected reply");
      });
    }
    LAZYMEM_TRY(agent::recv_some(sock.get(), buf, fds, timeout_ms));
  }
}

}  // namespace

Result<std::string> agent_query(const std::string& socket_path, bool stats) {
  return ask_json(socket_path, [&](pa::Request::Builder rq) {
    if (stats) rq.setStats();
    else rq.setStatus();
  }, 10000);
}

Result<std::string> agent_wait_change(const std::string& socket_path, uint64_t after, std::chrono::milliseconds timeout) {
  return ask_json(socket_path, [&](pa::Request::Builder rq) { rq.setWaitChange(after); },
                  static_cast<int>(timeout.count()));
}

}  // namespace lazymem
