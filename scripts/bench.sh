#!/usr/bin/env bash
# Runs a benchmark program: scripts/bench.sh {local|remote|agent|codec|floor|getpage|dirty|list|huge} [--json] [options].
# Each prints a readable table, ratios against a baseline measured in the same run, and with
# --json one JSON object on its last line.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
which=${1:-}
case "$which" in
  local|remote|agent|codec|floor|getpage|dirty|list|huge) shift ;;
  *) echo "usage: scripts/bench.sh {local|remote|agent|codec|floor|getpage|dirty|list|huge} [--json] [options]" >&2; exit 2 ;;
esac
# Quiet when all is well; the whole setup/build log when it is not.
if ! setup_log=$(scripts/setup.sh 2>&1); then echo "$setup_log" >&2; exit 1; fi
build=${BUILD_DIR:-build}
bin="$build/bench/$which/lazymem-bench-$which"
if [[ ! -x "$bin" ]]; then
  echo "bench: $bin is not built (the $which benchmark is not part of this tree yet)" >&2
  exit 1
fi
exec "$bin" "$@"
