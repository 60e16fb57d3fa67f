#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs every test suite: unit, integration, fuzz
# (a replay of mutated inputs in every build, plus the libFuzzer targets for a fixed time each
# when clang is there), and the page-server and agent suites. Tests that need a kernel feature or
# privilege this machine lacks are reported as skipped, with the reason.
#   FUZZ_SECONDS=N        libFuzzer run time of the page-server target (default 30; 0 skips all fuzzing)
#   AGENT_FUZZ_SECONDS=N  libFuzzer run time of the agent target (default 15; 0 skips it)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh || exit 1
build=${BUILD_DIR:-build}

meson test -C "$build" --print-errorlogs --num-processes 2 "$@"
rc=$?

fuzz_rc=0
fuzz_seconds=${FUZZ_SECONDS:-30}
agent_fuzz_seconds=${AGENT_FUZZ_SECONDS:-15}
# run_fuzzer TARGET SECONDS WHAT [SEED_WRITER]: runs libFuzzer target TARGET of $fb for SECONDS
# from a fresh corpus (filled by SEED_WRITER first, if given); a crash fails the run.
run_fuzzer() {
  local target=$1 seconds=$2 what=$3 seeds=${4:-} corpus
  echo "== libFuzzer: $what, ${seconds}s"
  if ! ninja -C "$fb" "tests/fuzz/$target" ${seeds:+"tests/fuzz/$seeds"} >/dev/null; then
    fuzz_rc=1
    return
  fi
  corpus=$(mktemp -d)
  if [[ -n "$seeds" ]] && ! "$fb/tests/fuzz/$seeds" "$corpus"; then
    fuzz_rc=1
  elif "$fb/tests/fuzz/$target" -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 "$corpus" \
      >"$fb/$target.log" 2>&1; then
    grep -E "^Done|stat::number_of_executed_units" "$fb/$target.log" || true
  else
    fuzz_rc=1
    echo "libFuzzer found a crash in $target:"
    tail -40 "$fb/$target.log"
  fi
  rm -rf "$corpus"
}
if [[ "$fuzz_seconds" != 0 && $# -eq 0 ]] && command -v clang++ >/dev/null; then
  fb=build-fuzz
  if [[ ! -f "$fb/build.ninja" ]]; then
    CC=clang CXX=clang++ meson setup "$fb" -Dfuzz=true -Db_sanitize=address,undefined -Db_lundef=false \
      --buildtype=debugoptimized >/dev/null || fuzz_rc=1
  fi
  if ((fuzz_rc == 0)); then
    run_fuzzer wire_fuzz "$fuzz_seconds" "page-server frame and message decoders"
    # The agent runs as root and decodes what local users and Firecracker send it.
    ((agent_fuzz_seconds == 0)) ||
      run_fuzzer agent_fuzz "$agent_fuzz_seconds" "agent control requests and Firecracker handshake" agent_fuzz_seeds
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
