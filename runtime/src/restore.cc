// Lazy (and eager) restore of a snapshot into the calling process.
#include "lazymem/restore.h"

#include <fmt/format.h>
#include <sys/mman.h>
#include <unistd.h>

#include <optional>

#include "core/log.h"
#include "fault/fault_engine.h"
#include "fault/thread_faults.h"
#include "net/auth.h"
#include "net/remote.h"
#include "snapshot/chunk_codec.h"
#include "snapshot/read_chunks.h"
#include "snapshot/routed_source.h"
#include "snapshot/snapshot_reader.h"
#include "source.h"
#include "sys/before_fork.h"
#include "sys/mapping.h"
#include "sys/uapi_compat.h"
#include "sys/uffd.h"

namespace lazymem {

namespace {

// `files`: a local snapshot's; `token`: a page server's.
Result<std::shared_ptr<snapshot::ChunkSource>> open_one_source(const SnapshotLocation& loc,
                                                               std::optional<snapshot::SnapshotFiles> files,
                                                               const std::string& token, const RestoreOptions& options) {
  if (loc.remote()) {
    net::RemoteOptions ro;
    ro.token = token;
    ro.reads_in_flight = options.reads_in_flight;
    ro.fetch_attempts = options.fetch_attempts;
    ro.deadline = options.fault_deadline;
    return net::open_remote_source(loc, ro);
  }
  if (!files) {
    return Error(Errc::kInvalidArgument, fmt::format("snapshot {}: its files were not opened", loc.to_string()));
  }
  snapshot::LocalReaderOptions lo;
  lo.direct = options.direct_io;
  lo.io = options.force_pread ? snapshot::IoEngine::kPread : snapshot::IoEngine::kAuto;
  lo.max_batch = options.reads_in_flight;
  LAZYMEM_ASSIGN_OR_RETURN(auto snap, snapshot::LocalSnapshot::open(std::move(*files), lo));
  return std::shared_ptr<snapshot::ChunkSource>(std::move(snap));
}

Result<std::shared_ptr<snapshot::ChunkSource>> open_one_source(OpenedLocation opened, const std::string& token,
                                                               const RestoreOptions& options) {
  LAZYMEM_ASSIGN_OR_RETURN(SnapshotLocation loc, SnapshotLocation::parse(opened.location));
  return open_one_source(loc, std::move(opened.files), token, options);
}

Result<std::shared_ptr<snapshot::ChunkSource>> with_base(const std::string& location,
                                                         std::shared_ptr<snapshot::ChunkSource> primary,
                                                         Result<std::shared_ptr<snapshot::ChunkSource>> base) {
  if (!base.ok()) return std::move(base).error().wrap("the base of " + location);
  LAZYMEM_ASSIGN_OR_RETURN(auto routed, snapshot::RoutedSource::open(std::move(primary), std::move(*base)));
  return std::shared_ptr<snapshot::ChunkSource>(std::move(routed));
}

}  // namespace

namespace {

Result<OpenedLocation> open_location(const std::string& location, bool direct_io) {
  LAZYMEM_ASSIGN_OR_RETURN(SnapshotLocation loc, SnapshotLocation::parse(location));
  OpenedLocation out{location, std::nullopt};
  if (!loc.remote()) {
    LAZYMEM_ASSIGN_OR_RETURN(out.files, snapshot::open_snapshot_files(loc, direct_io));
  }
  return out;
}

}  // namespace

Result<OpenedLocations> open_locations(const std::string& location, const std::string& base, bool direct_io) {
  OpenedLocations out;
  LAZYMEM_ASSIGN_OR_RETURN(out.primary, open_location(location, direct_io));
  if (!base.empty()) {
    auto opened = open_location(base, direct_io);
    if (!opened.ok()) return std::move(opened).error().wrap("the base of " + location);
    out.base = std::move(*opened);
  }
  return out;
}

Result<std::shared_ptr<snapshot::ChunkSource>> open_chunk_source(const std::string& location,
                                                                 const RestoreOptions& options) {
  LAZYMEM_ASSIGN_OR_RETURN(OpenedLocations opened, open_locations(location, options.base, options.direct_io));
  // A page server's token, read only when one is asked (a local restore names no token file).
  std::string token;
  if (!options.token_file.empty() && (!opened.primary.files || (opened.base && !opened.base->files))) {
    LAZYMEM_ASSIGN_OR_RETURN(token, net::read_token_file(options.token_file));
  }
  return open_chunk_source(std::move(opened.primary), std::move(opened.base), token, options);
}

Result<std::shared_ptr<snapshot::ChunkSource>> open_chunk_source(OpenedLocation primary, std::optional<OpenedLocation> base,
                                                                 const std::string& token, const RestoreOptions& options) {
  const std::string location = primary.location;
  LAZYMEM_ASSIGN_OR_RETURN(auto source, open_one_source(std::move(primary), token, options));
  if (!base) return source;
  return with_base(location, std::move(source), open_one_source(std::move(*base), token, options));
}

Result<Manifest> read_manifest(const std::string& location, const std::string& token_file) {
  LAZYMEM_ASSIGN_OR_RETURN(SnapshotLocation loc, SnapshotLocation::parse(location));
  if (loc.remote()) return net::read_remote_manifest(loc, token_file);
  return snapshot::read_local_manifest(loc);
}

struct LazyRestore::Impl {
  std::shared_ptr<snapshot::ChunkSource> source;
  std::vector<sys::Mapping> mappings;  // released to the application once restored
  std::vector<RestoredRegion> regions;
  std::unique_ptr<fault::FaultEngine> engine;
  // One per page size: the engine installs a session's pages at one size (huge pages whole).
  std::vector<fault::SessionId> sessions;
  std::vector<size_t> session_of_region;  // index into sessions, per manifest region
  std::shared_ptr<fault::ThreadFaults> thread_faults;  // fault_on_thread
  bool finished = false;
  // fault_on_thread: a child could not fetch its pages (the handler is ours), so fork() settles
  // the restore first. Last: unregistered before the engine it uses is destroyed.
  sys::BeforeFork fork_hook;

  // Fetches the rest and waits until every chunk is present or failed (poisoned), not just until
  // the first failure: then no page is left that the kernel would zero-fill, were the uffd closed
  // or the memory copied into a child.
  // With several sessions, a timeout wins over another's failure: finish() must not stop
  // serving pages still missing.
  Status settle() {
    for (fault::SessionId id : sessions) engine->set_prefetch(id, true);
    Status first = ok_status();
    for (fault::SessionId id : sessions) {
      Status s = engine->wait_complete(id, std::chrono::hours(24), fault::FaultEngine::Wait::kSettled);
      if (!s.ok() && (first.ok() || s.error().code() == Errc::kTimeout)) first = std::move(s);
    }
    return first;
  }
};

LazyRestore::LazyRestore(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

LazyRestore::~LazyRestore() {
  Status s = finish();
  if (!s.ok()) {
    // The pages that failed are poisoned (or the process was killed); say so once.
    log::get("runtime")->error("lazy restore did not complete: {}", s.error().message());
  }
}

Result<std::unique_ptr<LazyRestore>> LazyRestore::start(const std::string& location, const RestoreOptions& options) {
  KernelFeatures kf = probe_kernel();
  return start(location, kf, options);
}

Result<std::unique_ptr<LazyRestore>> LazyRestore::start(const std::string& location, const KernelFeatures& features,
                                                        const RestoreOptions& options) {
  if (!features.uffd_usable) return Error(Errc::kUnsupported, features.uffd_error);
  auto impl = std::make_unique<Impl>();
  LAZYMEM_ASSIGN_OR_RETURN(impl->source, open_chunk_source(location, options));
  const Manifest& m = impl->source->manifest();
  long sys_page = ::sysconf(_SC_PAGESIZE);

  // Map everything first: if any range is taken, the Mapping destructors undo the rest. Regions
  // of one page size share a uffd and an engine session.
  struct Group {
    uint64_t page_size;  // 0: ordinary pages
    std::vector<fault::MappedRange> ranges;
    std::vector<size_t> mappings;  // into impl->mappings
  };
  std::vector<Group> groups;
  for (size_t i = 0; i < m.regions.size(); ++i) {
    const RegionInfo& r = m.regions[i];
    if (r.kind != RegionKind::kProcess) {
      return Error(Errc::kInvalidArgument,
                   fmt::format("{}: region '{}' is a raw memory image with no address; restore it through the agent "
                               "(Firecracker handshake) or restore_into()",
                               location, r.name));
    }
    if (r.page_size != static_cast<uint32_t>(sys_page)) {
      return Error(Errc::kUnsupported, fmt::format("{}: region '{}' uses {}-byte pages; only {}-byte pages are supported",
                                                   location, r.name, r.page_size, sys_page));
    }
    const uint64_t huge = options.huge_pages ? r.huge_page_size : 0;
    if (huge != 0 && (huge > fault::kMaxHugePage || m.chunk_size > huge)) {
      return Error(Errc::kUnsupported,
                   fmt::format("{}: region '{}' was huge-page memory ({} KiB pages), which is restored onto huge "
                               "pages up to {} MiB gathered from chunks of at most the page size (these are {} KiB): "
                               "restore it on ordinary pages (RestoreOptions::huge_pages = false)",
                               location, r.name, huge >> 10, fault::kMaxHugePage >> 20, m.chunk_size >> 10));
    }
    if (huge != 0 && options.fault_on_thread) {
      return Error(Errc::kUnsupported,
                   fmt::format("{}: region '{}' was huge-page memory ({} KiB pages), which faults on the faulting "
                               "thread do not serve: restore without fault_on_thread, or on ordinary pages "
                               "(RestoreOptions::huge_pages = false)",
                               location, r.name, huge >> 10));
    }
    int prot = static_cast<int>(r.protection) & (PROT_READ | PROT_WRITE | PROT_EXEC);
    if ((prot & PROT_READ) == 0) prot |= PROT_READ;
    auto map = huge != 0 ? sys::Mapping::huge_at(r.start_address, r.length, prot, huge)
                         : sys::Mapping::anonymous_at(r.start_address, r.length, prot);
    if (!map.ok()) return std::move(map).error().wrap(fmt::format("{}: region '{}'", location, r.name));
    auto g = std::find_if(groups.begin(), groups.end(), [&](const Group& x) { return x.page_size == huge; });
    if (g == groups.end()) g = groups.insert(groups.end(), Group{huge, {}, {}});
    impl->regions.push_back(RestoredRegion{r.name, map->data(), r.length});
    g->ranges.push_back(fault::MappedRange{r.start_address, r.length, static_cast<uint32_t>(i), 0});
    impl->session_of_region.push_back(static_cast<size_t>(g - groups.begin()));
    g->mappings.push_back(impl->mappings.size());
    impl->mappings.push_back(std::move(*map));
  }

  uint64_t wanted = UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMAP |
                    UFFD_FEATURE_EVENT_FORK;
  uint64_t required = 0;
  if (options.fault_on_thread) {
    required = UFFD_FEATURE_SIGBUS;
    if (!features.has_uffd_feature(required)) {
      return Error(Errc::kUnsupported, "fault_on_thread: this kernel's userfaultfd has no UFFD_FEATURE_SIGBUS (Linux 4.14); "
                                       "restore without it");
    }
  }
  if (std::any_of(groups.begin(), groups.end(), [](const Group& g) { return g.page_size != 0; })) {
    wanted |= UFFD_FEATURE_MISSING_HUGETLBFS;
    if (!features.has_uffd_feature(UFFD_FEATURE_MISSING_HUGETLBFS)) {
      return Error(Errc::kUnsupported, fmt::format("{}: some regions were huge-page memory, and this kernel's userfaultfd "
                                                   "does not serve it (UFFD_FEATURE_MISSING_HUGETLBFS, Linux 4.11): "
                                                   "restore on ordinary pages (RestoreOptions::huge_pages = false)",
                                                   location));
    }
  }
  if (groups.empty()) groups.push_back(Group{0, {}, {}});  // no regions: one session all the same
  std::vector<sys::Uffd> uffds;
  for (const Group& g : groups) {
    LAZYMEM_ASSIGN_OR_RETURN(sys::Uffd uffd, sys::Uffd::open((wanted & features.uffd_features) | required, required));
    for (size_t k : g.mappings) {
      const sys::Mapping& mp = impl->mappings[k];
      auto ioctls = uffd.register_missing(mp.address(), mp.size());
      if (!ioctls.ok()) return std::move(ioctls).error();
      if ((*ioctls & (1ULL << _UFFDIO_COPY)) == 0) {
        return Error(Errc::kUnsupported, "userfaultfd: UFFDIO_COPY is not supported on that memory here");
      }
    }
    uffds.push_back(std::move(uffd));
  }

  fault::EngineOptions eo;
  eo.fetch_attempts = options.fetch_attempts;
  eo.demand_deadline = options.fault_deadline;
  impl->engine = std::make_unique<fault::FaultEngine>(features, eo);
  if (options.fault_on_thread) {  // one group: ordinary pages (refused above otherwise)
    fault::ThreadFaultOptions to;
    to.connections = options.fault_connections;
    to.deadline = options.fault_deadline;
    to.fetch_attempts = options.fetch_attempts;
    to.can_poison = features.has_uffd_poison();
    LAZYMEM_ASSIGN_OR_RETURN(impl->thread_faults,
                             fault::ThreadFaults::start(impl->source, uffds.front().fd(), groups.front().ranges, std::move(to)));
  }
  LAZYMEM_TRY(impl->engine->start());
  for (size_t k = 0; k < groups.size(); ++k) {
    fault::SessionSpec spec;
    spec.follower = impl->thread_faults;
    spec.name = groups[k].page_size == 0 ? location : fmt::format("{} ({} KiB pages)", location, groups[k].page_size >> 10);
    spec.uffd = std::move(uffds[k]);
    spec.source = impl->source;
    spec.ranges = std::move(groups[k].ranges);
    if (groups[k].page_size != 0) spec.page_size = groups[k].page_size;  // else the engine's ordinary pages
    spec.pid = ::getpid();
    spec.prefetch = options.prefetch;
    LAZYMEM_ASSIGN_OR_RETURN(fault::SessionId id, impl->engine->add_session(std::move(spec)));
    impl->sessions.push_back(id);
  }
  if (impl->thread_faults) impl->fork_hook = sys::BeforeFork([self = impl.get()] { (void)self->settle(); });
  return std::unique_ptr<LazyRestore>(new LazyRestore(std::move(impl)));
}

const std::vector<RestoredRegion>& LazyRestore::regions() const { return impl_->regions; }

const RestoredRegion* LazyRestore::region(std::string_view name) const {
  for (const auto& r : impl_->regions)
    if (r.name == name) return &r;
  return nullptr;
}

const std::vector<std::byte>& LazyRestore::app_state() const { return impl_->source->manifest().app_state; }

RestoreStats LazyRestore::stats() const {
  // Each region's figures from the session serving it (every session lists every region).
  RestoreStats out;
  out.complete = true;
  for (size_t k = 0; k < impl_->sessions.size(); ++k) {
    auto info = impl_->engine->session_info(impl_->sessions[k]);
    if (!info) return RestoreStats{};
    if (k == 0) {
      out.source = info->stats.source;
      out.regions = info->stats.regions;
    }
    for (size_t i = 0; i < impl_->session_of_region.size() && i < out.regions.size(); ++i) {
      if (impl_->session_of_region[i] == k) out.regions[i] = info->stats.regions[i];
    }
    out.complete = out.complete && info->stats.complete;
    out.failed = out.failed || info->stats.failed;
  }
  if (impl_->thread_faults) {
    std::vector<RegionStats> own = impl_->thread_faults->stats();
    for (size_t i = 0; i < own.size() && i < out.regions.size(); ++i) out.regions[i].merge(own[i]);
    if (impl_->thread_faults->failed()) out.failed = true;
  }
  return out;
}

Status LazyRestore::wait_complete(std::chrono::milliseconds timeout) {
  if (impl_->finished) return ok_status();
  for (fault::SessionId id : impl_->sessions) impl_->engine->set_prefetch(id, true);
  const auto until = std::chrono::steady_clock::now() + timeout;
  for (fault::SessionId id : impl_->sessions) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - std::chrono::steady_clock::now());
    LAZYMEM_TRY(impl_->engine->wait_complete(id, std::max(left, std::chrono::milliseconds(0))));
  }
  return ok_status();
}

Status LazyRestore::finish() {
  if (impl_->finished) return ok_status();
  // Settled, not wait_complete(): that returns at the first failed chunk, and closing the uffd
  // then would let the kernel zero-fill every page not yet restored. The good pages of a restore
  // with one bad chunk are all restored.
  Status s = impl_->settle();
  if (!s.ok() && s.error().code() == Errc::kTimeout) return s;  // keep serving: never abandon missing pages
  if (s.ok() && impl_->thread_faults && impl_->thread_faults->failed()) {
    s = Error(Errc::kIo, impl_->thread_faults->failure());
  }
  // Complete, or failed with every failed page poisoned: either way no page is left for the
  // kernel to zero-fill. Stop serving and give the memory to the application.
  impl_->fork_hook.reset();
  for (fault::SessionId id : impl_->sessions) impl_->engine->remove_session(id);
  impl_->engine->stop();
  impl_->thread_faults.reset();  // after the engine: it no longer calls the follower
  for (auto& mp : impl_->mappings) mp.release();
  impl_->finished = true;
  return s;
}

Result<std::vector<RestoredRegion>> restore_eager(const std::string& location, const RestoreOptions& options) {
  LAZYMEM_ASSIGN_OR_RETURN(auto source, open_chunk_source(location, options));
  const Manifest& m = source->manifest();
  std::vector<sys::Mapping> maps;
  for (const RegionInfo& r : m.regions) {
    auto map = r.kind == RegionKind::kProcess ? sys::Mapping::anonymous_at(r.start_address, r.length, PROT_READ | PROT_WRITE)
                                              : sys::Mapping::anonymous(r.length);
    if (!map.ok()) return std::move(map).error().wrap(fmt::format("{}: region '{}'", location, r.name));
    maps.push_back(std::move(*map));
  }
  LAZYMEM_ASSIGN_OR_RETURN(auto reader, source->open_reader());

  // Decodes straight into the destination: the baseline a non-lazy restorer sets.
  struct Sink final : snapshot::ChunkSink {
    const Manifest* m;
    std::vector<sys::Mapping>* maps;
    std::vector<snapshot::ChunkRef> refs;
    snapshot::ChunkDecoder decoder;
    const ZSTD_DDict* dict = nullptr;
    std::optional<Error> error;
    void on_chunk(uint64_t tag, std::span<const std::byte> stored) override {
      snapshot::ChunkRef ref = refs[tag];
      uint64_t off = uint64_t{ref.chunk} * m->chunk_size;
      std::span<std::byte> out((*maps)[ref.region].data() + off, m->chunk_length(ref.region, ref.chunk));
      Status s = decoder.decode(m->regions[ref.region].chunks[ref.chunk], stored, out,
                                snapshot::ChunkLayout{m->regions[ref.region].page_size, dict});
      if (!s.ok() && !error) error = s.error().wrap(fmt::format("region '{}' chunk {}", m->regions[ref.region].name, ref.chunk));
    }
    void on_chunk_error(uint64_t, const Error& e) override {
      if (!error) error = e;
    }
  } sink;
  LAZYMEM_ASSIGN_OR_RETURN(auto dict, source->dictionary());
  sink.m = &m;
  sink.maps = &maps;
  sink.dict = dict ? dict->get() : nullptr;
  sink.refs = snapshot::stored_chunks(m);
  LAZYMEM_TRY(snapshot::read_chunks(*reader, sink.refs, sink, options.fault_deadline,
                                     [&] { return sink.error.has_value(); }));
  if (sink.error) return *sink.error;
  std::vector<RestoredRegion> out;
  for (size_t i = 0; i < maps.size(); ++i) {
    out.push_back(RestoredRegion{m.regions[i].name, maps[i].data(), maps[i].size()});
    maps[i].release();
  }
  return out;
}

}  // namespace lazymem
