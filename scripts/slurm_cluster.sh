#!/usr/bin/env bash
# A real local SLURM cluster with two fake nodes (node1, node2) on this machine, for CI and for
# trying the slurm/ scripts without a cluster. Needs root and the Debian packages that
# `bash scripts/install.sh --dev` installs (slurmctld slurmd slurm-client munge).
#
#   bash scripts/slurm_cluster.sh start    # idempotent: starts what is not running, waits for idle nodes
#   bash scripts/slurm_cluster.sh status   # node states (exit 0 when both nodes are up)
#   bash scripts/slurm_cluster.sh stop     # stops only the daemons this script started (pid files)
#
# Layout: config /etc/slurm/slurm.conf (written by this script, refuses to overwrite a foreign one
# unless RGKD_SLURM_FORCE=1), state and pid files under $RGKD_SLURM_STATE (/run/rgkd-slurm), logs
# under /var/log/slurm. Both fake nodes claim RGKD_SLURM_CPUS CPUs (default 4) whatever the real
# core count (SlurmdParameters=config_overrides); no cgroups (proctrack/linuxproc, task/none).
set -euo pipefail

STATE="${RGKD_SLURM_STATE:-/run/rgkd-slurm}"
CONF="/etc/slurm/slurm.conf"
MARKER="# written by rgkd_megatron scripts/slurm_cluster.sh"
NODES=(node1 node2)
PORTS=(7821 7822)
CPUS="${RGKD_SLURM_CPUS:-4}"
CTLD_PORT="${RGKD_SLURM_CTLD_PORT:-6817}"
WAIT_S="${RGKD_SLURM_WAIT_S:-60}"

die() { echo "slurm_cluster.sh: error: $*" >&2; exit 1; }
log() { echo "[slurm_cluster] $*"; }

alive() {  # alive PIDFILE: the pid in the file is a running process
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

check_tools() {
  local missing=()
  for tool in slurmctld slurmd sinfo scontrol munged; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || missing+=("$tool")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    die "missing ${missing[*]}: run \`bash scripts/install.sh --dev\` (installs slurmctld slurmd slurm-client munge)"
  fi
  [ "$(id -u)" = 0 ] || die "the local cluster needs root (slurmd runs jobs as their user); current uid $(id -u)"
}

write_conf() {
  if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    [ "${RGKD_SLURM_FORCE:-0}" = 1 ] || die "$CONF exists and was not written by this script; move it away or set RGKD_SLURM_FORCE=1 to overwrite it"
    cp "$CONF" "$CONF.rgkd-backup"
    log "saved the existing $CONF as $CONF.rgkd-backup"
  fi
  mkdir -p /etc/slurm
  local tmp
  tmp="$(mktemp)"
  cat >"$tmp" <<EOF
$MARKER
ClusterName=rgkd-ci
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdSpoolDir=/var/spool/slurmd-%n
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
TmpFS=/tmp/slurm-%n
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdParameters=config_overrides
JobRequeue=1
KillWait=5
MinJobAge=600
NodeName=${NODES[0]} NodeHostname=localhost NodeAddr=127.0.0.1 Port=${PORTS[0]} CPUs=$CPUS RealMemory=4000 State=UNKNOWN
NodeName=${NODES[1]} NodeHostname=localhost NodeAddr=127.0.0.1 Port=${PORTS[1]} CPUs=$CPUS RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=${NODES[0]},${NODES[1]} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
  if [ -f "$CONF" ] && cmp -s "$tmp" "$CONF"; then
    rm -f "$tmp"
  else
    mv "$tmp" "$CONF"
    chmod 644 "$CONF"
    log "wrote $CONF"
  fi
}

start_munge() {
  if alive "$STATE/munged.pid"; then
    return
  fi
  if pgrep -x munged >/dev/null 2>&1; then
    log "munged is already running (not started by this script; left alone)"
    return
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    log "created /etc/munge/munge.key"
  fi
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  for _ in $(seq 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
  [ -s /run/munge/munged.pid ] || die "munged did not start (see /var/log/munge/munged.log)"
  cp /run/munge/munged.pid "$STATE/munged.pid"
  log "started munged (pid $(cat "$STATE/munged.pid"))"
}

start_daemons() {
  mkdir -p "$STATE/ctld" /var/log/slurm
  if ! alive "$STATE/slurmctld.pid"; then
    /usr/sbin/slurmctld -c -f "$CONF"
    for _ in $(seq 50); do alive "$STATE/slurmctld.pid" && break; sleep 0.1; done
    alive "$STATE/slurmctld.pid" || die "slurmctld did not start (see /var/log/slurm/slurmctld.log)"
    log "started slurmctld (pid $(cat "$STATE/slurmctld.pid"))"
  fi
  for node in "${NODES[@]}"; do
    mkdir -p "/var/spool/slurmd-$node" "/tmp/slurm-$node"
    if ! alive "$STATE/slurmd-$node.pid"; then
      /usr/sbin/slurmd -N "$node" -f "$CONF"
      for _ in $(seq 50); do alive "$STATE/slurmd-$node.pid" && break; sleep 0.1; done
      alive "$STATE/slurmd-$node.pid" || die "slurmd -N $node did not start (see /var/log/slurm/slurmd-$node.log)"
      log "started slurmd -N $node (pid $(cat "$STATE/slurmd-$node.pid"))"
    fi
  done
}

node_states() {  # "node state" lines; nothing at once when no slurmctld runs (sinfo would retry for ~8 s)
  pgrep -x slurmctld >/dev/null 2>&1 || return 0
  timeout 10 sinfo -h -N -o '%N %t' 2>/dev/null | sort -u
}

wait_idle() {
  local deadline=$((SECONDS + WAIT_S)) states
  while [ "$SECONDS" -lt "$deadline" ]; do
    states="$(node_states)"
    if [ "$(grep -cE '^node[12] (idle|mix|alloc)' <<<"$states")" = 2 ]; then
      log "nodes up: $(tr '\n' ' ' <<<"$states")"
      return 0
    fi
    # a node left DOWN by an earlier run (same config) comes back with an explicit resume
    if grep -qE '^node[12] (down|drain)' <<<"$states"; then
      scontrol update NodeName="${NODES[0]},${NODES[1]}" State=RESUME >/dev/null 2>&1 || true
    fi
    sleep 0.2
  done
  die "nodes not idle after ${WAIT_S}s: $(node_states | tr '\n' ' ') (logs: /var/log/slurm/)"
}

stop_pidfiles() {  # stop_pidfiles PIDFILE...: TERM all at once, wait, KILL what is left after 10 s
  local f pid pids=()
  for f in "$@"; do
    if alive "$f"; then
      pid="$(cat "$f")"
      kill "$pid" 2>/dev/null || true
      pids+=("$pid")
      log "stopping $(basename "$f" .pid) (pid $pid)"
    fi
    rm -f "$f"
  done
  for _ in $(seq 100); do
    local left=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left=1; done
    [ "$left" = 0 ] && return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
}

cmd="${1:-}"
case "$cmd" in
  start)
    check_tools
    mkdir -p "$STATE"
    write_conf
    start_munge
    start_daemons
    wait_idle
    ;;
  stop)
    stop_pidfiles "$STATE/slurmd-${NODES[0]}.pid" "$STATE/slurmd-${NODES[1]}.pid" "$STATE/slurmctld.pid"
    stop_pidfiles "$STATE/munged.pid"  # last: the slurm daemons talk to munge while they stop
    ;;
  status)
    for name in slurmctld "slurmd-${NODES[0]}" "slurmd-${NODES[1]}" munged; do
      if alive "$STATE/$name.pid"; then echo "$name: running (pid $(cat "$STATE/$name.pid"))"; else echo "$name: not running (by this script)"; fi
    done
    states="$(node_states || true)"
    echo "nodes: ${states:-none}" | tr '\n' ' '
    echo
    [ "$(grep -cE '^node[12] (idle|mix|alloc)' <<<"$states")" = 2 ]
    ;;
  *)
    echo "usage: bash scripts/slurm_cluster.sh start|stop|status" >&2
    exit 2
    ;;
esac
