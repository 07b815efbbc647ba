#!/usr/bin/env bash
# A real Slurm cluster on this machine, for tests and for trying the job scripts in slurm/
# on a workstation. Debian/Ubuntu, run as root, no systemd, no cgroups.
#
#   tools/slurm_cluster.sh start [--nodes N]  # install slurm + munge if missing, start,
#                                             # wait until every node is idle
#   tools/slurm_cluster.sh status [--nodes N] # daemons and sinfo
#   tools/slurm_cluster.sh stop [--nodes N]   # cancel all jobs, shut down, end only our
#                                             # daemons (and remove our namespaces); no
#                                             # --nodes: both kinds, where they run
#
# --nodes 1 (the default): one node, `localhost`, daemons on this machine's network.
# --nodes N >= 2: N hosts on one machine. Each node is a Linux network namespace
# (esmpi-n1 .. esmpi-nN) with its own hostname (a UTS namespace), its own /etc/hosts and
# /dev/shm (a mount namespace) and its own address on a bridge this script creates
# (esmpi-br, 10.77.0.1/24 on this machine; node i is 10.77.0.(10+i)); slurmctld runs in a
# namespace of its own (esmpi-ctl, 10.77.0.2), one slurmd runs in each node. Jobs, srun
# and MPI ranks run inside their node's namespaces and talk over TCP across the bridge;
# nothing is routed anywhere else. munged serves every namespace through its socket file.
# The file system is shared, as on a cluster. `stop` ends every process left in our
# namespaces and deletes the namespaces, the veth pairs and the bridge.
#
# Everything lives under one directory, ES_MPI_SLURM_DIR (default /tmp/es-mpi-slurm, or
# /tmp/es-mpi-slurm-multinode with --nodes N >= 2, so the two kinds can run side by side):
# slurm.conf, the munge key and socket, slurmctld state, slurmd spool, logs, pid files,
# and env.sh (`source` it, or export the SLURM_CONF line `start` prints). Nothing is
# written to /etc. Each node has this machine's CPUs (nproc --all), partition `debug`.
# Slurm's ports (6817, 6818), the node names and the subnet are fixed: one cluster of each
# kind per machine.
set -euo pipefail

NODES=1
NODES_GIVEN=
CMD=${1:-}
[[ $# -gt 0 ]] && shift
while [[ $# -gt 0 ]]; do
    case $1 in
        --nodes) NODES=${2:-}; NODES_GIVEN=1; shift 2 || true ;;
        --nodes=*) NODES=${1#--nodes=}; NODES_GIVEN=1; shift ;;
        *) echo "slurm_cluster: error: unknown option '$1' (usage: $0 start|stop|status [--nodes N])" >&2
           exit 2 ;;
    esac
done
if ! [[ $NODES =~ ^[0-9]+$ ]] || (( NODES < 1 || NODES > 8 )); then
    echo "slurm_cluster: error: --nodes must be a whole number from 1 to 8, not '$NODES'" >&2
    exit 2
fi
if (( NODES == 1 )); then
    DIR=${ES_MPI_SLURM_DIR:-/tmp/es-mpi-slurm}
else
    DIR=${ES_MPI_SLURM_DIR:-/tmp/es-mpi-slurm-multinode}
fi
NET=10.77.0          # the multi-node cluster's /24 (on our bridge only)
BRIDGE=esmpi-br
CTL_NS=esmpi-ctl
CONF=$DIR/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket
START_TIMEOUT=${ES_MPI_SLURM_START_TIMEOUT:-30}
STOP_TIMEOUT=${ES_MPI_SLURM_STOP_TIMEOUT:-60}
export SLURM_CONF=$CONF

log() { echo "slurm_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }
now() { date +%s.%N; }

# the daemons of this cluster: pid file names under $DIR/run (slurmd.NODE per node)
daemons() {
    local node
    echo munged slurmctld
    for node in $(node_names); do echo "slurmd.$node"; done
}

# the node names: localhost, or esmpi-n1 .. esmpi-nN
node_names() {
    if (( NODES == 1 )); then echo localhost; else seq -f 'esmpi-n%g' 1 "$NODES"; fi
}

# pid of daemon NAME (munged, slurmctld, slurmd[.NODE]) if it is alive and is ours
# (its command line names our directory and the daemon), else nothing.
our_pid() {
    local file=$DIR/run/$1.pid pid cmdline
    [[ -s $file ]] || return 0
    pid=$(<"$file")
    [[ $pid =~ ^[0-9]+$ ]] || return 0
    [[ -r /proc/$pid/cmdline ]] || return 0
    cmdline=$(tr '\0' ' ' </proc/"$pid"/cmdline)
    if [[ $cmdline == *"$DIR"* && $cmdline == *"${1%%.*}"* && $cmdline == *"${1#*.}"* ]]; then
        echo "$pid"
    fi
}

running() {
    local d
    for d in $(daemons); do [[ -n $(our_pid "$d") ]] || return 1; done
}

# "idle" once every node of ours is idle, else the states sinfo reports (or nothing)
node_state() {
    local states
    states=$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u) || return 0
    if [[ $(awk '$2 == "idle" {print $1}' <<<"$states" | sort | tr '\n' ' ') \
            == "$(node_names | sort | tr '\n' ' ')" ]]; then
        echo idle
    else
        awk '{print $2}' <<<"$states" | sort -u | tr '\n' ' '
    fi
}

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
    local ctl_host nodes_conf node i=0
    if (( NODES == 1 )); then
        ctl_host=localhost
        nodes_conf="NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
    else
        ctl_host="$CTL_NS($NET.2)"
        nodes_conf=
        for node in $(node_names); do
            i=$((i + 1))
            nodes_conf+="NodeName=$node NodeHostname=$node NodeAddr=$NET.$((10 + i)) CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"$'\n'
        done
    fi
    cat >"$CONF" <<EOF
# written by tools/slurm_cluster.sh: $NODES node(s), everything under $DIR
ClusterName=esmpi
SlurmctldHost=$ctl_host
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.daemon.pid
SlurmdPidFile=$DIR/run/slurmd.%n.daemon.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.%n.log
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
$nodes_conf
PartitionName=debug Nodes=$(node_names | paste -sd,) Default=YES MaxTime=INFINITE State=UP
EOF
    echo "$NODES" >"$DIR/nodes"
    if (( NODES > 1 )); then
        # The hosts share one kernel: UCX (MPICH's network module) would reach a rank on
        # another node by cross-memory attach and never touch the network. Keep it on TCP
        # between nodes, as between real hosts (MPICH's own shared memory stays on within
        # a node). A job's own UCX_TLS wins.
        cat >"$DIR/task_prolog.sh" <<'EOF'
#!/bin/sh
[ -n "$UCX_TLS" ] || echo "export UCX_TLS=tcp,self"
EOF
        chmod 755 "$DIR/task_prolog.sh"
        echo "TaskProlog=$DIR/task_prolog.sh" >>"$CONF"
    fi
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

# ---- the hosts of a multi-node cluster: network namespaces on a bridge ------------------

# our namespaces (esmpi-ctl, esmpi-n1 ..) that exist now
our_namespaces() {
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^esmpi-(ctl|n[0-9]+)$' || true
}

# the network: bridge $BRIDGE ($NET.1 on this machine), a namespace per host, each with
# a veth pair (esmpi-HOST here, eth0 there) on the bridge and its loopback up
net_up() {
    local host addr i=0
    command -v ip >/dev/null && command -v unshare >/dev/null \
        || die "--nodes needs ip (iproute2) and unshare (util-linux)"
    if ip -o addr show 2>/dev/null | grep -q " $NET\."; then
        die "an address in $NET.0/24 is in use on this machine; the cluster needs that subnet"
    fi
    ip link add "$BRIDGE" type bridge
    ip addr add "$NET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    printf '127.0.0.1 localhost\n%s.2 %s\n' "$NET" "$CTL_NS" >"$DIR/hosts"
    for host in "$CTL_NS" $(node_names); do
        if [[ $host == "$CTL_NS" ]]; then addr=$NET.2; else i=$((i + 1)); addr=$NET.$((10 + i)); fi
        [[ $host == "$CTL_NS" ]] || echo "$addr $host" >>"$DIR/hosts"
        ip netns add "$host"
        ip link add "$host" type veth peer name eth0 netns "$host"
        ip link set "$host" master "$BRIDGE" up
        ip -n "$host" addr add "$addr/24" dev eth0
        ip -n "$host" link set eth0 up
        ip -n "$host" link set lo up
    done
    chmod 644 "$DIR/hosts"
}

# host_cmd HOST: HOST_CMD=(the command prefix that runs a command as host HOST): in its
# network namespace, with its own hostname, our hosts file as /etc/hosts and a /dev/shm
# of its own (MPI's shared memory). Every step execs, so the pid is the daemon's.
host_cmd() {
    # shellcheck disable=SC2016
    HOST_CMD=(nsenter --net="/run/netns/$1" unshare --uts --mount --propagation private bash -c '
        hostname "$1" && mount --bind "$2" /etc/hosts \
            && mount -t tmpfs -o mode=1777 tmpfs /dev/shm && shift 2 && exec "$@"' \
        host "$1" "$DIR/hosts")
}

# end every process left in our namespaces (ours: only our daemons made them), then
# delete the namespaces (their veth pairs go with them) and the bridge
net_down() {
    local ns pids
    for ns in $(our_namespaces); do
        pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
        # shellcheck disable=SC2086
        [[ -z $pids ]] || kill -KILL $pids 2>/dev/null || true
    done
    for ns in $(our_namespaces); do
        for _ in $(seq 50); do
            [[ -z $(ip netns pids "$ns" 2>/dev/null) ]] && break
            sleep 0.1
        done
        ip netns del "$ns" 2>/dev/null || log "could not delete namespace $ns"
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link del "$BRIDGE" || log "could not delete bridge $BRIDGE"
    fi
}

# a failed start: show the logs, end the daemons it started, fail
start_failed() {
    tail_logs
    stop_daemons
    (( NODES == 1 )) || net_down
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
    local t0 state node d running_nodes
    t0=$(now)
    mkdir -p "$DIR"
    running_nodes=$(cat "$DIR/nodes" 2>/dev/null || echo 1)
    if running && [[ $running_nodes != "$NODES" ]]; then
        die "a cluster of $running_nodes node(s) runs in $DIR; stop it first"
    fi
    if running && [[ $(node_state) == idle ]]; then
        log "already running, $NODES node(s) ($DIR)"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    install_slurm
    stop_daemons  # a half-started cluster from before: end what is ours
    if (( NODES == 1 )); then
        if (echo >/dev/tcp/127.0.0.1/6817) 2>/dev/null; then
            die "port 6817 is taken: another slurmctld runs on this machine (one cluster per machine)"
        fi
    else
        [[ $(id -u) == 0 ]] || die "--nodes $NODES needs root (network namespaces)"
        net_down  # namespaces or a bridge left from before
    fi
    rm -rf "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run" "$DIR/nodes"
    write_config
    for node in $(node_names); do mkdir -p "$DIR/spool/$node"; done
    (( NODES == 1 )) || net_up

    spawn munged munged -F --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/run/munged.daemon.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed"
    for _ in $(seq 100); do [[ -S $MUNGE_SOCKET ]] && break; sleep 0.05; done
    [[ -S $MUNGE_SOCKET ]] || start_failed "munged did not start"

    if (( NODES == 1 )); then
        spawn slurmctld slurmctld -D -f "$CONF"
        spawn slurmd.localhost slurmd -D -N localhost -f "$CONF"
    else
        host_cmd "$CTL_NS"
        spawn slurmctld "${HOST_CMD[@]}" slurmctld -D -f "$CONF"
        for node in $(node_names); do
            host_cmd "$node"
            spawn "slurmd.$node" "${HOST_CMD[@]}" slurmd -D -N "$node" -f "$CONF"
        done
    fi

    local deadline=$(( $(date +%s) + START_TIMEOUT ))
    while :; do
        state=$(node_state)
        [[ $state == idle ]] && break
        for d in $(daemons); do
            [[ -n $(our_pid "$d") ]] || start_failed "$d exited during start"
        done
        if (( $(date +%s) >= deadline )); then
            start_failed "nodes not idle after ${START_TIMEOUT}s (state: ${state:-no answer})"
        fi
        sleep 0.1
    done
    log "started $NODES node(s) in $(awk -v a="$t0" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}') s:" \
        "$(for d in $(daemons); do printf '%s %s, ' "$d" "$(our_pid "$d")"; done)state in $DIR"
    echo "export SLURM_CONF=$CONF"
}

# kill -TERM our daemons that are still alive and wait (bounded) until they are gone
stop_daemons() {
    local d pid pids=()
    for d in $(daemons | tac); do
        pid=$(our_pid "$d")
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
            local alive=
            for d in $(daemons); do
                [[ $d == munged || -z $(our_pid "$d") ]] || alive=1
            done
            [[ -z $alive ]] && break
            sleep 0.1
        done
    fi
    stop_daemons
    (( NODES == 1 )) || net_down
    # all state goes; the logs and slurm.conf stay for a look afterwards (start clears them)
    rm -rf "$DIR/state" "$DIR/spool" "$DIR/run" "$DIR/munge" "$DIR/hosts" "$DIR/nodes" \
        "$DIR/task_prolog.sh" "$DIR/env.sh"
    log "stopped in $(awk -v a="$t0" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}') s"
}

status() {
    local d pid rc=0
    for d in $(daemons); do
        pid=$(our_pid "$d")
        if [[ -n $pid ]]; then echo "$d: running (pid $pid)"; else echo "$d: not running"; rc=3; fi
    done
    if (( NODES > 1 )); then echo "namespaces: $(our_namespaces | tr '\n' ' ')"; fi
    if ((rc == 0)); then
        sinfo
        squeue
    fi
    return $rc
}

# stop and status act on the cluster in $DIR, whatever --nodes said
if [[ $CMD != start && -s $DIR/nodes ]]; then NODES=$(<"$DIR/nodes"); fi

# a plain `stop` (no --nodes, no ES_MPI_SLURM_DIR) stops both kinds, where they run
if [[ $CMD == stop && -z $NODES_GIVEN && -z ${ES_MPI_SLURM_DIR:-} ]]; then
    "$0" stop --nodes 1
    if [[ -d /tmp/es-mpi-slurm-multinode/run || -n $(our_namespaces) ]] \
            || ip link show "$BRIDGE" >/dev/null 2>&1; then
        "$0" stop --nodes 2
    fi
    exit 0
fi

case $CMD in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status [--nodes N]   (N = 1 by default; state in \$ES_MPI_SLURM_DIR, default /tmp/es-mpi-slurm, or /tmp/es-mpi-slurm-multinode for N >= 2)" >&2
       exit 2 ;;
esac
