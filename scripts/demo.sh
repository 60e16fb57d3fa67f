#!/usr/bin/env bash
# The demo: builds lazymem, fills a 512 MiB in-memory table of records, snapshots it, restores
# it lazily in a new process (pages arrive on first touch, prefetch fills the rest), verifies
# every record, and prints the fault statistics. Then the same restore without prefetch, to
# show what demand faults alone cost.
#   DEMO_MIB=N   table size (default 512)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh >/dev/null
build=${BUILD_DIR:-build}
mib=${DEMO_MIB:-512}
kv="$build/examples/lazymem-example-kv"

work=$(mktemp -d /var/tmp/lazymem-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "kernel features"
"$build/agent/lazymem-agent" check --store "$work" || {
  echo "demo: this machine cannot run lazy restores (see above)"; exit 1; }

step "1. fill a ${mib} MiB table of records and snapshot it to $work/store/kv"
"$kv" fill --mib "$mib" --snapshot "$work/store/kv"

step "2. restore it lazily in a new process (prefetch on), verify every record"
"$kv" restore --snapshot "$work/store/kv"

step "3. the same restore with demand faults only (no prefetch)"
"$kv" restore --snapshot "$work/store/kv" --no-prefetch

echo
echo "demo: done (snapshot, lazy restores and verification all succeeded)"
