#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs every test suite: unit, integration, fuzz
# (a replay of mutated frames in every build, plus the libFuzzer target for a fixed time when
# clang is there), and the page-server and agent suites. Tests that need a kernel feature or
# privilege this machine lacks are reported as skipped, with the reason.
#   FUZZ_SECONDS=N  libFuzzer run time (default 30; 0 skips it)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh || exit 1
build=${BUILD_DIR:-build}

meson test -C "$build" --print-errorlogs --num-processes 2 "$@"
rc=$?

fuzz_rc=0
fuzz_seconds=${FUZZ_SECONDS:-30}
if [[ "$fuzz_seconds" != 0 && $# -eq 0 ]] && command -v clang++ >/dev/null; then
  echo "== libFuzzer: page-server frame and message decoders, ${fuzz_seconds}s"
  fb=build-fuzz
  if [[ ! -f "$fb/build.ninja" ]]; then
    CC=clang CXX=clang++ meson setup "$fb" -Dfuzz=true -Db_sanitize=address,undefined -Db_lundef=false \
      --buildtype=debugoptimized >/dev/null || fuzz_rc=1
  fi
  if ((fuzz_rc == 0)) && ninja -C "$fb" tests/fuzz/wire_fuzz >/dev/null; then
    corpus=$(mktemp -d)
    "$fb/tests/fuzz/wire_fuzz" -max_total_time="$fuzz_seconds" -rss_limit_mb=2048 -print_final_stats=1 "$corpus" \
      >"$fb/wire_fuzz.log" 2>&1 || fuzz_rc=1
    grep -E "^Done|stat::number_of_executed_units" "$fb/wire_fuzz.log" || true
    ((fuzz_rc == 0)) || { echo "libFuzzer found a crash:"; tail -40 "$fb/wire_fuzz.log"; }
    rm -rf "$corpus"
  else
    fuzz_rc=1
  fi
fi

# One closing line that any CI reads: counts from meson's own log.
python3 - "$build/meson-logs/testlog.json" "$fuzz_rc" <<'PY'
import json, sys
ok = fail = skip = 0
for line in open(sys.argv[1]):
    r = json.loads(line).get("result")
    if r in ("OK", "EXPECTEDFAIL"): ok += 1
    elif r == "SKIP": skip += 1
    else: fail += 1
if sys.argv[2] != "0": fail += 1
print(f"{ok} passed, {fail} failed, {skip} skipped")
PY
((rc == 0 && fuzz_rc == 0))
