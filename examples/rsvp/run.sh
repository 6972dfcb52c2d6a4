#!/usr/bin/env bash
# Runs the RSVP sample with one command: a local Dolores (embedded store in
# examples/rsvp/dolores-data, a known api key, this site's origin allowed by CORS) and
# the Django site (SQLite in examples/rsvp/db.sqlite3, migrated first).
#
#   examples/rsvp/run.sh          then open http://127.0.0.1:8000/ in two browsers
#
# Ctrl-C stops both. The first run makes a virtualenv in examples/rsvp/.venv with
# clients/python[django] (set PYTHON to use a python that already has it), and builds
# dolores with cargo when target/debug/dolores is missing (or set DOLORES_BIN).
# Ports: APP_PORT (8000) and DOLORES_PORT (8007).
set -euo pipefail
cd "$(dirname "$0")"
here=$PWD
repo=$(cd ../.. && pwd)

app_port=${APP_PORT:-8000}
dolores_port=${DOLORES_PORT:-8007}
export DOLORES_API_KEY=${DOLORES_API_KEY:-rsvp-dev-key}
export DOLORES_SERVER=http://127.0.0.1:$dolores_port
export DOLORES_PUBLIC_URL=${DOLORES_PUBLIC_URL:-$DOLORES_SERVER}
data=${RSVP_DOLORES_DATA:-$here/dolores-data}

bin=${DOLORES_BIN:-$repo/target/debug/dolores}
if [ ! -x "$bin" ]; then
  echo "building dolores (cargo build)"
  (cd "$repo" && cargo build)
fi

if [ -z "${PYTHON:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  stamp=.venv/.dolores-installed
  if [ ! -f "$stamp" ] || [ -n "$(find "$repo/clients/python" -newer "$stamp" -type f -not -path '*/__pycache__/*' -print -quit)" ]; then
    echo "installing clients/python[django] into examples/rsvp/.venv"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$repo/clients/python"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "$repo/clients/python[django]"
    touch "$stamp"
  fi
  PYTHON=$here/.venv/bin/python
fi

"$PYTHON" manage.py migrate --noinput

pids=()
stop() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait || true
}
trap stop EXIT INT TERM

# The page (http://127.0.0.1:8000 or http://localhost:8000) streams from Dolores on
# another port: another origin, so it must be allowed. Dolores tells the site when
# pages come and go (webhooks, signed with the api key) for "N people here".
"$bin" serve --listen "127.0.0.1:$dolores_port" --data "$data" --api-key "$DOLORES_API_KEY" \
  --cors-origins "http://127.0.0.1:$app_port,http://localhost:$app_port" \
  --webhook-url "http://127.0.0.1:$app_port/:webhook" &
pids+=($!)

"$PYTHON" - "$DOLORES_SERVER/healthz" "${pids[0]}" <<'EOF'
import os, sys, time, urllib.request
url, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 15
while True:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(f"dolores did not start (is port {url.split(':')[-1].split('/')[0]} taken? set DOLORES_PORT)")
    try:
        urllib.request.urlopen(url, timeout=1).read()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(f"dolores did not answer at {url}")
        time.sleep(0.1)
EOF

echo
echo "RSVP is at http://127.0.0.1:$app_port/  (Dolores at $DOLORES_SERVER, api key $DOLORES_API_KEY)"
echo
"$PYTHON" manage.py runserver --noreload "127.0.0.1:$app_port" &
pids+=($!)

# Whichever stops first (Ctrl-C, or a crash) takes the other with it.
wait -n
