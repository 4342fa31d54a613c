#!/usr/bin/env bash
# Build prerequisites of tokenmeter on Debian: a C toolchain and the headers the bundled
# librdkafka build links against, and python3-venv for the SDK conformance fixtures
# (tests/sdk). protoc is vendored by a crate, so it is not needed here.
# Installs only what is missing; a second run is a few dpkg queries.
set -euo pipefail

packages=(build-essential pkg-config libssl-dev zlib1g-dev make perl python3 python3-venv
  ca-certificates)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$package")
done
if ((${#missing[@]})); then
  echo "deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  for dir in "$HOME/.cargo/bin" /usr/local/cargo/bin; do
    [[ -x "$dir/cargo" ]] && export PATH="$dir:$PATH"
  done
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "deps: no Rust toolchain found; install stable Rust (https://rustup.rs) and re-run" >&2
  exit 1
fi
