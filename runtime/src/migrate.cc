// MigrationSource: pre-copy into a base near the destination, a switch-over that copies nothing,
// post-copy served from this process's paused memory.
#include "lazymem/migrate.h"

#include <fmt/format.h>
#include <sys/mman.h>

#include <chrono>

#include "core/log.h"
#include "net/auth.h"
#include "net/memory_server.h"
#include "precopy.h"
#include "snapshot/chunk_codec.h"
#include "snapshot/manifest.h"

namespace lazymem {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

bool loopback(const std::string& host) {
  return host == "localhost" || host == "::1" || host.rfind("127.", 0) == 0;
}

// The host the destination dials: `advertise`, or listen's host unless it is a wildcard. And
// the paused memory is not served to the network without a token.
Result<std::string> advertised_host(const MigrationOptions& m, bool has_token) {
  LAZYMEM_ASSIGN_OR_RETURN(auto listen, SnapshotLocation::Server::parse(m.listen, /*any_port=*/true));
  if (!has_token && !loopback(listen.host)) {
    return Error(Errc::kInvalidArgument,
                 fmt::format("migration: serving the paused memory on {} without a token would let any host that "
                             "reaches it read it: set CaptureOptions::token_file (the destination restores with the "
                             "same RestoreOptions::token_file), or listen on loopback",
                             m.listen));
  }
  if (!m.advertise.empty()) return m.advertise;
  if (listen.host == "0.0.0.0" || listen.host == "::" || listen.host.empty()) {
    return Error(Errc::kInvalidArgument, fmt::format("migration: listening on {} (every address), the destination "
                                                     "needs to be told one: set MigrationOptions::advertise",
                                                     m.listen));
  }
  return listen.host;
}

}  // namespace

struct MigrationSource::Impl {
  std::function<void()> resume;  // abort() only: ends the pause
  // Another process's memory: the copy here of the chunks served (the rest dropped at the switch).
  std::unique_ptr<ProcessMirror> mirror;
  std::vector<AddressRange> unserved;  // of the mirror: not needed once serving
  std::unique_ptr<net::MemoryServer> server;
  std::string location;
  MigrationReport report;
  Clock::time_point serving_since;
};

MigrationSource::MigrationSource(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
MigrationSource::~MigrationSource() = default;

const std::string& MigrationSource::location() const { return impl_->location; }
const MigrationReport& MigrationSource::report() const { return impl_->report; }

Result<std::unique_ptr<MigrationSource>> MigrationSource::start(const std::string& base, std::span<const CaptureRegion> regions,
                                                                const CaptureOptions& options, const MigrationOptions& migration,
                                                                const KernelFeatures& features) {
  // Everything that can be refused is refused before the workload is touched: the port is
  // bound now (a taken one, or a name to look up, must not land in the pause).
  std::string token;
  if (!options.token_file.empty()) {
    LAZYMEM_ASSIGN_OR_RETURN(token, net::read_token_file(options.token_file));
  }
  LAZYMEM_ASSIGN_OR_RETURN(std::string host, advertised_host(migration, !token.empty()));
  LAZYMEM_ASSIGN_OR_RETURN(SnapshotLocation base_loc, SnapshotLocation::parse(base));
  auto listener = net::listen_tcp("migration listen address (MigrationOptions::listen)", migration.listen, 64);
  if (!listener.ok()) return std::move(listener).error().wrap("migration");

  auto impl = std::make_unique<Impl>();
  const auto started = Clock::now();
  auto pre = precopy(base, regions, options, migration.precopy, features);
  if (!pre.ok()) return std::move(pre).error().wrap("migration, pre-copy");
  Precopy& p = *pre;
  // The base is committed while the workload still runs: its upload is not downtime. Chunks
  // written meanwhile are found in the pause.
  auto committed = p.writer->finish();
  if (!committed.ok()) return std::move(committed).error().wrap("migration, committing the pre-copy to " + base);
  impl->report.precopy = *committed;
  impl->report.precopy.rounds = p.rounds;
  impl->report.precopy.tracking = p.tracker->method();
  impl->report.precopy_seconds = seconds_since(started);

  if (Status go_on = check_cancelled(migration.precopy); !go_on.ok()) {
    return std::move(go_on).error().wrap(fmt::format("migration (the pre-copy committed to {} is left)", base));
  }
  const auto paused_at = Clock::now();
  auto paused = pause_workload(migration.precopy);
  if (!paused.ok()) return std::move(paused).error().wrap("migration, pausing the workload");
  impl->resume = paused->resume;
  impl->report.paused_here = static_cast<bool>(paused->resume);
  // From here the workload is parked. It resumes here only if the switch-over fails; once the
  // server serves, it is the destination's.
  ResumeOnExit resume_on_failure{paused->resume};

  LAZYMEM_ASSIGN_OR_RETURN(DirtyChunks written, collect_dirty_chunks(p, regions, options.chunk_size));
  impl->report.written_bytes = written.bytes;
  // The source's manifest: the base's, with each chunk written since stored "raw" at a place
  // past the base's data (nothing is stored there: the bytes are served from memory) and its
  // checksum taken now. RoutedSource reads every unchanged entry from the base.
  Manifest m = p.writer->manifest();
  const uint64_t base_end = m.data_length;
  uint64_t data_end = base_end;
  for (size_t r = 0; r < regions.size(); ++r) {
    const auto* bytes = static_cast<const std::byte*>(regions[r].address);
    for (size_t c : written.chunks[r]) {
      const uint32_t len = m.chunk_length(r, c);
      std::span<const std::byte> chunk(bytes + c * uint64_t{m.chunk_size}, len);
      ChunkInfo& info = m.regions[r].chunks[c];
      info = ChunkInfo{};
      if (snapshot::is_all_zero(chunk)) {
        ++impl->report.postcopy_zero_chunks;
        continue;
      }
      info.codec = Codec::kRaw;
      info.offset = data_end;
      info.stored_length = len;
      info.checksum = snapshot::chunk_checksum(chunk);
      data_end += len;
      ++impl->report.postcopy_chunks;
      impl->report.postcopy_bytes += len;
    }
  }
  m.data_length = data_end;
  if (migration.precopy.app_state) m.app_state = migration.precopy.app_state();
  m.created_unix_ns = static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch()).count());
  LAZYMEM_TRY(snapshot::validate_manifest(m));
  // Everything served from memory was read while it was paused; if it was continued meanwhile,
  // what was read may be torn (and it runs here): called off.
  if (paused->still_paused) {
    if (Status still = paused->still_paused(); !still.ok()) return std::move(still).error().wrap("migration, switch-over");
  }

  net::MemoryServerOptions so;
  so.listen = migration.listen;
  so.listener = std::make_shared<net::Listener>(std::move(*listener));
  so.token = token;
  so.handshake_timeout = migration.handshake_timeout;
  so.linger = migration.linger;
  // Served from memory: the entries placed past the base's data above (called by start() only).
  auto chunk_bytes = [&](uint32_t region, uint32_t chunk) -> std::span<const std::byte> {
    const ChunkInfo& ci = m.regions[region].chunks[chunk];
    if (ci.codec != Codec::kRaw || ci.offset < base_end) return {};
    return {static_cast<const std::byte*>(regions[region].address) + uint64_t{chunk} * m.chunk_size, ci.stored_length};
  };
  auto server = net::MemoryServer::start(base_loc.name, snapshot::encode_manifest(m), chunk_bytes, std::move(so));
  if (!server.ok()) return std::move(server).error().wrap("migration, serving post-copy on " + migration.listen);
  impl->server = std::move(*server);
  if (p.mirror) {
    // The copy of another process's memory is needed for the chunks served from it only: the
    // rest is given back by wait_postcopy(), once the destination has been told where to restore.
    for (size_t r = 0; r < regions.size(); ++r) {
      const uintptr_t start = reinterpret_cast<uintptr_t>(regions[r].address);
      for (size_t c = 0; c < m.regions[r].chunks.size(); ++c) {
        if (!chunk_bytes(static_cast<uint32_t>(r), static_cast<uint32_t>(c)).empty()) continue;
        const uintptr_t at = start + c * uint64_t{m.chunk_size};
        if (!impl->unserved.empty() && impl->unserved.back().end() == at) impl->unserved.back().length += m.chunk_length(r, c);
        else impl->unserved.push_back({at, m.chunk_length(r, c)});
      }
    }
    impl->mirror = std::move(p.mirror);
  }
  SnapshotLocation served;
  served.host = host;
  served.port = impl->server->port();
  served.name = base_loc.name;
  impl->location = served.to_string();
  impl->report.switch_seconds = seconds_since(paused_at);
  impl->serving_since = Clock::now();
  resume_on_failure.armed = false;
  log::get("runtime")->info("migration: pre-copied {} bytes in {} rounds to {}; paused, {} chunks ({} bytes) written since "
                       "are served from here as {}",
                       impl->report.precopy.stored_bytes, p.rounds, base, impl->report.postcopy_chunks,
                       impl->report.postcopy_bytes, impl->location);
  return std::unique_ptr<MigrationSource>(new MigrationSource(std::move(impl)));
}

Status MigrationSource::abort() {
  if (!impl_->server) return Error(Errc::kInvalidArgument, "migration: abort() was called already");
  if (!impl_->server->withdraw()) {
    return Error(Errc::kExists, fmt::format("migration: a destination has read {}'s manifest and may be running the "
                                            "workload: it is not resumed here (two copies would run)",
                                            impl_->location));
  }
  impl_->server.reset();  // stops serving, closes every connection
  if (impl_->resume) impl_->resume();
  log::get("runtime")->info("migration: called off before any destination came; {} resumed here", impl_->location);
  return ok_status();
}

Result<MigrationReport> MigrationSource::wait_postcopy(std::chrono::milliseconds timeout,
                                                       const std::function<bool()>& stop) {
  if (!impl_->server) return Error(Errc::kInvalidArgument, "migration: it was called off (abort())");
  for (const AddressRange& r : impl_->unserved) impl_->mirror->drop(r.start, r.length);
  impl_->unserved.clear();
  Status drained = impl_->server->wait_drained(timeout, stop);
  const auto st = impl_->server->stats();
  impl_->report.served_chunks = st.chunks_sent;
  impl_->report.served_bytes = st.bytes_sent;
  impl_->report.destination_said_complete = st.restores_completed > 0;
  if (!drained.ok()) return std::move(drained).error().wrap("migration, post-copy from " + impl_->location);
  impl_->report.postcopy_seconds = seconds_since(impl_->serving_since);
  return impl_->report;
}

}  // namespace lazymem
