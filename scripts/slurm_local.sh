#!/usr/bin/env bash
# A single-node SLURM on this machine for tests, CI and one workstation: node `localhost`, partition `local`.
#
# Usage (as root): scripts/slurm_local.sh {install|start|stop|status}
#   install  apt-get install slurm-wlm + munge, and slurmdbd + mariadb-server so that `sacct` works
#            (submitit and dora read job states from sacct). Idempotent, non-interactive.
#   start    write /etc/slurm/{slurm,cgroup,slurmdbd}.conf for the CPUs and memory found now, then start munged,
#            mariadb, slurmdbd, slurmctld and slurmd and wait until `sinfo` shows the node idle. Idempotent.
#   stop     stop the daemons that `start` started (a MariaDB that was already running is left alone).
#   status   print sinfo and squeue.
#
# Environment:
#   SLURM_LOCAL_DIR      state, spool and logs (default /var/lib/slurm-local)
#   SLURM_LOCAL_TIMEOUT  seconds `start` waits for each daemon and for the idle node (default 60)
#
# SLURM reads /etc/slurm/slurm.conf, so the config lives there, not in the repo. A slurm.conf this script did not write
# is never overwritten. Jobs run as root (SlurmUser=root); processes are tracked without cgroups, since containers
# rarely delegate cgroup v2, so SLURM does not enforce the memory limits it schedules with.
set -euo pipefail

STATE_DIR="${SLURM_LOCAL_DIR:-/var/lib/slurm-local}"
TIMEOUT="${SLURM_LOCAL_TIMEOUT:-60}"
CONF_DIR=/etc/slurm
RUN_DIR=/run/slurm-local
LOG_DIR="$STATE_DIR/log"
MARKER="# Written by audiogen-finetune scripts/slurm_local.sh"
NODE=localhost
PARTITION=local
CLUSTER=local
DB_NAME=slurm_local_acct_db

log() { echo "slurm_local: $*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() {
    [[ $(id -u) -eq 0 ]] || die "run as root (the daemons and the apt-get install need it): sudo $0 $1"
}

need_binaries() {
    local missing=()
    for bin in munged slurmctld slurmd slurmdbd sinfo sacct mariadbd; do
        command -v "$bin" >/dev/null 2>&1 || [[ -x /usr/sbin/$bin ]] || missing+=("$bin")
    done
    [[ ${#missing[@]} -eq 0 ]] || die "missing ${missing[*]}; run '$0 install' first"
}

pid_alive() {  # pid_alive PIDFILE: true if the file names a live process
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

wait_for() {  # wait_for DESCRIPTION COMMAND...: poll COMMAND every 0.5 s for $TIMEOUT seconds
    local what=$1; shift
    local deadline=$((SECONDS + TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "timed out after ${TIMEOUT}s waiting for $what"
            show_logs
            exit 1
        fi
        sleep 0.5
    done
}

show_logs() {
    for f in /var/log/munge/munged.log "$LOG_DIR/slurmdbd.log" "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log"; do
        [[ -f $f ]] || continue
        echo "----- last lines of $f -----" >&2
        tail -n 25 "$f" >&2
    done
}

cmd_install() {
    need_root install
    local pkgs=(slurm-wlm munge slurmdbd mariadb-server)
    local missing=()
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        log "already installed: ${pkgs[*]}"
        return
    fi
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    local apt=(apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confdef
        -o Dpkg::Options::=--force-confold "${missing[@]}")
    # Package lists may be missing or stale on a fresh machine: update them only when the install needs it.
    if ! "${apt[@]}"; then
        apt-get update -q
        "${apt[@]}"
    fi
}

write_configs() {
    # slurmd -C reports what slurmd itself will detect; a node configured with more than that is marked invalid.
    local detected cpus mem
    detected=$(slurmd -C | head -n 1)
    cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$detected")
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$detected")
    [[ -n $cpus && -n $mem ]] || die "could not read CPUs and RealMemory from 'slurmd -C': $detected"

    if [[ -f $CONF_DIR/slurm.conf ]] && ! grep -qF "$MARKER" "$CONF_DIR/slurm.conf"; then
        die "$CONF_DIR/slurm.conf exists and was not written by this script; move it away to use the local SLURM"
    fi
    mkdir -p "$CONF_DIR"
    cat >"$CONF_DIR/slurm.conf.new" <<EOF
$MARKER; 'start' rewrites it.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroup v2 delegation in containers: track processes through /proc and bind no tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
# One workstation: CPUs and memory are the consumable resources; hyper-threads count as CPUs.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# A job that gives no --mem gets this much per CPU instead of the whole node.
DefMemPerCPU=1024
# submitit requeues itself with 'scontrol requeue' on preemption and timeout.
JobRequeue=1
# Small timeouts: one node on localhost, so a slow answer means a dead daemon. SlurmdTimeout leaves room for a
# machine busy with a test run; ReturnToService=2 brings the node back by itself once slurmd answers again.
SlurmctldTimeout=10
SlurmdTimeout=30
ReturnToService=2
# Seconds between SIGTERM and SIGKILL on cancel or requeue (SLURM's default, 30): the solver finishes its update,
# writes a step checkpoint and exits on SIGTERM, so a requeue rarely waits this long; shorter risks a SIGKILL
# before the checkpoint on a busy machine.
KillWait=30
# A requeued job may start again only after the job credential lifetime (default 120 s); 10 s keeps preemption
# tests quick and is still far more than a step launch takes on one machine.
AuthInfo=cred_expire=10
# No mail on this machine.
MailProg=/bin/true
# Finished jobs stay in squeue/scontrol this long (s); sacct keeps them for good.
MinJobAge=300
SchedulerType=sched/backfill
# Look at pending jobs every 2 s (default 60 s; backfill 30 s): a requeued job waits for a scheduler pass once it is
# eligible again, and a queue of a few jobs on one node costs nothing to scan.
SchedulerParameters=sched_interval=2,bf_interval=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$NODE
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    # Read only by cgroup plugins, which are not loaded above; written so no system-wide copy is picked up.
    cat >"$CONF_DIR/cgroup.conf.new" <<EOF
$MARKER
CgroupAutomount=no
ConstrainCores=no
ConstrainRAMSpace=no
EOF
    cat >"$CONF_DIR/slurmdbd.conf.new" <<EOF
$MARKER
AuthType=auth/munge
DbdHost=$NODE
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$RUN_DIR/slurmdbd.pid
LogFile=$LOG_DIR/slurmdbd.log
DebugLevel=info
# MariaDB's root account over its unix socket: no password to keep.
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=$DB_NAME
EOF
    chmod 600 "$CONF_DIR/slurmdbd.conf.new"  # slurmdbd refuses a config others can read
    CONFIG_CHANGED=0
    for name in slurm.conf cgroup.conf slurmdbd.conf; do
        if cmp -s "$CONF_DIR/$name.new" "$CONF_DIR/$name"; then
            rm -f "$CONF_DIR/$name.new"
        else
            mv -f "$CONF_DIR/$name.new" "$CONF_DIR/$name"
            CONFIG_CHANGED=1
        fi
    done
    log "$CONF_DIR/slurm.conf is for $NODE: CPUs=$cpus RealMemory=${mem}MB, partition $PARTITION"
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
    fi
    chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge
    chown munge:munge /run/munge
    chmod 755 /run/munge
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
    wait_for "munged to answer" bash -c 'munge -n | unmunge'
}

start_mariadb() {
    if mariadb-admin --connect-timeout=2 ping >/dev/null 2>&1; then
        return
    fi
    log "starting mariadb"
    /etc/init.d/mariadb start >/dev/null
    touch "$RUN_DIR/mariadb.started-here"  # so that 'stop' stops only a MariaDB that 'start' started
    wait_for "mariadb to answer" mariadb-admin --connect-timeout=2 ping
}

start_slurmdbd() {
    if pid_alive "$RUN_DIR/slurmdbd.pid"; then
        return
    fi
    log "starting slurmdbd"
    /usr/sbin/slurmdbd
    wait_for "slurmdbd to answer" sacctmgr -n -i show cluster
    # slurmctld registers the cluster itself only on some versions; add it so accounting starts at once.
    if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
}

start_slurmctld() {
    if pid_alive "$RUN_DIR/slurmctld.pid"; then
        return
    fi
    log "starting slurmctld"
    /usr/sbin/slurmctld
    wait_for "slurmctld to answer" scontrol ping
}

start_slurmd() {
    if pid_alive "$RUN_DIR/slurmd.pid"; then
        return
    fi
    log "starting slurmd"
    /usr/sbin/slurmd -N "$NODE"
}

node_state() {
    sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1
}

node_ready() {
    case "$(node_state)" in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}

all_running() {
    pid_alive "$RUN_DIR/slurmctld.pid" && pid_alive "$RUN_DIR/slurmd.pid" && pid_alive "$RUN_DIR/slurmdbd.pid" \
        && node_ready
}

cmd_start() {
    need_root start
    need_binaries
    if all_running; then
        log "already running: node $NODE is $(node_state)"
        return
    fi
    local t0=$SECONDS
    mkdir -p "$STATE_DIR/ctld" "$STATE_DIR/spool" "$LOG_DIR" "$RUN_DIR"
    write_configs
    if [[ $CONFIG_CHANGED == 1 ]] && pid_alive "$RUN_DIR/slurmctld.pid"; then
        log "the configuration changed: restarting the SLURM daemons"
        stop_slurm_daemons
    fi
    start_munge
    start_mariadb
    start_slurmdbd
    start_slurmctld
    start_slurmd
    # A node left down or drained by an earlier run comes back only when told so.
    local deadline=$((SECONDS + TIMEOUT))
    until node_ready; do
        case "$(node_state)" in
            down* | drain*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
        esac
        if ((SECONDS >= deadline)); then
            log "timed out after ${TIMEOUT}s: node $NODE is '$(node_state)', not idle"
            sinfo -N -l >&2 || true
            show_logs
            exit 1
        fi
        sleep 0.5
    done
    log "ready in $((SECONDS - t0))s: node $NODE is $(node_state), partition $PARTITION"
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE: SIGTERM the process, then wait up to 15 s for it to exit
    local name=$1 pidfile=$2 pid
    pid_alive "$pidfile" || return 0
    pid=$(cat "$pidfile")
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 30); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.5
    done
    log "$name (pid $pid) did not exit after SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

stop_slurm_daemons() {
    stop_pidfile slurmd "$RUN_DIR/slurmd.pid"
    stop_pidfile slurmctld "$RUN_DIR/slurmctld.pid"
    stop_pidfile slurmdbd "$RUN_DIR/slurmdbd.pid"
}

cmd_stop() {
    need_root stop
    stop_slurm_daemons
    if [[ -f $RUN_DIR/mariadb.started-here ]]; then
        log "stopping mariadb"
        /etc/init.d/mariadb stop >/dev/null || true
        rm -f "$RUN_DIR/mariadb.started-here"
    fi
    stop_pidfile munged /run/munge/munged.pid
    log "stopped"
}

cmd_status() {
    if ! scontrol ping >/dev/null 2>&1; then
        echo "slurmctld is not running; start it with: $0 start"
        return 1
    fi
    sinfo
    echo
    squeue
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *)
        echo "usage: $0 {install|start|stop|status}" >&2
        exit 2
        ;;
esac
