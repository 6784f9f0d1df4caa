#!/usr/bin/env bash
# Stop the one-node Slurm cluster started by scripts/slurm-up.sh: cancel its jobs, then stop
# slurmd, slurmctld and munged (only the processes named in their pid files). The configuration
# and state stay in /etc/slurm and /var/lib/workbench-slurm; scripts/slurm-up.sh starts it again.
set -euo pipefail
unset SLURM_CONF

DIR=${WB_SLURM_DIR:-/var/lib/workbench-slurm}
MARKER="# Written by Workbench scripts/slurm-up.sh"

say() { echo "[slurm] $*"; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }

[ "$(id -u)" = 0 ] || { echo "[slurm] error: run as root (sudo scripts/slurm-down.sh)" >&2; exit 1; }
if [ -e /etc/slurm/slurm.conf ] && ! grep -qF "$MARKER" /etc/slurm/slurm.conf; then
  echo "[slurm] error: /etc/slurm/slurm.conf was not written by scripts/slurm-up.sh: not stopping that cluster" >&2
  exit 1
fi

stop() {  # stop NAME PIDFILE
  if alive "$2"; then
    say "stopping $1"
    kill "$(cat "$2")"
    for _ in $(seq 100); do alive "$2" || return 0; sleep 0.1; done
    say "$1 did not stop within 10 s; killing it"
    kill -9 "$(cat "$2")" 2>/dev/null || true
  fi
}

if alive "$DIR/slurmctld.pid"; then
  jobs=$(squeue -h -o %i 2>/dev/null | wc -l)
  if [ "$jobs" -gt 0 ]; then
    say "cancelling $jobs job(s)"
    squeue -h -o %i | xargs -r scancel --full || true
    for _ in $(seq 100); do [ "$(squeue -h -o %i | wc -l)" = 0 ] && break; sleep 0.1; done
  fi
fi
stop slurmd "$DIR/slurmd.pid"
stop slurmctld "$DIR/slurmctld.pid"
stop munged /run/munge/munged.pid
say "stopped"
