"""Stopping on a signal: clean checkpoint, exit 75, and a resume that changes nothing."""

from __future__ import annotations

import signal
import subprocess
import textwrap
import time

import h5py
import pytest
from conftest import ES_MPI, MPIEXEC, cli_env, need_mpiexec, run_cli, run_python_mpi
from test_mpi import assert_same_trajectory, rows

from es_mpi.stop import EXIT_STOPPED

pytestmark = pytest.mark.mpi

ARGS = ["--population", "4", "--sigma", "0.05", "--lr", "0.05", "--max-new-tokens", "6",
        "--seed", "5", "--checkpoint-every", "100"]


def committed(path) -> int:
    """complete_generations of a finished run's file, which must exist (final assertions)."""
    with h5py.File(path, "r") as f:
        return int(f.attrs["complete_generations"])


def complete(path):
    """complete_generations while a run may be writing the file, 0 if unreadable (polling)."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return int(f.attrs["complete_generations"])
    except (OSError, KeyError):
        return 0


def checkpoints(path):
    with h5py.File(path, "r") as f:
        return sorted(int(k) for k in f["checkpoints"])


def reference(tiny_model, path, generations, extra=()):
    result = run_cli(["train", "--model", tiny_model, "--run", path, *ARGS, *extra,
                      "--generations", generations])
    assert result.returncode == 0, result.stderr


# The SIGTERM case also runs lowrank mode with a sampled prompt batch (1 of the task's 2
# training prompts per generation) and weight decay toward the initial weights: a stop,
# a resume on another rank count, and all three must still give the same weights.
# (seed 1 samples both prompts within the first 2 generations)
LOWRANK_SAMPLED_DECAY = ["--mode", "lowrank", "--member-batch", "2", "--batch-size", "1",
                         "--weight-decay", "0.5", "--decay-to", "init", "--seed", "1"]


@pytest.mark.parametrize("sig,extra", [(signal.SIGUSR1, []),
                                       (signal.SIGTERM, LOWRANK_SAMPLED_DECAY)])
def test_signal_to_mpiexec_stops_cleanly_and_resumes_exactly(tiny_model, tmp_path, sig, extra):
    need_mpiexec()
    run = tmp_path / "run.h5"
    proc = subprocess.Popen([MPIEXEC, "-n", "2", ES_MPI, "train", "--model", str(tiny_model),
                             "--run", str(run), *ARGS, *extra, "--generations", "500"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env())
    deadline = time.time() + 120
    while complete(run) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    sent = time.time()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert time.time() - sent < 30, "stopping took too long"
    assert proc.returncode == EXIT_STOPPED, err
    assert f"stopped by {sig.name}" in out and "Continue with: es-mpi resume" in out
    done = committed(run)
    assert 2 <= done < 500
    assert checkpoints(run) == [done]

    target = done + 1
    resumed = run_cli(["resume", run, "--generations", target])
    assert resumed.returncode == 0, resumed.stderr
    reference(tiny_model, tmp_path / "ref.h5", target, extra)
    assert_same_trajectory(run, tmp_path / "ref.h5")
    if extra:  # the batch was sampled: not every generation scored the same prompt
        assert len(set(rows(run)["prompt_ids"][:, 0].tolist())) == 2


SIGNAL_ON_RANK1 = textwrap.dedent("""
    import os, signal, sys
    from mpi4py import MPI
    from es_mpi.es import Replica
    from es_mpi.cli import cli

    WHEN = int(sys.argv.pop(1))   # on rank 1's WHEN-th call of {method}
    method = Replica.{method}
    calls = []

    def patched(self, *args, **kw):
        result = method(self, *args, **kw)
        calls.append(1)
        if MPI.COMM_WORLD.rank == 1 and len(calls) == WHEN:
            os.kill(os.getpid(), signal.SIGUSR1)
        return result

    Replica.{method} = patched
    cli(sys.argv[1:])
""")


@pytest.mark.parametrize("method,when,expect_done", [
    # rank 1 signalled while evaluating its first member of generation 2 (0-based):
    # it skips its second member, the generation is abandoned on every rank
    ("perturb", 5, 2),
    # rank 1 signalled during the update of generation 1: that generation completes
    ("update", 2, 2),
])
def test_signal_on_one_rank_stops_every_rank(tiny_model, tmp_path, method, when, expect_done):
    script = tmp_path / "signal_rank1.py"
    script.write_text(SIGNAL_ON_RANK1.replace("{method}", method))
    run = tmp_path / "run.h5"
    result = run_python_mpi(script, [when, "train", "--model", tiny_model, "--run", run, *ARGS,
                                     "--generations", "6"], np=2, timeout=120)
    assert result.returncode == EXIT_STOPPED, result.stderr
    assert f"stopped by SIGUSR1 after {expect_done} complete generations" in result.stdout
    assert committed(run) == expect_done
    assert len(rows(run)["rewards"]) == expect_done
    assert checkpoints(run) == [expect_done]

    again = run_cli(["train", "--model", tiny_model, "--run", run, *ARGS, "--generations", "4"],
                    np=2)
    assert again.returncode == 0, again.stderr
    reference(tiny_model, tmp_path / "ref.h5", 4)
    assert_same_trajectory(run, tmp_path / "ref.h5")
