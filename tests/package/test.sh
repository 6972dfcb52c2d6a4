#!/usr/bin/env bash
# The Debian package, end to end: build it with cargo-deb, install it with dpkg, check
# where its files are and its systemd unit, run the server as the service would (its
# own unprivileged user, /etc/dolores/dolores.toml unchanged, data in /var/lib/dolores,
# a stand-in for systemd reading READY=1 / STOPPING=1), publish and receive through it,
# stop it with SIGTERM, then remove and purge the package.
#
# Needs root (dpkg). It installs and purges the system's `dolores` package, so it
# refuses to start when one is already installed or /etc/dolores or /var/lib/dolores
# exist. It removes everything it made, also when it fails, and can run again.
#
#   tests/package/test.sh            # packages the debug build (target/debug/dolores): fast
#   tests/package/test.sh --release  # runs plain `cargo deb`: the release build users get
set -euo pipefail
cd "$(dirname "$0")/../.."

mode=fast
case "${1:-}" in
  "") ;;
  --release) mode=release ;;
  *) echo "usage: $0 [--release]" >&2; exit 2 ;;
esac

fail() { echo "package test: FAIL: $*" >&2; exit 1; }
say() { echo "package test: $*"; }

[ "$(id -u)" = 0 ] || fail "needs root: it installs the package with dpkg"
if dpkg-query -W -f='${Status}' dolores 2>/dev/null | grep -q installed; then
  fail "a dolores package is installed already; this test installs and purges it (dpkg -P dolores first)"
fi
for dir in /etc/dolores /var/lib/dolores /var/lib/private/dolores; do
  [ ! -e "$dir" ] || fail "$dir exists; this test would delete it (remove it first)"
done
# What it needs, installed when missing: cargo-deb; systemd-analyze (the systemd package:
# only the tool, nothing runs); curl.
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked
missing=()
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v curl >/dev/null || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && apt-get install -y -qq "${missing[@]}"
fi
for tool in dpkg-deb python3 setpriv; do
  command -v "$tool" >/dev/null || fail "$tool is missing"
done

work=$(mktemp -d)
chmod 755 "$work" # the service user sends to the notify socket in here
server_pid=""
listen_pid=""
notify_pid=""
cleanup() {
  local pid
  for pid in $listen_pid $server_pid $notify_pid; do
    kill "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  if dpkg-query -W -f='${Status}' dolores 2>/dev/null | grep -q 'installed\|config-files'; then
    dpkg -P dolores >/dev/null || true
  fi
  rm -rf /etc/dolores /var/lib/dolores /var/lib/private/dolores "$work"
}
trap cleanup EXIT

# -- Build -----------------------------------------------------------------------------
if [ "$mode" = release ]; then
  say "cargo deb (release build)"
  cargo deb --locked --output "$work/deb/"
else
  # cargo-deb packages target/release/dolores of CARGO_TARGET_DIR; give it the debug
  # build there (`cargo build` has made it anyway), stripped, with light compression.
  # What is tested is the packaging; the binary's optimisation level does not matter.
  say "cargo deb --no-build (the debug build)"
  cargo build --locked --quiet
  mkdir -p "$work/target/release"
  cp target/debug/dolores "$work/target/release/dolores"
  CARGO_TARGET_DIR="$work/target" cargo deb --no-build --no-dbgsym \
    --no-separate-debug-symbols --strip --fast --output "$work/deb/"
fi
deb=$(ls "$work"/deb/dolores_*.deb)
say "built $(basename "$deb")"

# -- Install and look --------------------------------------------------------------------
dpkg -i "$deb" >/dev/null
dpkg -L dolores >"$work/files"
for path in /usr/bin/dolores /etc/dolores/dolores.toml /usr/share/doc/dolores/README.md; do
  grep -qx "$path" "$work/files" || fail "$path is not in dpkg -L dolores"
done
grep -qE '^(/usr)?/lib/systemd/system/dolores.service$' "$work/files" ||
  fail "no systemd unit in dpkg -L dolores"
[ -f /lib/systemd/system/dolores.service ] || fail "no /lib/systemd/system/dolores.service"
[ -x /usr/bin/dolores ] || fail "/usr/bin/dolores is not executable"
/usr/bin/dolores --version | grep -q '^dolores ' || fail "dolores --version"
dpkg-query -W -f='${Conffiles}\n' dolores | grep -q '^ /etc/dolores/dolores.toml ' ||
  fail "/etc/dolores/dolores.toml is not a conffile"
cmp -s /etc/dolores/dolores.toml debian/dolores.toml || fail "the conffile differs from debian/dolores.toml"
[ ! -e /etc/systemd/system/multi-user.target.wants/dolores.service ] ||
  fail "the package enabled the unit (it must wait for systemctl enable --now dolores)"
say "files where they belong; the conffile is listed"

# -- The unit ------------------------------------------------------------------------------
unit=/lib/systemd/system/dolores.service
# verify returns 0 even for unknown keys and bad values: any word from it is a failure.
if ! verify=$(systemd-analyze verify "$unit" 2>&1) || [ -n "$verify" ]; then
  fail "systemd-analyze verify $unit: $verify"
fi
for line in 'Type=notify' 'ExecStart=/usr/bin/dolores serve --config /etc/dolores/dolores.toml' \
  'KillSignal=SIGTERM' 'Restart=on-failure' 'DynamicUser=yes' 'StateDirectory=dolores' \
  'LimitNOFILE=65536' 'ProtectSystem=strict' 'ProtectHome=yes' 'PrivateTmp=yes' \
  'NoNewPrivileges=yes' 'ProtectKernelTunables=yes' 'ProtectControlGroups=yes' \
  'RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX' 'WantedBy=multi-user.target'; do
  grep -qxF "$line" "$unit" || fail "$unit lacks $line"
done
say "unit verified by systemd-analyze; its settings are there"

# -- Run it as the service would -------------------------------------------------------------
# DynamicUser=yes runs it as a made-up uid in 61184–65519; StateDirectory=dolores gives
# that user a private, writable /var/lib/dolores, also the working directory.
service_uid=61234
mkdir -m 0700 /var/lib/dolores
chown "$service_uid:$service_uid" /var/lib/dolores

# systemd's side of NOTIFY_SOCKET: one line per datagram, newlines as " | ".
notify_socket="$work/notify.sock"
python3 - "$notify_socket" >"$work/notices" <<'EOF' &
import os, socket, sys
path = sys.argv[1]
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind(path)
os.chmod(path, 0o666)  # like /run/systemd/notify: any service may send
sock.settimeout(120)   # never outlive the test by much
while True:
    notice = sock.recv(4096).decode()
    print(notice.replace("\n", " | "), flush=True)
    if "STOPPING=1" in notice.split("\n"):
        break
EOF
notify_pid=$!
for _ in $(seq 100); do [ -S "$notify_socket" ] && break; sleep 0.05; done
[ -S "$notify_socket" ] || fail "the notify listener did not start"

# The conffile listens on 127.0.0.1:8007. Where something else holds that port (a
# developer's own server), the environment moves it, as `systemctl edit` could.
listen_env=()
if ! python3 -c 'import socket; socket.create_server(("127.0.0.1", 8007)).close()' 2>/dev/null; then
  port=$(python3 -c 'import socket; s = socket.create_server(("127.0.0.1", 0)); print(s.getsockname()[1])')
  listen_env=("DOLORES_LISTEN=127.0.0.1:$port")
  say "127.0.0.1:8007 is taken here: DOLORES_LISTEN=127.0.0.1:$port"
fi
(
  cd /var/lib/dolores
  exec setpriv --reuid="$service_uid" --regid="$service_uid" --clear-groups --no-new-privs \
    env -i PATH=/usr/bin:/bin NOTIFY_SOCKET="$notify_socket" "${listen_env[@]}" \
    /usr/bin/dolores serve --config /etc/dolores/dolores.toml
) >"$work/stdout" 2>"$work/stderr" &
server_pid=$!

for _ in $(seq 200); do
  grep -q 'READY=1' "$work/notices" && break
  kill -0 "$server_pid" 2>/dev/null || fail "the server exited: $(cat "$work/stderr")"
  sleep 0.05
done
ready=$(grep 'READY=1' "$work/notices") || fail "no READY=1 within 10s: $(cat "$work/stderr")"
say "notified: $ready"
grep -q "MAINPID=$server_pid\b" <<<"$ready" || fail "MAINPID is not the server's pid $server_pid"
url=$(sed -n 's/.*STATUS=listening on \(http[^ ]*\).*/\1/p' <<<"$ready")
[ -n "$url" ] || fail "STATUS does not say where it listens"
curl -fsS --max-time 5 "$url/healthz" >/dev/null || fail "$url/healthz after READY=1"

# -- The api key it made, and a message through it ------------------------------------------
key_file=/var/lib/dolores/api-key
[ "$(stat -c '%u %a' "$key_file")" = "$service_uid 600" ] ||
  fail "$key_file: $(stat -c 'owner %u mode %a' "$key_file"), want the service user's, 600"
key=$(cat "$key_file")
grep -q "^api key: $key (kept in /var/lib/dolores/api-key)" "$work/stdout" ||
  fail "the api key is not printed: $(cat "$work/stdout")"

# The client subcommands find the server and the key in the same config (as root).
client_env=(env "${listen_env[@]}")
uid="deb-test-$$"
"${client_env[@]}" /usr/bin/dolores connect "$uid" :data --config /etc/dolores/dolores.toml >/dev/null
"${client_env[@]}" /usr/bin/dolores listen "$uid" --config /etc/dolores/dolores.toml >"$work/received" &
listen_pid=$!
"${client_env[@]}" /usr/bin/dolores update :data "from dolores update" --config /etc/dolores/dolores.toml >/dev/null
curl -fsS --max-time 5 -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
  -d '{"track": ":data", "message": {"from": "curl"}}' "$url/api/v1/update" >/dev/null
for _ in $(seq 200); do
  [ "$(grep -c '"track":":data"' "$work/received")" -ge 2 ] && break
  sleep 0.05
done
grep -q '"message":"from dolores update"' "$work/received" || fail "not received: $(cat "$work/received")"
grep -q '"message":{"from":"curl"}' "$work/received" || fail "not received: $(cat "$work/received")"
kill "$listen_pid"
wait "$listen_pid" 2>/dev/null || true
listen_pid=""
say "published with dolores update and curl; dolores listen received both"

# -- SIGTERM -------------------------------------------------------------------------------
kill -TERM "$server_pid"
for _ in $(seq 200); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.05; done
kill -0 "$server_pid" 2>/dev/null && fail "still running 10s after SIGTERM"
status=0
wait "$server_pid" || status=$?
server_pid=""
[ "$status" = 0 ] || fail "exit status $status after SIGTERM: $(cat "$work/stderr")"
wait "$notify_pid" || true
notify_pid=""
grep -qx 'STOPPING=1 | STATUS=shutting down' "$work/notices" || fail "no STOPPING=1: $(cat "$work/notices")"
say "SIGTERM: STOPPING=1 sent, exit 0"

# -- Remove, purge ---------------------------------------------------------------------------
dpkg -r dolores >/dev/null
[ ! -e /usr/bin/dolores ] || fail "/usr/bin/dolores is left after dpkg -r"
[ -f /etc/dolores/dolores.toml ] || fail "dpkg -r removed the conffile (only purge should)"
dpkg -P dolores >/dev/null
for path in /etc/dolores /var/lib/dolores /lib/systemd/system/dolores.service \
  /etc/systemd/system/dolores.service; do
  [ ! -e "$path" ] || fail "$path is left after dpkg -P"
done
! dpkg-query -W -f='${Status}' dolores 2>/dev/null | grep -q 'installed\|config-files' ||
  fail "dpkg still knows dolores after the purge"
say "removed and purged: nothing left"
say "ok"
