#!/usr/bin/env bash
# Runs every test: unit and integration tests (real relay processes over real sockets, a real
# Prometheus, real redis-server and nginx for the multi-node tests, the load harness, the systemd
# unit), the JS client's package and types, then the browser end-to-end tests in real Chromium.
# Installs what a fresh Debian/Ubuntu machine lacks first (needs root or sudo for apt).
set -euo pipefail
cd "$(dirname "$0")"

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v prometheus >/dev/null || missing+=(prometheus)
command -v promtool >/dev/null || missing+=(prometheus)
command -v ss >/dev/null || missing+=(iproute2)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v node >/dev/null || missing+=(nodejs npm)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v openssl >/dev/null || missing+=(openssl)
command -v cargo >/dev/null || { echo "test.sh: cargo not found; install Rust with https://rustup.rs first" >&2; exit 2; }
if [ ${#missing[@]} -gt 0 ]; then
  echo "test.sh: installing ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

cargo build --workspace --bins
cargo check --workspace --benches
cargo test --workspace --lib --bins --tests -- --test-threads=2
tests/js-client/run.sh
ROOMCAST_BIN="$PWD/target/debug/roomcast" tests/browser/run.sh
echo "test.sh: all tests passed"
