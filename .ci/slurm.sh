#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for CI and for trying hydra/launcher=slurm:
#
#   eval "$(.ci/slurm.sh start)"   # prints `export SLURM_CONF=...`; sinfo shows the node idle
#   .ci/slurm.sh stop              # stops slurmd, slurmctld and munged; removes the state folder
#
# Needs root and Debian's `slurm-wlm` + `munge` (installed when missing). Everything lives in
# one folder ($XAI_EXP_SLURM_DIR, default /tmp/xai-exp-slurm): its own munge key and socket,
# slurm.conf, spool folders, logs and pid files, so it touches no system-wide SLURM or munge.
# Controller and node daemons listen on free ports picked at start; the node is `hostname -s`
# with the machine's real CPU count and memory. A requeued job waits cred_expire + 1 = 21 s
# before it starts again (SLURM's default is 121 s; the wait lets the node forget the job's
# revoked credential, so it must not be skipped), and the scheduler looks at pending jobs every
# 5 s (default 60 s), so it starts about then. No accounting: `sacct` fails (submitit then
# warns once; see xai_exp/slurm.py).
set -euo pipefail

DIR="${XAI_EXP_SLURM_DIR:-/tmp/xai-exp-slurm}"
CONF="$DIR/slurm.conf"

log() { echo "slurm.sh: $*" >&2; }

install_packages() {
  if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
    log "installing slurm-wlm and munge"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge) \
      >&2
  fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
  install_packages
  if [ -f "$DIR/slurmctld.pid" ] && sinfo_ok; then
    log "already running ($CONF)"
    echo "export SLURM_CONF=$CONF"
    return 0
  fi
  rm -rf "$DIR"
  mkdir -p "$DIR/ctld" "$DIR/d" "$DIR/munge"
  chmod 700 "$DIR/munge"
  dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$DIR/munge/munge.key"
  munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
    --seed-file="$DIR/munge/munged.seed"

  local node cpus mem
  node=$(hostname -s)
  cpus=$(nproc --all)
  mem=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
  mem=$((mem * 9 / 10))  # what jobs may ask for: leave the rest to the OS and the daemons
  cat >"$CONF" <<EOF
ClusterName=xaiexp
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=20
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/d
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
MpiDefault=none
ReturnToService=2
KillWait=30
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
  slurmctld -f "$CONF"
  slurmd -f "$CONF"
  export SLURM_CONF="$CONF"
  local waited=0
  until sinfo_ok; do
    waited=$((waited + 1))
    if [ "$waited" -gt 60 ]; then
      log "the node is not idle after 60 s:"
      sinfo -N >&2 || true
      tail -n 20 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
      return 1
    fi
    sleep 1
  done
  log "node $node idle ($cpus CPUs, ${mem} MB), config $CONF"
  echo "export SLURM_CONF=$CONF"
}

sinfo_ok() {
  SLURM_CONF="$CONF" sinfo -h -N -o '%T' 2>/dev/null | grep -qx idle
}

stop_pid() {  # stop_pid FILE NAME: SIGTERM the daemon, SIGKILL it after 10 s
  local file=$1 pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 20); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.5
  done
  log "$2 ($pid) did not stop: SIGKILL"
  kill -9 "$pid" 2>/dev/null || true
}

stop() {
  [ -d "$DIR" ] || return 0
  if [ -f "$CONF" ]; then
    SLURM_CONF="$CONF" scancel --full --user=root 2>/dev/null || true
  fi
  stop_pid "$DIR/slurmd.pid" slurmd
  stop_pid "$DIR/slurmctld.pid" slurmctld
  stop_pid "$DIR/munge/munged.pid" munged
  rm -rf "$DIR"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
