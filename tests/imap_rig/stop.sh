#!/usr/bin/env bash
# stop.sh DIR - stop the dovecot that start.sh DIR started, and only that one (pid from
# DIR/run/master.pid, checked against its command line). Safe to run twice, or after a failed start.
set -euo pipefail
[[ -d ${1:?usage: stop.sh DIR} ]] || exit 0
DIR=$(cd "$1" && pwd); PIDF=$DIR/run/master.pid
[[ -s $PIDF ]] || exit 0                                   # never started, or already stopped
# A zombie counts as stopped: the master exits about 1.2 s after SIGTERM, but a container's
# PID 1 may take another second to reap it, and a zombie holds no port or file.
running() { local state; state=$(awk '/^State:/ {print $2}' "/proc/$1/status" 2>/dev/null) && [[ $state != Z ]]; }
pid=$(cat "$PIDF")
if running "$pid" && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "-c $DIR/dovecot.conf"; then
  kill -TERM "$pid"                                        # master stops its children itself
  for _ in $(seq 100); do running "$pid" || break; sleep 0.1; done
  if running "$pid"; then                                  # still up after 10 s: force it
    kids=$(ps -o pid= --ppid "$pid" 2>/dev/null || true)  # no procps? children exit with the master
    # shellcheck disable=SC2086  # word splitting of the pid list is wanted
    kill -KILL "$pid" $kids 2>/dev/null || true
  fi
fi
rm -f "$PIDF"
