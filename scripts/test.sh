#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs every test suite: unit, integration, fuzz
# (short fixed-time runs) and the page-server and agent suites. Tests that need a kernel
# feature or privilege this machine lacks are reported as skipped, with the reason.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
build=${BUILD_DIR:-build}
# Integration tests each use hundreds of MiB and both cores: run them one at a time.
meson test -C "$build" --print-errorlogs --num-processes 2 "$@"
