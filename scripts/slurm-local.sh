#!/usr/bin/env bash
# A single-node SLURM cluster on this machine (controller and compute node on localhost), for the tests of the
# SLURM launcher and for developers. No systemd needed: the daemons run in the background with pid files.
#
#   scripts/slurm-local.sh start    # install (root only, when missing), start munged/slurmctld/slurmd, wait for idle
#   scripts/slurm-local.sh status   # sinfo + squeue; exit 1 when slurmctld or slurmd is not running
#   scripts/slurm-local.sh stop     # cancel all jobs, stop the daemons (munged only if this script started it)
#
# Everything (slurm.conf, state, spool, logs, pid files) lives in ${SIB_SLURM_DIR:-/tmp/sib-slurm}.
# Clients find the cluster with:  export SLURM_CONF=<dir>/slurm.conf   (printed by start and status)
set -euo pipefail

DIR=${SIB_SLURM_DIR:-/tmp/sib-slurm}
CONF=$DIR/slurm.conf
ETC_CONF=/etc/slurm/slurm.conf
MUNGE_KEY=/etc/munge/munge.key
MUNGE_PID_MARK=$DIR/run/munged.ours   # exists only when this script started munged
WAIT_S=60
export SLURM_CONF=$CONF

say() { echo "slurm-local: $*"; }
die() { echo "slurm-local: error: $*" >&2; exit 1; }

pid_alive() {  # pid_alive FILE: the pid written in FILE is a live process (/proc: kill -0 fails for non-root)
  local pid
  [ -s "$1" ] && pid=$(cat "$1") && [ -n "$pid" ] && [ -d "/proc/$pid" ]
}

node_state() { sinfo -h -o %t 2>/dev/null | head -n 1; }

ensure_packages() {
  local missing=()
  for cmd in sbatch slurmctld slurmd munged; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    die "missing ${missing[*]}: install the Debian packages slurm-wlm and munge (as root: apt-get install slurm-wlm munge)"
  fi
  say "installing slurm-wlm and munge (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return 0  # a munged is already up (ours from an earlier start, or the system's)
  fi
  [ "$(id -u)" = 0 ] || die "munged is not running and starting it needs root"
  id munge >/dev/null 2>&1 || die "user munge is missing (is the munge package installed?)"
  install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
  install -d -o munge -g munge -m 0755 /run/munge
  if [ ! -s "$MUNGE_KEY" ]; then
    if command -v mungekey >/dev/null 2>&1; then
      mungekey --create --keyfile="$MUNGE_KEY"
    else
      dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    fi
  fi
  chown munge:munge "$MUNGE_KEY"
  chmod 0400 "$MUNGE_KEY"
  # --force: start even when a stale socket of a dead munged is left in /run/munge
  runuser -u munge -- munged --force
  for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
    sleep 0.1
  done
  munge -n | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
  cp /run/munge/munged.pid "$MUNGE_PID_MARK"
}

write_conf() {
  local host cpus mem_kb real_mb
  host=$(hostname -s)
  cpus=$(nproc)
  mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
  # 90% of MemTotal: slurmd drains a node whose detected memory is below RealMemory, and a job asking more
  # --mem than RealMemory is refused at submission; memory is not a consumable (CR_CPU) nor enforced
  # (no cgroups, jobacct_gather/none), so --mem only has to fit under this.
  real_mb=$((mem_kb * 9 / 10240))
  cat >"$CONF" <<EOF
# Written by scripts/slurm-local.sh; rewritten at each start.
ClusterName=sib-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire+1 s before it may start again (default 120 s); 10 s still leaves
# ample time for a launch credential on localhost.
AuthInfo=cred_expire=10
MpiDefault=none
# No mail on this machine; the default /bin/mail is absent and logs an error.
MailProg=/bin/true
# No cgroups (no systemd here): linuxproc tracks processes by parent pid, task/none binds nothing;
# with these plugins slurm 22.05 reads no cgroup.conf.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Start a submitted batch job at the next pass (~1 s) instead of batching submissions for up to 3 s, and
# run a backfill pass every 2 s (default 30 s), which is what starts a requeued job once eligible.
SchedulerParameters=batch_sched_delay=0,bf_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Jobs may be requeued (scontrol requeue, submitit's preemption/timeout handling).
JobRequeue=1
# A node that was down (e.g. after stop/start) comes back as soon as slurmd registers.
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
# Short grace between SIGTERM and SIGKILL when jobs are cancelled or time out.
KillWait=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  chmod 0644 "$CONF"
}

link_etc_conf() {
  # Commands started without this shell's environment (a test runner, submitit's job scripts calling
  # scontrol/srun, an IDE) read the compiled-in default /etc/slurm/slurm.conf: point it at our file, but
  # never replace a real configuration.
  [ "$(id -u)" = 0 ] || return 0
  if [ -L "$ETC_CONF" ] && { [ "$(readlink "$ETC_CONF")" = "$CONF" ] || [ ! -e "$ETC_CONF" ]; }; then
    ln -sfn "$CONF" "$ETC_CONF"
  elif [ ! -e "$ETC_CONF" ]; then
    mkdir -p "$(dirname "$ETC_CONF")"
    ln -s "$CONF" "$ETC_CONF"
  fi
}

tail_logs() {
  local f
  for f in "$DIR"/log/*; do
    [ -f "$f" ] || continue
    echo "--- $f (last lines)" >&2
    tail -n 15 "$f" >&2
  done
}

start_daemon() {  # start_daemon NAME: start slurmctld or slurmd unless its pid file names a live process
  local name=$1
  pid_alive "$DIR/run/$name.pid" && return 0
  # Without -D both daemonize and write their pid file; errors before that go to <name>.out.
  if ! "$name" -f "$CONF" >"$DIR/log/$name.out" 2>&1; then
    cat "$DIR/log/$name.out" >&2
    tail_logs
    die "$name failed to start"
  fi
}

cmd_start() {
  local t0 state resumed=0 host
  t0=$(date +%s.%N)
  ensure_packages
  if pid_alive "$DIR/run/slurmctld.pid" && pid_alive "$DIR/run/slurmd.pid" && scontrol ping >/dev/null 2>&1; then
    say "already running (node: $(node_state))"
    echo "export SLURM_CONF=$CONF"
    return 0
  fi
  mkdir -p "$DIR"/state "$DIR"/spool "$DIR"/log "$DIR"/run
  chmod 0755 "$DIR"
  start_munge
  pid_alive "$DIR/run/slurmctld.pid" || write_conf  # never rewrite the conf under a running controller
  link_etc_conf
  start_daemon slurmctld
  start_daemon slurmd
  host=$(hostname -s)
  for _ in $(seq $((WAIT_S * 5))); do
    state=$(node_state || true)
    case $state in
      idle | mix | alloc) break ;;
      drain* | drng | down)  # e.g. left drained by an earlier run: this is a throwaway cluster, resume it
        if [ $resumed = 0 ]; then
          scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true
          resumed=1
        fi ;;
    esac
    sleep 0.2
  done
  case $state in
    idle | mix | alloc) ;;
    *) tail_logs; die "node not up after ${WAIT_S}s (sinfo state: '${state:-none}'); logs in $DIR/log" ;;
  esac
  say "up in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}') s (node $host: $state, $(nproc) CPUs, partition debug)"
  echo "export SLURM_CONF=$CONF"
}

stop_pidfile() {  # stop_pidfile FILE NAME: SIGTERM, wait up to 10 s, then SIGKILL
  local pid
  pid_alive "$1" || { rm -f "$1"; return 0; }
  pid=$(cat "$1")
  kill "$pid" 2>/dev/null || die "cannot signal $2 ($pid) (started by another user?)"
  for _ in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  if kill -0 "$pid" 2>/dev/null; then
    say "$2 ($pid) ignored SIGTERM: killing it"
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$1"
  say "stopped $2 ($pid)"
}

cmd_stop() {
  local jobs
  if pid_alive "$DIR/run/slurmctld.pid" && jobs=$(squeue -h -o %A 2>/dev/null) && [ -n "$jobs" ]; then
    # slurmstepd outlives slurmd: cancel the jobs first so no job process is left behind
    say "cancelling jobs: $(echo "$jobs" | tr '\n' ' ')"
    echo "$jobs" | xargs scancel 2>/dev/null || true
    for _ in $(seq 75); do
      [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
  stop_pidfile "$DIR/run/slurmd.pid" slurmd
  stop_pidfile "$DIR/run/slurmctld.pid" slurmctld
  if [ -f "$MUNGE_PID_MARK" ]; then
    stop_pidfile "$MUNGE_PID_MARK" munged
  fi
  if [ -L "$ETC_CONF" ] && [ "$(readlink "$ETC_CONF")" = "$CONF" ]; then
    rm -f "$ETC_CONF"
  fi
}

cmd_status() {
  if ! pid_alive "$DIR/run/slurmctld.pid" || ! scontrol ping >/dev/null 2>&1; then
    say "not running (dir $DIR)"
    return 1
  fi
  echo "export SLURM_CONF=$CONF"
  sinfo
  squeue
  pid_alive "$DIR/run/slurmd.pid" || { say "slurmd is not running (scripts/slurm-local.sh start restarts it)"; return 1; }
}

case ${1:-} in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status   (state in \${SIB_SLURM_DIR:-/tmp/sib-slurm})" >&2; exit 2 ;;
esac
