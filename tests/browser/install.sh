#!/usr/bin/env bash
# Installs what the browser tests need, and nothing twice: Debian's Chromium (never a
# browser build downloaded by a tool), openssl, nginx and Caddy, and from the lock file
# playwright-core, undici (the harness's HTTP client) and typescript (test/types.test.js).
# Usage: tests/browser/install.sh   (as root, or with sudo available)
set -euo pipefail
cd "$(dirname "$0")"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=
apt_install() {
  if [ -z "$apt_updated" ]; then as_root apt-get update -qq; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

if [ ! -x "${CHROMIUM_BIN:-/usr/bin/chromium}" ]; then
  echo "installing Debian's chromium"
  apt_install chromium
fi

# tabs.test.js makes a self-signed certificate for its HTTPS server.
if ! command -v openssl >/dev/null 2>&1; then
  echo "installing openssl"
  apt_install openssl
fi
# test/proxy.test.js runs real nginx and Caddy in front of dolores (its own instances).
if [ ! -x /usr/sbin/nginx ] && ! command -v nginx >/dev/null 2>&1; then
  echo "installing nginx-light"
  apt_install nginx-light
fi
if ! command -v caddy >/dev/null 2>&1; then
  echo "installing caddy"
  apt_install caddy
fi

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "installing node and npm"
  apt_install nodejs npm
fi
# node:test with --test-concurrency needs 20; undici 7 (lib/harness.js) needs 20.18.1.
if ! node -e 'const [a, b, c] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && (b > 18 || (b === 18 && c >= 1))) ? 0 : 1)'; then
  echo "the browser tests need Node.js 20.18.1 or newer; found $(node --version)" >&2
  exit 1
fi

# playwright-core has no browser of its own to fetch; say so anyway, in case.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund
fi
