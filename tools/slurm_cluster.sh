#!/usr/bin/env bash
# A real one-node Slurm cluster on localhost, for tests and for trying the job scripts
# in slurm/ on a workstation. Debian/Ubuntu, run as root, no systemd, no cgroups.
#
#   tools/slurm_cluster.sh start    # install slurm + munge if missing, start, wait until idle
#   tools/slurm_cluster.sh status   # daemons and sinfo
#   tools/slurm_cluster.sh stop     # cancel all jobs, shut down, end only our daemons
#
# Everything lives under one directory, ES_MPI_SLURM_DIR (default /tmp/es-mpi-slurm):
# slurm.conf, the munge key and socket, slurmctld state, slurmd spool, logs, pid files,
# and env.sh (`source` it, or export the SLURM_CONF line `start` prints). Nothing is
# written to /etc. The node is `localhost` with this machine's CPUs, partition `debug`.
# Slurm's ports (6817, 6818) and node name are fixed: one such cluster per machine.
set -euo pipefail

DIR=${ES_MPI_SLURM_DIR:-/tmp/es-mpi-slurm}
CONF=$DIR/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket
START_TIMEOUT=${ES_MPI_SLURM_START_TIMEOUT:-30}
STOP_TIMEOUT=${ES_MPI_SLURM_STOP_TIMEOUT:-60}
export SLURM_CONF=$CONF

log() { echo "slurm_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }
now() { date +%s.%N; }

# pid of daemon NAME (munged, slurmctld, slurmd) if it is alive and is ours
# (its command line names our directory), else nothing.
our_pid() {
    local file=$DIR/run/$1.pid pid
    [[ -s $file ]] || return 0
    pid=$(<"$file")
    [[ $pid =~ ^[0-9]+$ ]] || return 0
    if [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' </proc/"$pid"/cmdline | grep -q -- "$DIR" \
        && tr '\0' ' ' </proc/"$pid"/cmdline | grep -q -- "$1"; then
        echo "$pid"
    fi
}

running() { [[ -n $(our_pid munged) && -n $(our_pid slurmctld) && -n $(our_pid slurmd) ]]; }

node_state() { sinfo -h -N -n localhost -o %T 2>/dev/null | head -1; }

install_slurm() {
    command -v sbatch >/dev/null && command -v slurmctld >/dev/null \
        && command -v slurmd >/dev/null && command -v munged >/dev/null && return 0
    [[ $(id -u) == 0 ]] || die "slurm is not installed and this is not root: apt-get install slurmctld slurmd slurm-client munge"
    command -v apt-get >/dev/null || die "slurm is not installed and there is no apt-get"
    log "installing slurmctld slurmd slurm-client munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge \
        >"$DIR/apt.log" 2>&1; then
        apt-get update -q >>"$DIR/apt.log" 2>&1 || true
        apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge \
            >>"$DIR/apt.log" 2>&1 || die "apt-get install failed, see $DIR/apt.log"
    fi
}

write_config() {
    local cpus mem_mb first_id
    cpus=$(nproc --all)  # GNU nproc alone honours OMP_NUM_THREADS
    # Job ids never repeat across restarts (100 per second of the clock, a 7-day cycle):
    # MPICH under srun names its shared memory after the job and step id, and a segment
    # left in /dev/shm by a killed rank breaks MPI_Init of a later job with the same id.
    first_id=$(( $(date +%s) % 600000 * 100 + 1000 ))
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    mkdir -p "$DIR"/{munge,state,spool,log,run}
    chmod 755 "$DIR" "$DIR/munge" "$DIR/log"
    if [[ ! -s $DIR/munge/munge.key ]]; then
        (umask 077; dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none)
    fi
    chmod 600 "$DIR/munge/munge.key"
    cat >"$CONF" <<EOF
# written by tools/slurm_cluster.sh: one node (localhost), everything under $DIR
ClusterName=esmpi
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.daemon.pid
SlurmdPidFile=$DIR/run/slurmd.daemon.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
ReturnToService=2
JobRequeue=1
FirstJobId=$first_id
KillWait=10
InactiveLimit=0
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$DIR/env.sh" <<EOF
export SLURM_CONF=$CONF
EOF
}

# start DAEMON ARGS...: in the background, detached from our stdin/stdout, pid recorded
spawn() {
    local name=$1; shift
    setsid "$@" </dev/null >>"$DIR/log/$name.out" 2>&1 &
    echo $! >"$DIR/run/$name.pid"
}

# a failed start: show the logs, end the daemons it started, fail
start_failed() {
    tail_logs
    stop_daemons
    die "$*"
}

tail_logs() {
    local f
    for f in "$DIR"/log/*; do
        [[ -s $f ]] || continue
        log "--- $f (last lines)"
        tail -n 15 "$f" >&2
    done
}

start() {
    local t0 pid state
    t0=$(now)
    if running && [[ $(node_state) =~ ^(idle|mixed|allocated) ]]; then
        log "already running ($DIR)"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    mkdir -p "$DIR"
    install_slurm
    stop_daemons  # a half-started cluster from before: end what is ours
    if (echo >/dev/tcp/127.0.0.1/6817) 2>/dev/null; then
        die "port 6817 is taken: another slurmctld runs on this machine (one cluster per machine)"
    fi
    rm -rf "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run"
    write_config

    spawn munged munged -F --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/run/munged.daemon.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed"
    for _ in $(seq 100); do [[ -S $MUNGE_SOCKET ]] && break; sleep 0.05; done
    [[ -S $MUNGE_SOCKET ]] || start_failed "munged did not start"

    spawn slurmctld slurmctld -D -f "$CONF"
    spawn slurmd slurmd -D -N localhost -f "$CONF"

    local deadline=$(( $(date +%s) + START_TIMEOUT ))
    while :; do
        state=$(node_state)
        [[ $state == idle ]] && break
        for d in munged slurmctld slurmd; do
            [[ -n $(our_pid $d) ]] || start_failed "$d exited during start"
        done
        if (( $(date +%s) >= deadline )); then
            start_failed "node not idle after ${START_TIMEOUT}s (state: ${state:-no answer})"
        fi
        sleep 0.1
    done
    log "started in $(awk -v a="$t0" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}') s: munged $(our_pid munged), slurmctld $(our_pid slurmctld), slurmd $(our_pid slurmd); state in $DIR"
    echo "export SLURM_CONF=$CONF"
}

# kill -TERM our daemons that are still alive and wait (bounded) until they are gone
stop_daemons() {
    local d pid pids=()
    for d in slurmd slurmctld munged; do
        pid=$(our_pid $d)
        [[ -n $pid ]] && { kill -TERM "$pid" 2>/dev/null || true; pids+=("$pid"); }
    done
    ((${#pids[@]})) || return 0
    for _ in $(seq 100); do
        local alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || return 0
        sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    sleep 0.2
}

stop() {
    local t0 deadline
    t0=$(now)
    if [[ -n $(our_pid slurmctld) ]]; then
        scancel --partition=debug 2>/dev/null || true
        deadline=$(( $(date +%s) + STOP_TIMEOUT ))
        while [[ -n $(squeue -h -o %i 2>/dev/null) ]]; do
            if (( $(date +%s) >= deadline )); then
                log "jobs still in the queue after ${STOP_TIMEOUT}s; shutting down anyway"
                break
            fi
            scancel --partition=debug 2>/dev/null || true
            sleep 0.5
        done
        scontrol shutdown 2>/dev/null || true
        for _ in $(seq 100); do
            [[ -z $(our_pid slurmctld) && -z $(our_pid slurmd) ]] && break
            sleep 0.1
        done
    fi
    stop_daemons
    rm -f "$DIR"/run/*.pid
    log "stopped in $(awk -v a="$t0" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}') s"
}

status() {
    local d pid rc=0
    for d in munged slurmctld slurmd; do
        pid=$(our_pid $d)
        if [[ -n $pid ]]; then echo "$d: running (pid $pid)"; else echo "$d: not running"; rc=3; fi
    done
    if ((rc == 0)); then
        sinfo
        squeue
    fi
    return $rc
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status   (state in \$ES_MPI_SLURM_DIR, default /tmp/es-mpi-slurm)" >&2
       exit 2 ;;
esac
