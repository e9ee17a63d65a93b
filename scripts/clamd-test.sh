#!/usr/bin/env bash
# Start the clamd the test suite scans with, and print the CLAMD_URL to use (the only line
# on stdout; progress goes to stderr):
#
#   CLAMD_URL=$(bash scripts/clamd-test.sh)      # start (or reuse) and print the URL
#   bash scripts/clamd-test.sh stop              # stop the one this script started
#
# It loads only the project's test signatures (docker/clamav/test-signatures: EICAR), since
# freshclam cannot download the official ones here, and listens on 127.0.0.1:3317 (not the
# default 3310, to stay clear of a system clamd). Idempotent: a clamd that already scans on
# that port is reused. One that answers PING but cannot scan (a test clamd left running
# from a checkout since deleted: its temporary directory is gone) is stopped and replaced.
# Installs clamav-daemon from Debian when it is missing.
# Overrides: CLAMD_TEST_PORT, CLAMD_TEST_DIR (state: config, pid, log; default var/clamd-test).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
port=${CLAMD_TEST_PORT:-3317}
state=${CLAMD_TEST_DIR:-$root/var/clamd-test}
url="tcp://127.0.0.1:$port"
pidfile="$state/clamd.pid"

log() { echo "clamd-test: $*" >&2; }

clamd_ping() {
  # clamd's z-protocol: "zPING\0" -> "PONG\0".
  timeout 5 bash -c '
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf "zPING\0" >&3
    IFS= read -r -d "" -t 3 reply <&3 || exit 1
    [ "$reply" = PONG ]
  ' _ "$port" 2>/dev/null
}

clamd_scans() {
  # A real scan, not only PING: INSTREAM of 5 harmless bytes must come back "stream: OK".
  timeout 10 bash -c '
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf "zINSTREAM\0\0\0\0\005hello\0\0\0\0" >&3
    IFS= read -r -d "" -t 8 reply <&3 || exit 1
    [ "$reply" = "stream: OK" ]
  ' _ "$port" 2>/dev/null
}

stop_broken_test_clamd() {
  # Only a clamd started by this script (its config is a clamd-test/clamd.conf) is ours
  # to stop; anything else on the port is reported, not touched.
  local pid cmdline
  pid=$(ss -ltnpH "sport = :$port" 2>/dev/null | sed -n 's/.*"clamd",pid=\([0-9]*\).*/\1/p' | head -n 1)
  cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)
  if [ -z "$pid" ] || [[ "$cmdline" != *clamd-test/clamd.conf* ]]; then
    log "something on $url answers PING but cannot scan, and it is not a test clamd: stop it"
    exit 1
  fi
  log "stopping a test clamd that cannot scan (pid $pid: $cmdline)"
  kill "$pid"
  for _ in $(seq 1 30); do
    clamd_ping || return 0
    sleep 1
  done
  log "pid $pid did not stop"
  exit 1
}

our_pid() {
  # The pid in our pidfile, when that process is alive and is a clamd.
  local pid
  [ -f "$pidfile" ] || return 1
  pid=$(cat "$pidfile" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = clamd ] || return 1
  echo "$pid"
}

if [ "${1:-start}" = stop ]; then
  if pid=$(our_pid); then
    kill "$pid"
    log "stopped clamd (pid $pid)"
  fi
  rm -f "$pidfile"
  exit 0
fi

if clamd_ping; then
  if clamd_scans; then
    log "clamd already scans on $url"
    echo "$url"
    exit 0
  fi
  stop_broken_test_clamd
fi

clamd_bin=$(command -v clamd || true)
[ -n "$clamd_bin" ] || [ ! -x /usr/sbin/clamd ] || clamd_bin=/usr/sbin/clamd
if [ -z "$clamd_bin" ]; then
  log "installing clamav-daemon"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q clamav-daemon >&2
  clamd_bin=/usr/sbin/clamd
fi

if ! our_pid >/dev/null; then
  mkdir -p "$state/tmp"
  rm -f "$pidfile"
  # No User directive: the test daemon runs as whoever runs the tests (root in CI), bound
  # to loopback, scanning test data only. StreamMaxLength is above any plan's image limit.
  cat >"$state/clamd.conf" <<EOF
DatabaseDirectory $root/docker/clamav/test-signatures
OfficialDatabaseOnly false
TCPSocket $port
TCPAddr 127.0.0.1
Foreground false
PidFile $pidfile
LogFile $state/clamd.log
LogTime true
TemporaryDirectory $state/tmp
StreamMaxLength 64M
MaxFileSize 64M
MaxScanSize 256M
SelfCheck 3600
EOF
  log "starting $clamd_bin on $url (log: $state/clamd.log)"
  "$clamd_bin" --config-file="$state/clamd.conf" >&2
fi

for _ in $(seq 1 60); do
  if clamd_ping && clamd_scans; then
    echo "$url"
    exit 0
  fi
  sleep 1
done
log "clamd did not answer PING on $url within 60 s; last log lines:"
tail -n 20 "$state/clamd.log" >&2 || true
exit 1
