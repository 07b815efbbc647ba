"""A real Slurm: the project's job scripts submitted with sbatch to a one-node cluster.

tools/slurm_cluster.sh starts munged, slurmctld and slurmd on localhost (installing
Debian's packages if missing and this is root); the tests submit slurm/es_mpi_cpu.sbatch
as a user would, 2 ranks under srun --mpi=pmi2, on a tiny model:

- a job completes and writes its run file;
- a job signalled mid-run (SIGUSR1 to the batch shell, as --signal=B:USR1@120 does before
  the time limit) stops with status 75, requeues itself, resumes and ends with weights
  bit-identical to the uninterrupted job;
- bad input fails the job with status 2, without requeueing it.

A job that pends for a reason other than waiting its turn (a node down or drained, a
request no node can meet) fails its test at once with the scheduler's reason (wait_job).
tests/test_slurm_multinode.py reuses these helpers on a two-node cluster.

The module is skipped where Slurm cannot run (not installed and not installable, or the
cluster does not start), unless ES_MPI_REQUIRE_SLURM=1 (CI) makes that a failure.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import pytest
from conftest import BIN, cli_env
from test_mpi import assert_same_trajectory, rows

from es_mpi import runfile

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tools" / "slurm_cluster.sh"
JOB_SCRIPT = "slurm/es_mpi_cpu.sbatch"   # relative: submitted from the repository root
GENERATIONS = 60


def job_config(generations: int) -> str:
    """The run config (TOML) every Slurm test job trains with, `generations` long."""
    return ("population = 4\nmax_new_tokens = 4\nsigma = 0.05\nlr = 0.05\nseed = 3\n"
            f"generations = {generations}\n")


CONFIG = job_config(GENERATIONS)
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
JOB_TIMEOUT = 240  # seconds for one job, requeues included (a run takes ~20-40 s here)


def _unavailable(reason: str):
    if os.environ.get("ES_MPI_REQUIRE_SLURM") == "1":
        pytest.fail(f"Slurm tests required (ES_MPI_REQUIRE_SLURM=1) but {reason}")
    pytest.skip(reason)


def _installable() -> bool:
    """Install Slurm from a test only where asked to (CI), never behind a user's back."""
    return (os.environ.get("ES_MPI_REQUIRE_SLURM") == "1" and os.geteuid() == 0
            and shutil.which("apt-get") is not None)


@contextlib.contextmanager
def start_cluster(nodes: int = 1) -> Iterator[dict[str, str]]:
    """Start tools/slurm_cluster.sh with `nodes` nodes (unless it runs already); gives
    the environment for sbatch & co. (SLURM_CONF, PATH) and stops the cluster afterwards,
    if this started it, whatever the tests did."""
    daemons = ("sbatch", "scontrol", "slurmctld", "slurmd", "munged")
    if not all(shutil.which(d) or Path("/usr/sbin", d).exists() for d in daemons) \
            and not _installable():
        _unavailable("Slurm (slurmctld slurmd slurm-client munge) is not installed; "
                     "install it (tools/slurm_cluster.sh start does, as root on Debian)")
    if nodes > 1 and (os.geteuid() != 0 or not shutil.which("ip")):
        _unavailable(f"a {nodes}-node cluster needs root and ip (network namespaces)")
    size = ["--nodes", str(nodes)]
    status = subprocess.run([CLUSTER, "status", *size], capture_output=True, text=True)
    ours = status.returncode != 0  # already running: leave it running afterwards
    t0 = time.monotonic()
    try:
        start = subprocess.run([CLUSTER, "start", *size], capture_output=True, text=True,
                               timeout=600)
        if start.returncode != 0:
            _unavailable(f"tools/slurm_cluster.sh start {' '.join(size)} failed:\n"
                         f"{start.stdout}{start.stderr}")
        print(f"\n{nodes}-node cluster up in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        conf = re.search(r"export SLURM_CONF=(\S+)", start.stdout)
        assert conf, start.stdout + start.stderr
        env = {k: v for k, v in cli_env().items() if not k.startswith(("SLURM_", "SBATCH_"))}
        env.update(SLURM_CONF=conf.group(1), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
        yield env
    finally:
        if ours:
            stop = subprocess.run([CLUSTER, "stop", *size], capture_output=True, text=True,
                                  timeout=300)
            assert stop.returncode == 0, stop.stdout + stop.stderr


@pytest.fixture(scope="module")
def cluster() -> dict[str, str]:
    """A running one-node cluster; the environment for sbatch & co."""
    with start_cluster(1) as env:
        yield env


def slurm(env, *args: str) -> str:
    result = subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, f"{' '.join(args)}: {result.stdout}{result.stderr}"
    return result.stdout


def submit(env, tmp_path: Path, run: Path, args: str = "", script: str = JOB_SCRIPT,
           options: tuple[str, ...] = ("--ntasks=2",), config: str = CONFIG,
           ) -> tuple[str, Path]:
    """sbatch a job script from the repo root (default: the CPU one, 2 ranks); returns
    (job id, its log)."""
    (tmp_path / "run.toml").write_text(config)
    job_env = dict(env, ES_MPI_CONFIG=str(tmp_path / "run.toml"),
                   ES_MPI_MODEL=str(env["TINY_MODEL"]), ES_MPI_RUN=str(run),
                   ES_MPI_ARGS=args, ES_MPI_TIMEOUT="180")
    out = slurm(job_env, "sbatch", "--parsable", "--export=ALL", *options,
                "--cpus-per-task=1", f"--output={tmp_path}/slurm-%x-%j.out", script)
    job = out.strip().split(";")[0]
    return job, tmp_path / f"slurm-{job_info(env, job)['JobName']}-{job}.out"


def job_info(env, job: str) -> dict[str, str]:
    text = slurm(env, "scontrol", "show", "job", "-o", job)
    return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)


def read(log: Path) -> str:
    return log.read_text() if log.exists() else ""


def old_steps_gone(job: str, seconds: float = 10) -> None:
    """Wait until the previous run's step daemons (`slurmstepd: [J.0]`) have exited."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if subprocess.run(["pgrep", "-f", rf"^slurmstepd: \[{job}\.[0-9]+\]"],
                          capture_output=True).returncode != 0:
            return
        time.sleep(0.1)


# Why a job may wait and still run soon; any other reason it pends for (nodes down or
# drained, a partition limit, a held job) fails the test at once instead of waiting
WAITING = {"None", "Priority", "Resources", "BeginTime", "Dependency", "Prolog",
           "JobArrayTaskLimit"}


def wait_job(env, job: str, log: Path, timeout: float = JOB_TIMEOUT) -> dict[str, str]:
    """Poll scontrol until the job ends. A requeued job waits 120 s before it may start
    again: once it is pending for its begin time, move that to now. A job that cannot be
    scheduled is cancelled and fails the test with the scheduler's reason."""
    end = time.monotonic() + timeout
    bumped = 0.0
    while True:
        info = job_info(env, job)
        if info["JobState"] in FINAL:
            return info
        if info["JobState"] == "PENDING":
            reason = slurm(env, "squeue", "-h", "-j", job, "-o", "%r").strip()
            if reason and reason not in WAITING:
                subprocess.run(["scancel", job], env=env)
                pytest.fail(f"job {job} cannot be scheduled: {reason}")
        if info["JobState"] == "PENDING" and info.get("Reason") == "BeginTime" \
                and time.monotonic() - bumped > 3:
            old_steps_gone(job)
            time.sleep(1)  # the requeue must have settled before StartTime is changed
            slurm(env, "scontrol", "update", f"JobId={job}", "StartTime=now")
            bumped = time.monotonic()
        if time.monotonic() > end:
            subprocess.run(["scancel", job], env=env)
            pytest.fail(f"job {job} not done after {timeout}s: {info['JobState']}\n{read(log)}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def env(cluster, tiny_model) -> dict[str, str]:
    return dict(cluster, TINY_MODEL=str(tiny_model))


@pytest.fixture(scope="module")
def finished_job(env, tmp_path_factory):
    """The uninterrupted 2-rank job: (scontrol info, log text, run file, seconds)."""
    tmp = tmp_path_factory.mktemp("slurm_job")
    t0 = time.monotonic()
    job, log = submit(env, tmp, tmp / "run.h5")
    info = wait_job(env, job, log)
    seconds = time.monotonic() - t0
    print(f"\n2-rank job {job}: {seconds:.1f}s from sbatch to COMPLETED", file=sys.stderr)
    return info, read(log), tmp / "run.h5", seconds


def test_cluster_start_is_idempotent(env):
    again = subprocess.run([CLUSTER, "start"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stderr
    assert f"export SLURM_CONF={env['SLURM_CONF']}" in again.stdout
    assert "idle" in slurm(env, "sinfo", "-h", "-o", "%T")


def test_two_rank_job_completes_and_writes_its_run_file(finished_job):
    info, text, run, _ = finished_job
    assert info["JobState"] == "COMPLETED", text
    assert info["ExitCode"] == "0:0", text
    assert info["Restarts"] == "0", text  # the reference ran once, uninterrupted
    assert "2 rank(s)" in text and "SLURM_RESTART_COUNT=0" in text
    assert "srun --mpi=pmi2" in text
    progress = re.findall(r"^gen +(\d+)/(\d+) +reward mean", text, re.M)
    assert [int(g) for g, _ in progress] == list(range(1, GENERATIONS + 1)), text
    assert "es-mpi exited with status 0" in text and "run complete" in text
    with h5py.File(run, "r") as f:
        assert f.attrs["complete_generations"] == GENERATIONS
    r = rows(run)
    assert (r["world_size"] == 2).all()
    assert r["rewards"].shape == (GENERATIONS, 4)


def test_signalled_job_requeues_and_resumes_bit_identically(env, finished_job, tmp_path):
    """SIGUSR1 to the batch shell mid-run (what --signal=B:USR1@120 sends before the time
    limit): es-mpi checkpoints and exits 75, the script requeues the job, the rerun of the
    same script resumes the run file, and the weights equal the uninterrupted run's."""
    run = tmp_path / "run.h5"
    job, log = submit(env, tmp_path, run)
    end = time.monotonic() + JOB_TIMEOUT
    while not re.search(r"^gen +2/", read(log), re.M):
        state = job_info(env, job)["JobState"]
        assert state not in FINAL, f"job {job} ended ({state}) before generation 2:\n{read(log)}"
        assert time.monotonic() < end, f"no generation 2 after {JOB_TIMEOUT}s:\n{read(log)}"
        time.sleep(0.1)
    slurm(env, "scancel", "--signal=USR1", "--batch", job)
    info = wait_job(env, job, log)
    text = read(log)

    assert info["JobState"] == "COMPLETED", text
    assert info["ExitCode"] == "0:0", text
    assert info["Restarts"] == "1", text
    first, _, second = text.partition("SLURM_RESTART_COUNT=1")
    assert second, f"the job never ran again:\n{text}"
    assert "SLURM_RESTART_COUNT=0" in first and "got SIGUSR1" in first
    stopped = re.search(r"es-mpi: stopped by SIGUSR1 after (\d+) complete generations", first)
    assert stopped, text
    assert 2 <= int(stopped.group(1)) < GENERATIONS, "the signal came too late to test"
    assert "es-mpi exited with status 75" in first and f"scontrol requeue {job}" in first
    assert "resuming" in second and "es-mpi exited with status 0" in second
    gens = [int(g) for g in re.findall(r"^gen +(\d+)/", second, re.M)]
    assert gens == list(range(int(stopped.group(1)) + 1, GENERATIONS + 1)), text

    assert rows(run)["world_size"].tolist() == [2] * GENERATIONS
    assert_same_trajectory(finished_job[2], run)


def test_bad_input_fails_the_job_without_requeue(env, tmp_path):
    job, log = submit(env, tmp_path, tmp_path / "run.h5", args="--population 1")
    info = wait_job(env, job, log)
    text = read(log)
    assert info["JobState"] == "FAILED", text
    assert info["ExitCode"] == "2:0", text
    assert info["Restarts"] == "0", text
    assert text.count("es-mpi: error:") >= 1 and "es-mpi exited with status 2" in text
    assert not (tmp_path / "run.h5").exists()


def test_sweep_recipe_runs_one_array_task_per_grid_point_then_the_report(env, tmp_path):
    """tools/experiments.py sweep: slurm/sweep_array.sbatch as a real job array (2 sigmas x
    2 lrs, one rank each), each grid point its own complete run file, then the overlay."""
    cmd = [sys.executable, str(REPO / "tools/experiments.py"), "sweep",
           "--model", env["TINY_MODEL"], "--sigmas", "0.01", "0.02", "--lrs", "0.01", "0.03",
           "--generations", "2", "--out", str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          timeout=2 * JOB_TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    grid = [(s, lr) for lr in ("0.01", "0.03") for s in ("0.01", "0.02")]
    logs = sorted((tmp_path / "sweep").glob("slurm-es-mpi-sweep-*_*.out"))
    assert len(logs) == len(grid), done.stdout
    for sigma, lr in grid:
        info = runfile.read_info(tmp_path / "sweep" / f"run_sigma{sigma}_lr{lr}.h5")
        assert info.complete_generations == 2
        assert (info.config.sigma, info.config.lr) == (float(sigma), float(lr))
        assert (info.config.task, info.config.mode) == ("conciseness", "lowrank")
        assert f"| lowrank | {sigma} | {lr} | 0 |" in done.stdout
    summary = (tmp_path / "sweep/report/summary.md").read_text()
    assert all(f"sigma={s}" in summary for s in ("0.01", "0.02"))
    assert (tmp_path / "sweep/report/heldout.png").stat().st_size > 0
    files = [str(tmp_path / "sweep" / f"run_sigma{s}_lr{lr}.h5") for s, lr in grid]
    curves = subprocess.run([sys.executable, str(REPO / "tools/experiments.py"), "table",
                             "--curves", *files], env=env, capture_output=True, text=True,
                            timeout=60)
    assert curves.returncode == 0, curves.stderr
    lines = curves.stdout.splitlines()
    assert lines[0] == "| run | 0 | 2 |" and len(lines) == 2 + len(grid)
    base = {line.split(" | ")[1] for line in lines[2:]}
    assert len(base) == 1, "every grid point starts from the same base model score"


def test_sweep_recipe_bad_input_is_one_line_before_anything_is_submitted(tmp_path,
                                                                           tiny_model):
    def sweep(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "tools/experiments.py"), "sweep",
                               "--out", str(tmp_path / "out"), *args], env=env,
                              capture_output=True, text=True, timeout=60)

    env = dict(cli_env(), PATH=str(tmp_path))
    done = sweep()
    assert done.returncode == 1
    assert "sbatch is not on PATH" in done.stderr and "slurm_cluster.sh start" in done.stderr
    # a stand-in sbatch that records its call and fails as a failed array would
    (tmp_path / "sbatch").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/called\nexit 3\n")
    (tmp_path / "sbatch").chmod(0o755)
    # the checks `es-mpi train` makes, on every grid point, before anything is queued
    for args, message in ((["--sigmas", "0.01", "big"], "must be numbers, not 'big'"),
                          (["--lrs", "-0.1"], "config: lr = -0.1: must be in (0, 10]"),
                          (["--sigmas", "5"], "config: sigma = 5.0: must be in (0, 1]"),
                          (["--generations", "0"], "config: generations = 0: must be >= 1"),
                          (["--model", str(tmp_path / "none")], "does not exist")):
        done = sweep(*args)
        assert done.returncode == 1 and message in done.stderr.strip().splitlines()[-1]
        assert not (tmp_path / "called").exists()
    done = sweep("--model", str(tiny_model))
    assert done.returncode == 1 and "the job array ended with status 3" in done.stderr
    assert "--array=0-5%2" in (tmp_path / "called").read_text()
