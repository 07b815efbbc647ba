"""Shared fixtures: a tiny real transformers model and helpers to run the real CLI."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_model import make_tiny_model

BIN = Path(sys.executable).parent
ES_MPI = shutil.which("es-mpi", path=str(BIN)) or shutil.which("es-mpi")
MPIEXEC = shutil.which("mpiexec", path=str(BIN)) or shutil.which("mpiexec")


def need(missing: str | None, install: str) -> None:
    """A test needs a component: `missing` names what is absent (None: all there). In CI
    (CI=true) its absence fails the test; on a developer's machine the test is skipped,
    with the reason printed (-rs)."""
    if missing is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{missing} not found, and CI=true: the tests that need it must run "
                    f"({install})")
    pytest.skip(f"{missing} not found ({install})")


def need_mpiexec() -> None:
    """Tests that launch ranks need mpiexec."""
    need(None if MPIEXEC else "mpiexec",
         "install es-mpi[mpich], or an MPI with mpiexec on PATH")


def need_modules(*names: str, extra: str) -> None:
    """Tests of an optional extra need its Python packages."""
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    need(" and ".join(missing) or None, f"pip install 'es-mpi[{extra}]'")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def run_cli(args: list[str], np: int | None = None, timeout: float = 300,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `es-mpi ARGS` alone (np=None) or under `mpiexec -n np`, capturing output."""
    assert ES_MPI, "es-mpi is not installed in this environment"
    cmd = [ES_MPI, *map(str, args)]
    if np is not None:
        need_mpiexec()
        cmd = [MPIEXEC, "-n", str(np), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=cli_env(),
                          cwd=cwd)


def cli_in_process(args: list) -> None:
    """`es-mpi ARGS` as one rank in this process (no launcher: a world of one)."""
    from es_mpi.cli import cli

    cli.main([str(a) for a in args], standalone_mode=False)


def one_error_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    """A finished `es-mpi` process exited 2 with exactly one stderr line, the error line,
    holding every needle."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("es-mpi: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def run_python_mpi(script: Path, args: list[str], np: int,
                   timeout: float = 300) -> subprocess.CompletedProcess:
    need_mpiexec()
    cmd = [MPIEXEC, "-n", str(np), sys.executable, str(script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=cli_env())


def train_with_rank1_reward(model, tmp_path: Path, statement: str,
                            timeout: float) -> tuple[subprocess.CompletedProcess, Path]:
    """`es-mpi train` on 2 ranks whose conciseness reward runs `statement` on rank 1 (and
    scores 0.0 on rank 0): (the finished job, its run file)."""
    script = tmp_path / "rank1_reward.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from mpi4py import MPI
        from tasks.conciseness import Conciseness
        from es_mpi.cli import cli

        def reward(self, completion, example):
            if MPI.COMM_WORLD.rank == 1:
                {statement}
            return 0.0

        Conciseness.reward = reward
        cli(sys.argv[1:])
    """))
    run = tmp_path / "r.h5"
    result = run_python_mpi(script, ["train", "--model", model, "--run", run,
                                     "--population", "4", "--max-new-tokens", "3"],
                            np=2, timeout=timeout)
    return result, run
