#!/usr/bin/env bash
# Runs every Python test: the `dolores` package against the real server, its Django app,
# the sample app's own tests and the sample app end to end in headless Chromium.
# Installs what they need first, and nothing twice: a virtualenv in tests/python/.venv
# (gitignored) with the test tools and clients/python installed as a user would
# (`pip install ./clients/python[django]`, again whenever its files change); Debian's
# Chromium when it is missing; the debug build of dolores when there is none.
# Usage: tests/python/run.sh [pytest arguments]      (DOLORES_BIN names another binary)
set -euo pipefail
cd "$(dirname "$0")"
here=$PWD
repo=$(cd ../.. && pwd)
venv=$here/.venv
stamp=$venv/.dolores-installed

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
apt_install() {
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

if [ ! -x "$venv/bin/python" ]; then
  rm -rf "$venv"
  if ! python3 -m venv "$venv" 2>/dev/null; then
    # Debian's python3 keeps venv (ensurepip) in a package of its own.
    rm -rf "$venv"
    apt_install python3-venv
    python3 -m venv "$venv"
  fi
fi
py=$venv/bin/python

if [ ! -f "$stamp" ] || [ requirements.txt -nt "$stamp" ] \
   || [ -n "$(find "$repo/clients/python" -newer "$stamp" -type f -not -path '*/__pycache__/*' -not -path '*.egg-info*' -print -quit)" ]; then
  echo "installing the Python test tools and clients/python into $venv"
  "$py" -m pip install --quiet --disable-pip-version-check -r requirements.txt
  # As a user would (not editable), so packaging mistakes show; again on every change.
  "$py" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$repo/clients/python"
  "$py" -m pip install --quiet --disable-pip-version-check "$repo/clients/python[django]"
  touch "$stamp"
fi

if [ ! -x "${CHROMIUM_BIN:-/usr/bin/chromium}" ]; then
  echo "installing Debian's chromium"
  apt_install chromium
fi

if [ -z "${DOLORES_BIN:-}" ] && [ ! -x "$repo/target/debug/dolores" ]; then
  (cd "$repo" && cargo build --locked)
fi

# The Python playwright package drives Debian's Chromium (never a downloaded browser).
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
exec "$py" -m pytest "$@"
