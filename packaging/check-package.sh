#!/usr/bin/env bash
# packaging/check-package.sh: checks a shardcast .deb without installing it on this machine.
#
#   packaging/check-package.sh target/debian/shardcast_*.deb
#
# 1. its control data and contents (dpkg-deb -I, -c): binary, unit, conffile, man page,
#    completions, docs, and /etc/shardcast/shardcast.toml listed as a conffile;
# 2. unpacks it into a throwaway root (dpkg -x: no maintainer scripts run);
# 3. the unit passes `systemd-analyze verify` with no warning at all (when systemd-analyze
#    is there; its absence is reported, not hidden);
# 4. the unpacked binary loads the unpacked conffile (`shardcast config`), serves on a free
#    loopback port, answers 200 on /readyz, /livez and /metrics, and exits 0 on SIGTERM.
# Every wait is bounded. Exit status 0 when everything passed.
set -euo pipefail

deb=${1:?usage: $0 PACKAGE.deb}
[ -f "$deb" ] || { echo "no such file: $deb" >&2; exit 2; }
for tool in dpkg-deb curl python3; do
  command -v "$tool" >/dev/null || { echo "check-package: $tool is needed" >&2; exit 2; }
done

work=$(mktemp -d)
server=
cleanup() {
  [ -n "$server" ] && kill -KILL "$server" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "check-package: FAIL: $*" >&2; exit 1; }
pass() { echo "check-package: ok: $*"; }

echo "== control"
dpkg-deb -I "$deb" | sed -n '/Package:/,$p'
dpkg-deb -e "$deb" "$work/control"

echo "== contents"
dpkg-deb -c "$deb" | awk '{print $1, $6}' > "$work/contents"
cat "$work/contents"
# Debian 12 tools put the unit under /lib, newer ones under /usr/lib: either is fine.
unit_path=$(awk '$2 ~ /^\.(\/usr)?\/lib\/systemd\/system\/shardcast\.service$/ {print substr($2, 2)}' "$work/contents")
[ -n "$unit_path" ] || fail "no shardcast.service under /usr/lib/systemd/system or /lib/systemd/system"
expect() { # path, mode prefix
  grep -qE "^$2 \\.$1\$" "$work/contents" || fail "missing $1 (mode $2)"
}
expect /usr/bin/shardcast '-rwxr-xr-x'
expect /etc/shardcast/shardcast.toml '-rw-r--r--'
expect /usr/share/man/man1/shardcast.1.gz '-rw-r--r--'
expect /usr/share/bash-completion/completions/shardcast '-rw-r--r--'
expect /usr/share/zsh/vendor-completions/_shardcast '-rw-r--r--'
expect /usr/share/fish/vendor_completions.d/shardcast.fish '-rw-r--r--'
expect /usr/share/doc/shardcast/copyright '-rw-r--r--'
grep -qx /etc/shardcast/shardcast.toml "$work/control/conffiles" || fail "/etc/shardcast/shardcast.toml is not a conffile"
for script in postinst prerm postrm; do
  [ -x "$work/control/$script" ] || fail "no $script maintainer script (systemd enable/start/stop)"
done
pass "contents, conffile and maintainer scripts"

echo "== unpack into a throwaway root"
root="$work/root"
dpkg -x "$deb" "$root"
bin="$root/usr/bin/shardcast"
conf="$root/etc/shardcast/shardcast.toml"
gzip -t "$root/usr/share/man/man1/shardcast.1.gz" || fail "man page is not valid gzip"
"$bin" --version
pass "unpacked; binary runs"

echo "== systemd-analyze verify"
if command -v systemd-analyze >/dev/null; then
  # verify wants ExecStart= to exist on this machine: point it at the unpacked binary. The
  # man: link is not checked (no man page is installed here); everything else is. verify
  # exits 0 on unknown keys and bad values, so any output at all is a failure.
  mkdir "$work/unit"
  sed "s#^ExecStart=/usr/bin/shardcast #ExecStart=$bin #" "$root$unit_path" > "$work/unit/shardcast.service"
  grep -q "^ExecStart=$bin " "$work/unit/shardcast.service" || fail "unit has no ExecStart=/usr/bin/shardcast ..."
  if ! out=$(systemd-analyze verify --man=no "$work/unit/shardcast.service" 2>&1) || [ -n "$out" ]; then
    printf '%s\n' "$out" >&2
    fail "systemd-analyze verify"
  fi
  pass "systemd-analyze verify: no warnings"
else
  echo "check-package: SKIPPED systemd-analyze verify: not installed (apt-get install systemd)"
fi

echo "== run the unpacked binary with the unpacked conffile"
"$bin" config --config "$conf" > "$work/effective.toml" || fail "shardcast config --config $conf"
pass "conffile loads: $(grep -c = "$work/effective.toml") effective keys"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkfifo "$work/log"
RUST_LOG=info NO_COLOR=1 "$bin" --config "$conf" --listen "127.0.0.1:$port" --drain-delay 0s 2> "$work/log" &
server=$!
exec 3< "$work/log"
# Wait for the "listening" log line (bounded), then keep draining the log to a file.
deadline=$((SECONDS + 20))
listening=
while [ $SECONDS -lt $deadline ] && IFS= read -r -t 20 -u 3 line; do
  printf '%s\n' "$line" >> "$work/server.log"
  case $line in *"shardcast listening"*) listening=1; break ;; esac
done
cat <&3 >> "$work/server.log" &
[ -n "$listening" ] || { cat "$work/server.log" >&2; fail "server did not log 'shardcast listening' within 20 s"; }
for path in /readyz /livez /metrics; do
  code=$(curl -s -o "$work/body" -w '%{http_code}' --max-time 5 "http://127.0.0.1:$port$path")
  [ "$code" = 200 ] || fail "GET $path answered $code"
done
grep -q '^shardcast_connections' "$work/body" || fail "/metrics has no shardcast_connections"
pass "/readyz, /livez and /metrics answer 200 on 127.0.0.1:$port"

kill -TERM "$server"
# tail --pid returns when the process is gone; timeout bounds the wait.
timeout 30 tail --pid="$server" -f /dev/null || kill -KILL "$server" 2>/dev/null || true
status=0
wait "$server" || status=$?
server=
[ "$status" = 0 ] || { cat "$work/server.log" >&2; fail "exit status $status after SIGTERM (137: killed after 30 s)"; }
pass "SIGTERM: drained and exited 0"
echo "check-package: all checks passed for $(basename "$deb")"
