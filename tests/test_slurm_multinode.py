"""Slurm on two hosts: slurm/es_mpi_multinode.sbatch on a two-node cluster.

`tools/slurm_cluster.sh start --nodes 2` makes two hosts on this machine: network
namespaces esmpi-n1 and esmpi-n2 with their own hostnames and addresses on a bridge,
slurmctld in a third namespace, one slurmd per node. Ranks on different nodes talk MPI
over TCP across the bridge. One rank per node, on a tiny model:

- a 2-node job ends with the rewards and weights of a 1-node job of the same config;
- a 2-node job stopped by SIGUSR1 requeues itself; submitted again on 1 node (1 rank),
  it continues the run file to the same weights;
- killing the rank on one node ends the job at once (not at the time limit), and the
  same sbatch command resumes the run file to the same weights;
- a job that cannot be scheduled (a node drained) fails its test at once with the
  scheduler's reason.

Skipped where the cluster cannot run (no Slurm, not root, no ip), unless
ES_MPI_REQUIRE_SLURM=1 (CI) makes that a failure. The whole module takes about a minute.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_mpi import assert_same_trajectory, rows
from test_slurm import (
    FINAL,
    JOB_TIMEOUT,
    job_config,
    job_info,
    read,
    slurm,
    start_cluster,
    submit,
    wait_job,
)

pytestmark = pytest.mark.slurm

SCRIPT = "slurm/es_mpi_multinode.sbatch"
GENERATIONS = 30  # generations take ~0.1 s: enough that a signal or a kill lands mid-run
CONFIG = job_config(GENERATIONS)
NODES = ("esmpi-n1", "esmpi-n2")


def layout(nodes: int, ranks: int) -> tuple[str, ...]:
    """sbatch options for the multi-node script on CPUs (it asks for GPUs by default):
    `ranks` in all, spread over `nodes` (--ntasks, and --ntasks-per-node as a maximum
    only, so that the job may later shrink to fewer nodes with the same ranks)."""
    return (f"--nodes={nodes}", f"--ntasks={ranks}", f"--ntasks-per-node={ranks}",
            "--gpus-per-task=0")


@pytest.fixture(scope="module")
def env(tiny_model):
    """A running two-node cluster (stopped, namespaces removed, afterwards)."""
    with start_cluster(2) as cluster:
        yield dict(cluster, TINY_MODEL=str(tiny_model))


def run_job(env, tmp: Path, run: Path, options: tuple[str, ...]) -> tuple[dict, str]:
    t0 = time.monotonic()
    job, log = submit(env, tmp, run, script=SCRIPT, options=options, config=CONFIG)
    info = wait_job(env, job, log)
    print(f"\njob {job} {' '.join(options)}: {time.monotonic() - t0:.1f}s", file=sys.stderr)
    return info, read(log)


@pytest.fixture(scope="module")
def one_node(env, tmp_path_factory) -> Path:
    """The reference: the same script and config on one node, 2 ranks there."""
    tmp = tmp_path_factory.mktemp("one_node")
    info, text = run_job(env, tmp, tmp / "run.h5", layout(1, 2))
    assert info["JobState"] == "COMPLETED" and info["NumNodes"] == "1", text
    return tmp / "run.h5"


def wait_for_generation(env, job: str, log: Path, generation: int) -> None:
    end = time.monotonic() + JOB_TIMEOUT
    while not re.search(rf"^gen +{generation}/", read(log), re.M):
        state = job_info(env, job)["JobState"]
        assert state not in FINAL, f"job {job} ended ({state}) too early:\n{read(log)}"
        assert time.monotonic() < end, f"no generation {generation}:\n{read(log)}"
        time.sleep(0.1)


def rank_pids(node: str) -> list[int]:
    """The es-mpi ranks running on host `node` (in its network namespace)."""
    pids = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True,
                          check=True).stdout.split()
    ranks = []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(Path(arg.decode()).name == "es-mpi" for arg in cmdline[:2]) \
                and b"train" in cmdline:
            ranks.append(int(pid))
    return ranks


def test_two_node_job_equals_the_one_node_job(env, one_node, tmp_path):
    info, text = run_job(env, tmp_path, tmp_path / "run.h5", layout(2, 2))
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    assert info["NumNodes"] == "2" and info["NodeList"] == "esmpi-n[1-2]", text
    assert "on 2 node(s) [esmpi-n[1-2]], 2 rank(s)" in text
    gens = [int(g) for g in re.findall(r"^gen +(\d+)/", text, re.M)]
    assert gens == list(range(1, GENERATIONS + 1)), text
    assert rows(tmp_path / "run.h5")["world_size"].tolist() == [2] * GENERATIONS
    assert_same_trajectory(one_node, tmp_path / "run.h5")


def test_signalled_two_node_job_requeues_then_continues_on_one_node(env, one_node, tmp_path):
    """SIGUSR1 to the batch shell: es-mpi checkpoints on both nodes and exits 75, and the
    script requeues the job. The user cancels the waiting job and submits the same script
    on one node, one rank: it continues the run file, exactly."""
    run = tmp_path / "run.h5"
    job, log = submit(env, tmp_path, run, script=SCRIPT, options=layout(2, 2), config=CONFIG)
    wait_for_generation(env, job, log, 2)
    slurm(env, "scancel", "--signal=USR1", "--batch", job)
    end = time.monotonic() + JOB_TIMEOUT
    while job_info(env, job).get("Reason") != "BeginTime":  # requeued, waiting to restart
        assert job_info(env, job)["JobState"] not in FINAL, read(log)
        assert time.monotonic() < end, f"job {job} was not requeued:\n{read(log)}"
        time.sleep(0.2)
    slurm(env, "scancel", job)
    first = read(log)
    assert "on 2 node(s) [esmpi-n[1-2]], 2 rank(s)" in first, first
    assert "es-mpi exited with status 75" in first and f"scontrol requeue {job}" in first
    stopped = int(re.search(r"stopped by SIGUSR1 after (\d+) complete", first).group(1))
    assert 2 <= stopped < GENERATIONS, "the signal came too late to test"

    info, text = run_job(env, tmp_path, run, layout(1, 1))
    assert info["JobState"] == "COMPLETED" and info["NumNodes"] == "1", text
    assert f"resuming {run} at generation {stopped} of {GENERATIONS} on 1 rank(s)" in text
    world = rows(run)["world_size"].tolist()
    assert world == [2] * stopped + [1] * (GENERATIONS - stopped)
    assert_same_trajectory(one_node, run)


def test_a_killed_node_ends_the_job_at_once_and_the_run_resumes(env, one_node, tmp_path):
    """SIGKILL to the rank on esmpi-n2 (as if that host died): srun ends the step on
    the other node, the job fails within seconds instead of hanging in an allgather, and
    submitting the same script again resumes the run file to the same weights."""
    run = tmp_path / "run.h5"
    job, log = submit(env, tmp_path, run, script=SCRIPT, options=layout(2, 2), config=CONFIG)
    wait_for_generation(env, job, log, 2)
    ranks = {node: rank_pids(node) for node in NODES}
    assert all(len(pids) == 1 for pids in ranks.values()), (ranks, read(log))
    subprocess.run(["kill", "-KILL", str(ranks["esmpi-n2"][0])], check=True)
    t0 = time.monotonic()
    info = wait_job(env, job, log, timeout=60)
    seconds = time.monotonic() - t0
    print(f"\njob {job} ended {seconds:.1f}s after its rank on esmpi-n2 was killed",
          file=sys.stderr)
    text = read(log)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", text
    assert "esmpi-n2: task 1: Killed" in text and "es-mpi exited with status 137" in text
    assert seconds < 30, text
    assert not rank_pids("esmpi-n1"), "a rank outlived the job"
    done = rows(run)["checksum"].size
    assert 1 <= done < GENERATIONS, text

    info, text = run_job(env, tmp_path, run, layout(2, 2))
    assert info["JobState"] == "COMPLETED" and info["NumNodes"] == "2", text
    assert f"resuming {run} at generation {done} of {GENERATIONS} on 2 rank(s)" in text
    assert_same_trajectory(one_node, run)


def test_a_job_that_cannot_be_scheduled_fails_at_once_with_the_reason(env, tmp_path):
    slurm(env, "scontrol", "update", "NodeName=esmpi-n2", "State=DRAIN",
          "Reason=test_slurm_multinode")
    try:
        job, log = submit(env, tmp_path, tmp_path / "run.h5", script=SCRIPT,
                          options=layout(2, 2), config=CONFIG)
        t0 = time.monotonic()
        with pytest.raises(pytest.fail.Exception) as failed:
            wait_job(env, job, log)
        assert time.monotonic() - t0 < 10
        reason = str(failed.value)
        assert reason.startswith(f"job {job} cannot be scheduled: "), reason
        assert "DRAINED" in reason or "ReqNodeNotAvail" in reason, reason
        assert job_info(env, job)["JobState"] == "CANCELLED"
    finally:
        slurm(env, "scontrol", "update", "NodeName=esmpi-n2", "State=RESUME")
