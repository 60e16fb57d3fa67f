#!/usr/bin/env bash
# The demo: builds lazymem, fills a 512 MiB arena with a hash table of records (its last eighth
# left free, as allocators leave the tail of an arena untouched), snapshots it, and
# snapshots it again live (while a thread inserts records; paused for the last pass only), and
# restores it lazily in new processes (pages arrive on first touch, prefetch fills the rest),
# verifying every record: from the local store (with and without prefetch), from a page server
# on loopback, and through the per-host agent, with the agent's fault statistics; then migrates
# it live, by the process itself and by the agent (a process that knows nothing of lazymem).
#   DEMO_MIB=N   arena size (default 512)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# Quiet when all is well; the whole setup/build log when it is not.
if ! setup_log=$(scripts/setup.sh 2>&1); then echo "$setup_log" >&2; exit 1; fi
build=${BUILD_DIR:-build}
mib=${DEMO_MIB:-512}
kv="$build/examples/lazymem-example-kv"

work=$(mktemp -d /var/tmp/lazymem-demo.XXXXXX)
daemons=()  # background servers this script started, stopped on the way out
cgroup=""   # the cgroup made for step 7's workload, removed on the way out
cleanup() {
  # A failing kill (the daemon already gone) must not turn a good run into a failure (set -e
  # holds inside traps too). A frozen process takes SIGTERM only once thawed.
  if [[ -n "$cgroup" ]]; then echo 0 >"$cgroup/cgroup.freeze" 2>/dev/null || true; fi
  if ((${#daemons[@]})); then
    kill "${daemons[@]}" 2>/dev/null || true
    wait "${daemons[@]}" 2>/dev/null || true
  fi
  if [[ -n "$cgroup" ]]; then rmdir "$cgroup" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# What `sed -n EXPR` finds in FILE once background process PID has printed it; empty if PID
# exits without printing it.
line_from() {
  local pid=$1 file=$2 expr=$3 found=""
  while [[ -z "$found" ]] && kill -0 "$pid" 2>/dev/null; do
    found=$(sed -n "$expr" "$file")
    [[ -n "$found" ]] || sleep 0.1
  done
  [[ -n "$found" ]] || found=$(sed -n "$expr" "$file")  # printed just before it exited
  printf '%s' "$found"
}

step "kernel features"
"$build/agent/lazymem-agent" check --store "$work" || {
  echo "demo: this machine cannot run lazy restores (see above)"; exit 1; }

step "1. fill a ${mib} MiB arena with a table of records and snapshot it to $work/store/kv"
"$kv" fill --mib "$mib" --snapshot "$work/store/kv"

step "1b. the same table snapshotted live, while a thread keeps inserting 2000 records a second"
# Dirty-page tracking (Linux 5.13; cheapest from 6.7) lets the table run during the capture; it is paused for the
# last pass only. Exit status 3: this kernel cannot, said above, and the demo goes on without it.
live_rc=0
"$kv" fill --mib "$mib" --snapshot "$work/store/kv-live" --live-inserts-per-sec 2000 || live_rc=$?
if ((live_rc == 0)); then
  echo "restoring it: every record inserted up to the pause must be there, and nothing else"
  "$kv" restore --snapshot "$work/store/kv-live"
elif ((live_rc != 3)); then
  exit "$live_rc"
fi

step "2. restore it lazily in a new process (prefetch on), verify every record"
"$kv" restore --snapshot "$work/store/kv"

step "3. the same restore with demand faults only (no prefetch)"
"$kv" restore --snapshot "$work/store/kv" --no-prefetch

step "4. through a page server: serve the store on loopback (token required), restore from lazymem://"
ps="$build/pageserver/lazymem-pageserver"
head -c 32 /dev/urandom | base64 > "$work/token"
mkfifo "$work/ready"
"$ps" serve --store "$work/store" --listen 127.0.0.1:0 --token-file "$work/token" >"$work/ready" 2>"$work/server.log" &
server=$!
daemons+=("$server")
read -r _ addr <"$work/ready" || true   # "listening on 127.0.0.1:PORT": the server is accepting
addr=${addr#on }
[[ -n "$addr" ]] || { echo "demo: the page server did not start:"; cat "$work/server.log"; exit 1; }
port=${addr##*:}
"$ps" ls --server "lazymem://127.0.0.1:$port" --token-file "$work/token"
"$kv" restore --snapshot "lazymem://127.0.0.1:$port/kv" --token-file "$work/token"
echo "page server counters:"
"$ps" stats --server "lazymem://127.0.0.1:$port" --token-file "$work/token"

step "5. through the agent: lazymem-agent owns the uffd and serves the faults from the page server"
agent="$build/agent/lazymem-agent"
mkfifo "$work/agent-ready"
"$agent" run --socket "$work/agent.sock" >"$work/agent-ready" 2>"$work/agent.log" &
agent_pid=$!
daemons+=("$agent_pid")
read -r _ sock <"$work/agent-ready" || true   # "listening on PATH"
[[ -n "${sock:-}" ]] || { echo "demo: the agent did not start:"; cat "$work/agent.log"; exit 1; }
"$kv" restore --snapshot "lazymem://127.0.0.1:$port/kv" --token-file "$work/token" --agent "$work/agent.sock"
"$kv" restore --snapshot "$work/store/kv" --agent "$work/agent.sock" --no-prefetch
echo
echo "lazymem-agent stats:"
"$agent" stats --socket "$work/agent.sock"

step "6. live migration: pre-copy to the page server while records are inserted, then post-copy from the paused source"
# The source process fills its table, pre-copies it to the page server (the destination's, on a
# real network) as a thread keeps inserting, pauses, and serves the chunks written since from
# its paused memory; a new process restores from the source, the pre-copy as its base.
# Exit status 3: this kernel cannot track dirty pages (Linux 5.13), said above, and the demo ends.
"$kv" migrate --mib "$mib" --snapshot "lazymem://127.0.0.1:$port/kv-migrated" --token-file "$work/token" \
    --listen 127.0.0.1:0 --live-inserts-per-sec 2000 >"$work/source.out" 2>&1 &
source_pid=$!
daemons+=("$source_pid")
# Its "source: lazymem://..." line says the switch-over is done and where to restore from.
from=$(line_from "$source_pid" "$work/source.out" 's/^source: //p')
sed 's/^/  source process: /' "$work/source.out"
if [[ -z "$from" ]]; then
  wait "$source_pid" && rc=0 || rc=$?
  ((rc == 3)) && { echo "demo: done (migration skipped: see above)"; exit 0; }
  echo "demo: the migration source failed"; exit 1
fi
"$kv" restore --snapshot "$from" --base "lazymem://127.0.0.1:$port/kv-migrated" --token-file "$work/token"
wait "$source_pid" && rc=0 || rc=$?
sed -n 's/^post-copy/  source process: post-copy/p' "$work/source.out"
((rc == 0)) || { echo "demo: the migration source failed"; exit 1; }

step "7. the agent migrates a process that knows nothing of lazymem: pre-copy, freeze, post-copy from the agent"
# `serve` fills a table and inserts 2000 records a second until killed, without a lazymem call.
# The agent has it open a userfaultfd (ptrace) to track its writes, pre-copies the table to the
# page server while it runs, freezes its cgroup (or stops it), serves what it wrote since, and
# kills it once a new process has restored the table; the table is checked as the pause left it
# (one insert may have been caught in flight: its slot, count and digest are three writes).
if [[ $(id -u) != 0 ]]; then
  echo "demo: step 7 skipped: the agent needs root to ptrace the process"
else
  "$kv" serve --mib 128 --live-inserts-per-sec 2000 >"$work/serve.out" 2>&1 &
  serve_pid=$!
  daemons+=("$serve_pid")
  range=$(line_from "$serve_pid" "$work/serve.out" 's/^serving: .*table at //p')
  [[ -n "$range" ]] || { echo "demo: the served table did not start:"; cat "$work/serve.out"; exit 1; }
  sed 's/^/  workload: /' "$work/serve.out"
  # In a cgroup of its own, as a container's or a jailed VM's process is, it is frozen rather
  # than stopped: its parent (this script) sees no stop.
  pause=()
  cg2=$(awk '$3 == "cgroup2" {print $2; exit}' /proc/self/mounts)
  if [[ -n "$cg2" ]] && mkdir "$cg2/lazymem-demo-$$" 2>/dev/null; then
    cgroup="$cg2/lazymem-demo-$$"
    if echo "$serve_pid" >"$cgroup/cgroup.procs" 2>/dev/null; then pause=(--freeze); fi
  fi
  ((${#pause[@]})) || echo "  (no cgroup v2 to put it in: it is stopped with SIGSTOP)"
  "$agent" migrate --pid "$serve_pid" --region "$range=kv-table" --base "lazymem://127.0.0.1:$port/kv-agent-migrated" \
      --token-file "$work/token" --listen 127.0.0.1:0 "${pause[@]}" >"$work/agent-migrate.out" 2>&1 &
  migrate_pid=$!
  daemons+=("$migrate_pid")
  from=$(line_from "$migrate_pid" "$work/agent-migrate.out" 's/^source: //p')
  sed -n 's/^pre-copy/  lazymem-agent migrate: pre-copy/p' "$work/agent-migrate.out"
  if [[ -z "$from" ]]; then
    echo "demo: lazymem-agent migrate failed:"; cat "$work/agent-migrate.out"; exit 1
  fi
  "$kv" restore --snapshot "$from" --base "lazymem://127.0.0.1:$port/kv-agent-migrated" --token-file "$work/token"
  wait "$migrate_pid" && rc=0 || rc=$?
  sed -n 's/^post-copy/  lazymem-agent migrate: post-copy/p' "$work/agent-migrate.out"
  ((rc == 0)) || { echo "demo: lazymem-agent migrate failed:"; cat "$work/agent-migrate.out"; exit 1; }
fi

echo
echo "demo: done (snapshot, and live snapshot; lazy restores from the store, from a page server and through the agent; a live migration, in the process and by the agent; every record verified)"
