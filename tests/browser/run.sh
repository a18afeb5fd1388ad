#!/usr/bin/env bash
# Runs the end-to-end browser tests (issue 4) against the relay binary.
# Installs what is missing first: Debian's chromium and the npm dependencies (playwright-core).
# The relay is not built here: build it first (cargo build --bin roomcast) or set ROOMCAST_BIN.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -x "${CHROMIUM_BIN:-/usr/bin/chromium}" ]; then
  echo "run.sh: installing chromium" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium
fi
if ! command -v ss >/dev/null; then
  echo "run.sh: installing iproute2 (ss)" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends iproute2
fi
if [ ! -d node_modules/playwright-core ]; then
  echo "run.sh: installing npm dependencies" >&2
  npm ci --no-audit --no-fund
fi

BIN="${ROOMCAST_BIN:-../../target/debug/roomcast}"
if [ ! -x "$BIN" ]; then
  echo "run.sh: relay binary $BIN not found; build it with: cargo build --bin roomcast (or set ROOMCAST_BIN)" >&2
  exit 2
fi

mkdir -p artifacts
exec node --test --test-concurrency=1 --test-timeout=180000 "$@" client.test.mjs e2e.test.mjs seed-v2.test.mjs
