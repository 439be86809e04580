#!/usr/bin/env bash
# Stop the one-node Slurm cluster that .ci/slurm-up.sh started (its daemons, by their pid files).
#
# Best effort and idempotent: what is not running is skipped; a cluster whose slurm.conf this
# script's partner did not write (a real one) is never touched. Jobs still queued are cancelled.
set -uo pipefail

MARK="# written by wsss-bench .ci/slurm-up.sh"
DB_SOCKET=/run/mysqld/mysqld.sock

if ! grep -qF "$MARK" /etc/slurm/slurm.conf 2>/dev/null; then
  echo "slurm-down: no cluster of .ci/slurm-up.sh here; nothing to stop"
  exit 0
fi

stop() {  # stop NAME PIDFILE: SIGTERM, then wait up to 10 s for the process to go
  local name=$1 pidfile=$2 pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && echo "slurm-down: $name ($pid) still running" >&2
  fi
  rm -f "$pidfile"
}

scancel --user=root >/dev/null 2>&1 || true
stop slurmd /run/slurmd.pid
stop slurmctld /run/slurmctld.pid
stop slurmdbd /run/slurmdbd.pid
if [ -S "$DB_SOCKET" ]; then
  mariadb-admin --socket="$DB_SOCKET" shutdown >/dev/null 2>&1 || true
fi
stop munged /run/munge/munged.pid
echo "slurm-down: cluster stopped"
