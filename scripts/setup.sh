#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine for lazymem: installs the Debian packages it builds with,
# configures meson and builds. Idempotent: a second run only rebuilds what changed.
#   BUILD_DIR=dir  build directory (default: build)
#   CI=true        warnings are errors
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

packages=(
  g++ meson ninja-build pkg-config ccache
  liburing-dev capnproto libcapnp-dev libzstd-dev libxxhash-dev
  libspdlog-dev libfmt-dev nlohmann-json3-dev libboost-program-options-dev
  libgtest-dev libgmock-dev libssl-dev
  iproute2 clang libclang-rt-14-dev python3
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo=()
  [[ $(id -u) -eq 0 ]] || sudo=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

build=${BUILD_DIR:-build}
werror=false
if [[ "${CI:-}" == "true" ]]; then werror=true; fi
if [[ ! -f "$build/build.ninja" ]]; then
  # --wipe: a directory left behind by a setup that failed (a missing package) starts afresh.
  wipe=()
  [[ -f "$build/meson-private/coredata.dat" ]] && wipe=(--wipe)
  meson setup "$build" "${wipe[@]}" --buildtype=debugoptimized -Dwerror="$werror"
elif [[ "$werror" == true ]]; then
  # An existing directory keeps the options it was given (flipping -Werror would recompile
  # everything), except that CI must see warnings as errors. Reconfigure only on a change:
  # a reconfigure regenerates build.ninja.
  current=$(meson introspect "$build" --buildoptions |
    python3 -c 'import json, sys; print(str({o["name"]: o["value"] for o in json.load(sys.stdin)}["werror"]).lower())')
  [[ "$current" == true ]] || meson configure "$build" -Dwerror=true >/dev/null
fi
ninja -C "$build"
