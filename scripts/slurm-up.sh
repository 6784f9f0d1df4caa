#!/usr/bin/env bash
# Start a real one-node Slurm cluster on this machine (Debian/Ubuntu, as root, no systemd needed).
#
# What `workbench up --gateway-backend slurm`, tests/integration/test_slurm.py and
# benchmarks/bench_slurm.py run Dask clusters on when $SLURM_CONF names no other cluster.
# Idempotent: installs only the missing packages (slurmctld slurmd slurm-client munge sudo),
# writes /etc/slurm/slurm.conf and gres.conf (the default path: `sudo` drops SLURM_CONF, and
# dask-gateway submits jobs through `sudo -u <user>`), starts munged, slurmctld and slurmd if they
# are not running, resumes the node if it is down or drained, and waits until `sinfo` shows it
# usable. Run again when it is up: it only checks and exits 0. Stop it with scripts/slurm-down.sh.
#
# The cluster:
#   - one node (this machine): CPUs from `slurmd -C`, RealMemory from it minus headroom
#     (10%, at least 1 GiB) for the OS, the hub and the gateway;
#   - up to 4 jobs share a core (OverSubscribe=FORCE:4), memory is not oversubscribed, so a 2-core
#     machine still runs a Dask scheduler and several 1-core workers at once;
#   - partitions `cpu` (default) and `gpu`, both on this node;
#   - Gres=gpu:h100:4: four PRETEND H100s (character devices made with mknod, copies of /dev/null),
#     so GPU requests (sbatch --gres=gpu:h100:N) are scheduled and counted for real and jobs see
#     CUDA_VISIBLE_DEVICES, but there is no GPU behind them;
#   - AccountingStorageType=accounting_storage/none: no slurmdbd, so accounts and QoS are NOT
#     enforced: any --account=NAME is accepted and only recorded on the job.
# State, spool, logs and pid files: /var/lib/workbench-slurm (override with WB_SLURM_DIR).
set -euo pipefail
unset SLURM_CONF  # this script sets up (and talks to) the cluster at the default path

DIR=${WB_SLURM_DIR:-/var/lib/workbench-slurm}
ETC=/etc/slurm
CONF=$ETC/slurm.conf
MARKER="# Written by Workbench scripts/slurm-up.sh"
GPU_TYPE=h100
GPU_COUNT=4
HOST=$(hostname -s)

say() { echo "[slurm] $*"; }
die() { echo "[slurm] error: $*" >&2; exit 1; }

node_state() { timeout 10 sinfo -h -n "$HOST" -o %t 2>/dev/null | head -n1 || true; }
usable() { case "$1" in *"*"*) return 1 ;; idle*|mix*|alloc*|comp*) return 0 ;; *) return 1 ;; esac; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }

if [ "$(id -u)" != 0 ]; then
  if command -v sinfo >/dev/null && usable "$(node_state)"; then
    say "node $HOST is $(node_state) (not root: only checked)"
    exit 0
  fi
  die "a one-node Slurm needs root to install and start (munged, slurmctld, slurmd). Run 'sudo scripts/slurm-up.sh' once, then try again."
fi

# -- packages ---------------------------------------------------------------------------------
need=()
command -v slurmctld >/dev/null || need+=(slurmctld)
command -v slurmd >/dev/null || need+=(slurmd)
command -v sbatch >/dev/null || need+=(slurm-client)
command -v munged >/dev/null || need+=(munge)
command -v sudo >/dev/null || need+=(sudo)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]} …"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# -- configuration ----------------------------------------------------------------------------
mkdir -p "$DIR"/{state,spool,log,dev} "$ETC"
chmod 755 "$DIR"
# the pretend GPUs: Slurm's gres.conf wants character devices (regular files are rejected)
files=()
for i in $(seq 0 $((GPU_COUNT - 1))); do
  dev="$DIR/dev/$GPU_TYPE-$i"
  [ -c "$dev" ] || { rm -f "$dev"; mknod -m 666 "$dev" c 1 3; }
  files+=("$dev")
done

read -r cpus mem < <(slurmd -C | sed -n 's/.* CPUs=\([0-9]*\) .*RealMemory=\([0-9]*\).*/\1 \2/p')
[ -n "${cpus:-}" ] && [ -n "${mem:-}" ] || die "could not read CPUs and RealMemory from 'slurmd -C'"
headroom=$(( mem / 10 > 1024 ? mem / 10 : 1024 ))
realmem=$(( mem - headroom ))
[ "$realmem" -ge 1024 ] || die "this machine has ${mem} MB of memory; Slurm jobs need at least 2 GB"

new_conf=$(cat <<EOF
$MARKER: a one-node test cluster. Edits are overwritten.
ClusterName=workbench
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
# cores and memory are consumable; OverSubscribe=FORCE:4 below lets up to 4 jobs share a core
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
ReturnToService=2
KillWait=5
MpiDefault=none
JobCompType=jobcomp/none
# no slurmdbd: accounts and QoS are recorded on jobs but NOT enforced
AccountingStorageType=accounting_storage/none
GresTypes=gpu
NodeName=$HOST CPUs=$cpus RealMemory=$realmem Gres=gpu:$GPU_TYPE:$GPU_COUNT State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE OverSubscribe=FORCE:4 State=UP
PartitionName=gpu Nodes=$HOST MaxTime=INFINITE OverSubscribe=FORCE:4 State=UP
EOF
)
new_gres="$MARKER
NodeName=$HOST Name=gpu Type=$GPU_TYPE File=$(IFS=,; echo "${files[*]}")"

if [ -e "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
  die "$CONF exists and was not written by this script: not touching another cluster's configuration. Point SLURM_CONF at that cluster instead, or move the file away."
fi
changed=0
if [ "$(cat "$CONF" 2>/dev/null)" != "$new_conf" ] || [ "$(cat "$ETC/gres.conf" 2>/dev/null)" != "$new_gres" ]; then
  printf '%s\n' "$new_conf" > "$CONF"
  printf '%s\n' "$new_gres" > "$ETC/gres.conf"
  chmod 644 "$CONF" "$ETC/gres.conf"
  changed=1
  say "wrote $CONF and $ETC/gres.conf (node $HOST: $cpus CPUs, $realmem MB, gpu:$GPU_TYPE:$GPU_COUNT)"
fi

# -- daemons ----------------------------------------------------------------------------------
if [ "$changed" = 1 ]; then
  # a new configuration: restart what runs with the old one
  for d in slurmd slurmctld; do
    if alive "$DIR/$d.pid"; then
      say "restarting $d for the new configuration"
      kill "$(cat "$DIR/$d.pid")"
      for _ in $(seq 50); do alive "$DIR/$d.pid" || break; sleep 0.2; done
    fi
  done
fi

mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge: /run/munge /var/log/munge /var/lib/munge
if [ ! -s /etc/munge/munge.key ]; then
  say "creating the munge key"
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown munge: /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
fi
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  say "starting munged"
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || die "munged does not answer; see /var/log/munge/munged.log"
fi
if ! alive "$DIR/slurmctld.pid"; then
  say "starting slurmctld"
  slurmctld || die "slurmctld did not start; see $DIR/log/slurmctld.log"
fi
if ! alive "$DIR/slurmd.pid"; then
  say "starting slurmd"
  slurmd || die "slurmd did not start; see $DIR/log/slurmd.log"
fi

# -- wait for the node ------------------------------------------------------------------------
deadline=$((SECONDS + 60))
resumed=0
while :; do
  state=$(node_state)
  if usable "$state"; then
    say "node $HOST is $state; partitions: $(sinfo -h -o '%P' | tr '\n' ' ')"
    exit 0
  fi
  case "$state" in
    down*|drain*|fail*|inval*)
      if [ "$resumed" = 0 ]; then
        say "node $HOST is $state: resuming it"
        scontrol update NodeName="$HOST" State=RESUME || true
        resumed=1
      fi ;;
  esac
  for d in slurmctld slurmd; do
    alive "$DIR/$d.pid" || { tail -n 5 "$DIR/log/$d.log" >&2; die "$d exited; see $DIR/log/$d.log"; }
  done
  [ $SECONDS -lt $deadline ] || die "node $HOST is '${state:-not answering}' after 60 s; see $DIR/log/slurmctld.log and $DIR/log/slurmd.log"
  sleep 0.5
done
