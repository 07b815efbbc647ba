# shellcheck shell=bash
# Shared by the slurm/*.sbatch scripts (sourced, not run): launch es-mpi inside the
# allocation, forward Slurm's warning signal to it, requeue the job if es-mpi stopped
# early. See slurm/README.md.
#
# es_mpi_launch ES_MPI_ARGS...   e.g. es_mpi_launch train --config C --model M --run R
#
# Variables (all optional):
#   ES_MPI_LAUNCHER      srun (default: srun --mpi=pmi2, one task per rank) or mpiexec
#                        (mpiexec -n $SLURM_NTASKS; MPICH's hydra launches through srun)
#   ES_MPI_SRUN_ARGS     srun options replacing the default --mpi=pmi2 (e.g. --mpi=pmix)
#   ES_MPI_TIMEOUT       limit for one launch (GNU timeout syntax: 3600, 50m; 0 = none,
#                        the default). On expiry es-mpi gets SIGUSR1 (it checkpoints and
#                        stops; a launch hung in MPI start-up just ends, SIGKILL 120 s
#                        later at the latest) and the job requeues, as after the
#                        time-limit warning. srun --mpi=pmi2 with MPICH from PyPI was
#                        seen to hang in a few percent of launches: set it to bound that.
#   ES_MPI_MAX_REQUEUES  requeue at most this many times (default 50)
#
# Exit status of es-mpi (the same under srun and mpiexec):
#   0   the run is complete                 -> the job ends COMPLETED
#   75  stopped early by a signal, resumable -> scontrol requeue, this job exits 0
#   2   bad input (one error line)          -> the job ends FAILED with 2
#   *   a crash                             -> the job ends FAILED with it

es_mpi_log() { echo "es-mpi job: $*"; }

# the job's state as slurmctld sees it now (RUNNING, CANCELLED, TIMEOUT, ...)
es_mpi_job_state() {
    scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o 'JobState=[A-Z_]*' \
        | cut -d= -f2
}

# the process to signal: the launcher itself, not the `timeout` wrapping it
es_mpi_target() {
    local child
    child=$(pgrep -P "$ES_MPI_PID" 2>/dev/null | head -n 1)
    echo "${child:-$ES_MPI_PID}"
}

es_mpi_on_signal() {
    ES_MPI_CAUGHT=1
    if [[ $1 == TERM ]]; then
        # Cancel, time limit and preemption send SIGTERM to every process of the job,
        # the ranks included, which then checkpoint and stop. Forwarding it would make
        # them see it twice (srun then kills the step, hydra's proxies add another).
        es_mpi_log "got SIGTERM at $(date '+%F %T'): Slurm signals the ranks itself"
        return
    fi
    # SIGUSR1 (--signal=B:USR1@120, scancel --signal=USR1 --batch) reaches only this
    # shell; SIGINT too, and srun would not forward a single SIGINT: send SIGUSR1 on
    es_mpi_log "got SIG$1 at $(date '+%F %T'): asking es-mpi to checkpoint and stop"
    kill -s USR1 "$(es_mpi_target)" 2>/dev/null || true
}

# wait (at most 10 s) until this node's slurmstepd of the finished step is gone: a rerun
# started sooner (scontrol update StartTime=now) would reuse the step id while the old
# one still cleans up, and srun --mpi=pmi2 then fails ("failed to send temp kvs")
es_mpi_wait_steps() {
    local _
    for _ in $(seq 100); do
        pgrep -f "^slurmstepd: \[$SLURM_JOB_ID\.[0-9]+\]" >/dev/null || return 0
        sleep 0.1
    done
}

es_mpi_launch() {
    local launcher=${ES_MPI_LAUNCHER:-srun} rc state
    local -a cmd
    export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
    export PYTHONUNBUFFERED=1
    case $launcher in
        srun)
            # srun does not inherit --cpus-per-task from sbatch (Slurm >= 22.05)
            # shellcheck disable=SC2206
            cmd=(srun ${ES_MPI_SRUN_ARGS:---mpi=pmi2} --kill-on-bad-exit=1
                 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" es-mpi "$@") ;;
        mpiexec)
            cmd=(mpiexec -n "$SLURM_NTASKS" es-mpi "$@") ;;
        *)
            es_mpi_log "ES_MPI_LAUNCHER must be srun or mpiexec, not '$launcher'"
            return 2 ;;
    esac
    es_mpi_log "$SLURM_JOB_ID ($SLURM_JOB_NAME) on ${SLURM_JOB_NUM_NODES:-1} node(s)" \
        "[${SLURM_JOB_NODELIST:-?}], $SLURM_NTASKS rank(s), $OMP_NUM_THREADS thread(s) each," \
        "SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}, started $(date '+%F %T')"
    es_mpi_log "${cmd[*]}"

    # in the background, so that this shell runs its traps while es-mpi runs
    ES_MPI_CAUGHT=
    trap 'es_mpi_on_signal USR1' USR1
    trap 'es_mpi_on_signal TERM' TERM
    trap 'es_mpi_on_signal INT' INT
    timeout --signal=USR1 --kill-after=120 "${ES_MPI_TIMEOUT:-0}" "${cmd[@]}" &
    ES_MPI_PID=$!
    while :; do
        wait "$ES_MPI_PID"
        rc=$?
        # a trap interrupted `wait`: wait again (bash keeps the status of a reaped child)
        if [[ -n $ES_MPI_CAUGHT ]]; then ES_MPI_CAUGHT=; continue; fi
        break
    done
    trap - USR1 TERM INT
    es_mpi_log "es-mpi exited with status $rc at $(date '+%F %T')"

    case $rc in
        0)
            es_mpi_log "run complete"
            return 0 ;;
        75|124)
            [[ $rc == 124 ]] && es_mpi_log "the launch ran past ES_MPI_TIMEOUT=$ES_MPI_TIMEOUT"
            state=$(es_mpi_job_state)
            if [[ $state != RUNNING ]]; then
                es_mpi_log "job is $state: not requeueing; resume with the same sbatch command"
                return 0
            fi
            if (( ${SLURM_RESTART_COUNT:-0} >= ${ES_MPI_MAX_REQUEUES:-50} )); then
                es_mpi_log "requeued ${SLURM_RESTART_COUNT} times already (ES_MPI_MAX_REQUEUES):" \
                    "not again; resume with the same sbatch command"
                return 75
            fi
            es_mpi_wait_steps
            es_mpi_log "stopped early, resumable: scontrol requeue $SLURM_JOB_ID"
            scontrol requeue "$SLURM_JOB_ID" || { es_mpi_log "requeue failed"; return 75; }
            return 0 ;;
        *)
            return "$rc" ;;
    esac
}

