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
opts=(--buildtype=debugoptimized)
if [[ "${CI:-}" == "true" ]]; then opts+=(--werror); fi
if [[ ! -f "$build/build.ninja" ]]; then
  meson setup "$build" "${opts[@]}"
else
  meson configure "$build" "${opts[@]}" >/dev/null
fi
ninja -C "$build"
