"""Faults injected for real: killed ranks, signals, a full disk, damaged run files.

Each test injects one fault into real processes (`mpiexec -n 2` on a tiny model) or into a
real run file and checks the outcome docs/failures.md promises:
the job ends within a bounded time (no rank left waiting), one clear error line or a clean
stop, the run file valid up to its last complete generation, and a resume that ends
bit-identical to a run that never failed (`reference`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import (
    ES_MPI,
    MPIEXEC,
    cli_env,
    need_mpiexec,
    run_cli,
    train_with_rank1_reward,
)

sys.path.insert(0, str(Path(__file__).parent.parent / "tools"))
from soak import rank_pids

from es_mpi import runfile
from es_mpi.cli import cli
from es_mpi.stop import EXIT_STOPPED

pytestmark = pytest.mark.mpi

# one trajectory for every test here: a checkpoint every 4 generations
ARGS = ["--population", "4", "--sigma", "0.05", "--lr", "0.05", "--max-new-tokens", "6",
        "--seed", "11", "--checkpoint-every", "4"]
REFERENCE_GENERATIONS = 32
END_WITHIN = 60  # seconds a job may take to end after a fault (observed: 1-2 s)


# -- helpers -----------------------------------------------------------------------------

def invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_one_error_line(stderr: str, match: str) -> str:
    """Exactly one `es-mpi: error:` line, containing `match`, and no traceback."""
    errors = [ln for ln in stderr.splitlines() if ln.startswith("es-mpi: error: ")]
    assert len(errors) == 1, stderr
    assert match in errors[0], errors[0]
    assert "Traceback" not in stderr, stderr
    return errors[0]


def committed(path) -> int:
    """complete_generations of a finished run's file; the file must exist and open (for
    final assertions: a missing file is an error here, never 0)."""
    with h5py.File(path, "r") as f:
        return int(f.attrs["complete_generations"])


def complete(path) -> int:
    """complete_generations of a run file, read while a run may be writing it (0 if
    unreadable): for polling only; final assertions use committed()."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return int(f.attrs["complete_generations"])
    except (OSError, KeyError):
        return 0


def rows(path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        n = int(f.attrs["complete_generations"])
        return {k: v[:n] for k, v in f["generations"].items()}


def delta(path, generation) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        g = f[f"checkpoints/{generation:08d}"]
        return {k: g[k][...] for k in g if isinstance(g[k], h5py.Dataset)}


def assert_prefix_of_reference(path, reference) -> int:
    """The complete generations of `path` are the reference's first ones, bit for bit."""
    a, b = rows(path), rows(reference)
    done = len(a["seeds"])
    assert done < len(b["seeds"]), "the run went past the reference; make the reference longer"
    for key in ("seeds", "signs", "rewards", "tokens", "prompt_ids", "checksum"):
        np.testing.assert_array_equal(a[key], b[key][:done], err_msg=key)
    return done


def assert_matches_reference(path, reference, generations: int) -> None:
    """`path` holds `generations` complete generations whose rows and final weights (the
    checkpoint delta, bit for bit) equal those of the uninterrupted reference run."""
    assert committed(path) == generations
    assert_prefix_of_reference(path, reference)
    a, b = delta(path, generations), delta(reference, generations)
    assert a.keys() == b.keys() and a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def next_checkpoint(done: int) -> int:
    """A resume target past `done` at which the reference has a checkpoint."""
    target = (done // 4 + 1) * 4
    assert target <= REFERENCE_GENERATIONS, f"{done} generations: too far for the reference"
    return target


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Job:
    """`mpiexec -n 2 es-mpi ARGS` in the background, output to files, killed if left over."""

    def __init__(self, tmp_path: Path, args: list, np: int = 2):
        need_mpiexec()
        self.out, self.err = tmp_path / "job.out", tmp_path / "job.err"
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen([MPIEXEC, "-n", str(np), ES_MPI, *map(str, args)],
                                         stdout=out, stderr=err, env=cli_env(),
                                         start_new_session=True)

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def wait_for(self, run: Path, generations: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while complete(run) < generations:
            assert self.proc.poll() is None, self.err.read_text()
            assert time.monotonic() < deadline, "the run does not progress"
            time.sleep(0.05)

    def rank_pids(self, n: int = 2) -> dict[int, int]:
        """{rank: pid} of the ranks under mpiexec (tools/soak.py finds them)."""
        return rank_pids(self.proc.pid, n)

    def ended_within(self, seconds: float) -> tuple[int, float, str, str]:
        """Wait for the job: (exit status, seconds it took, stdout, stderr)."""
        t0 = time.monotonic()
        try:
            rc = self.proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job did not end within {seconds} s (a rank hangs)")
        return rc, time.monotonic() - t0, self.out.read_text(), self.err.read_text()


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> Path:
    """The uninterrupted run (one rank), with a checkpoint every 4 generations kept."""
    path = tmp_path_factory.mktemp("faults") / "reference.h5"
    result = run_cli(["train", "--model", tiny_model, "--run", path, *ARGS,
                      "--generations", REFERENCE_GENERATIONS, "--keep-checkpoints", "100"])
    assert result.returncode == 0, result.stderr
    return path


# -- 1. a killed rank --------------------------------------------------------------------

LOWRANK = ["--mode", "lowrank", "--member-batch", "2"]


@pytest.mark.parametrize("victim,mode", [(1, "full"), (0, "lowrank")])
def test_sigkill_of_a_rank_ends_the_job_and_resume_is_exact(reference, tiny_model, tmp_path,
                                                            victim, mode):
    """SIGKILL one rank at an arbitrary point of a 2-rank run (a dead node): the launcher
    ends the job within seconds, the run file holds every generation committed before the
    kill (and refuses a second writer while the job runs), and a resume ends identical to
    the uninterrupted run (lowrank: one made here, as long as the resume)."""
    run = tmp_path / "run.h5"
    extra = LOWRANK if mode == "lowrank" else []
    train = ["train", "--model", tiny_model, "--run", run, *ARGS, *extra, "--generations", 500]
    with Job(tmp_path, train) as job:
        job.wait_for(run, 6)
        if victim == 1:  # one writer at a time: a second run on the file is refused
            assert_one_error_line(invoke(train).stderr, "is open in another process")
            assert_one_error_line(invoke(["resume", run]).stderr, "is open in another process")
        pids = job.rank_pids()
        os.kill(pids[victim], signal.SIGKILL)
        rc, _, _, _ = job.ended_within(END_WITHIN)
    assert rc != 0
    deadline = time.monotonic() + 5
    while alive(pids[1 - victim]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pids[1 - victim]), "the surviving rank is still running"
    done = committed(run)
    target = next_checkpoint(done)
    if mode == "lowrank":
        reference = tmp_path / "lowrank_reference.h5"
        made = run_cli(["train", "--model", tiny_model, "--run", reference, *ARGS, *extra,
                        "--generations", target + 1, "--keep-checkpoints", "100"])
        assert made.returncode == 0, made.stderr
    assert assert_prefix_of_reference(run, reference) == done >= 6
    info = runfile.read_info(run)
    assert info.complete_generations == done and info.checkpoints[-1] <= done

    resumed = run_cli(["resume", run, "--generations", target])  # on one rank
    assert resumed.returncode == 0, resumed.stderr
    assert_matches_reference(run, reference, target)


KILL_RANK0_AT = textwrap.dedent("""
    import os, signal, sys
    import h5py
    from es_mpi.runfile import RunWriter
    from es_mpi.cli import cli

    WHERE, AT = sys.argv.pop(1), int(sys.argv.pop(1))

    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    if WHERE == "checkpoint":   # 3 tensors of checkpoint AT written, generation AT-1 uncommitted
        write, create = RunWriter.write_checkpoint, h5py.Group.create_dataset
        state = {"in": False, "n": 0}

        def write_checkpoint(self, generation, *args, **kw):
            state["in"] = generation == AT
            write(self, generation, *args, **kw)

        def create_dataset(self, *args, **kw):
            state["n"] += state["in"]
            if state["n"] == 4:
                die()
            return create(self, *args, **kw)

        RunWriter.write_checkpoint = write_checkpoint
        h5py.Group.create_dataset = create_dataset
    else:                       # generation AT and its checkpoint flushed, not committed
        commit = RunWriter.commit

        def commit_or_die(self, generation):
            if generation == AT:
                self.f.flush()
                die()
            commit(self, generation)

        RunWriter.commit = commit_or_die
    cli(sys.argv[1:])
""")


@pytest.mark.parametrize("where,at,done", [("checkpoint", 8, 7), ("commit", 7, 7)])
def test_rank0_killed_while_writing_leaves_the_last_commit(reference, tiny_model, tmp_path,
                                                           where, at, done):
    """SIGKILL rank 0 in the middle of writing a checkpoint, or after a generation's rows and
    checkpoint are flushed but before the commit: the file opens at the last committed
    generation, the half-written rows and checkpoint are ignored, then dropped by resume."""
    script = tmp_path / "kill_rank0.py"
    script.write_text(KILL_RANK0_AT)
    run = tmp_path / "run.h5"
    # one rank: the file is the point here (other ranks ending: the test above)
    result = subprocess.run([sys.executable, str(script), where, str(at), "train", "--model",
                             str(tiny_model), "--run", str(run), *ARGS, "--generations", "20"],
                            capture_output=True, text=True, timeout=120, env=cli_env())
    assert result.returncode == -signal.SIGKILL, result.stderr
    with h5py.File(run, "r") as f:  # the leftovers are there, beyond the commit
        assert int(f.attrs["complete_generations"]) == done
        assert f["generations/seeds"].shape[0] in (done, done + 1)
    info = runfile.read_info(run)
    assert info.complete_generations == done and info.checkpoints == [4]
    assert_prefix_of_reference(run, reference)

    resumed = run_cli(["resume", run, "--generations", 12])
    assert resumed.returncode == 0, resumed.stderr
    assert_matches_reference(run, reference, 12)


# -- 2. signals -------------------------------------------------------------------------

@pytest.mark.parametrize("target,sig", [("mpiexec", signal.SIGINT), ("rank 0", signal.SIGTERM)])
def test_signal_stops_cleanly_within_bounded_time(reference, tiny_model, tmp_path, target, sig):
    """Ctrl-C to mpiexec, SIGTERM to rank 0 alone: every rank stops at the next safe point,
    rank 0 checkpoints the last complete generation (the weights of the uninterrupted run
    there), exit 75 within seconds. (SIGUSR1/SIGTERM to mpiexec, a signal to rank 1 alone,
    and exact resumes after them: tests/test_stop.py.)"""
    run = tmp_path / "run.h5"
    with Job(tmp_path, ["train", "--model", tiny_model, "--run", run, *ARGS,
                        "--generations", 500]) as job:
        job.wait_for(run, 3)
        pid = job.proc.pid if target == "mpiexec" else job.rank_pids()[int(target[-1])]
        os.kill(pid, sig)
        rc, seconds, out, err = job.ended_within(END_WITHIN)
    assert rc == EXIT_STOPPED, err
    assert seconds < 30
    assert f"stopped by {sig.name}" in out and "Continue with: es-mpi resume" in out
    done = assert_prefix_of_reference(run, reference)
    assert done in runfile.read_info(run).checkpoints
    assert runfile.checkpoint_checksum(run, done) == rows(reference)["checksum"][done - 1]


# -- 3. a full disk ---------------------------------------------------------------------

def _mount_tmpfs(mnt: Path) -> str | None:
    """Mount an 8 MiB tmpfs on `mnt`; None, or why it cannot be done (root only, as in CI)."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                             capture_output=True, text=True)
    return None if mounted.returncode == 0 else f"cannot mount a tmpfs: {mounted.stderr}"


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs; skipped where it cannot be mounted (then RLIMIT_FSIZE stands in)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    why = _mount_tmpfs(mnt)
    if why:
        pytest.skip(why.strip())
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _limit_file_size():
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (3 << 20, resource.RLIM_INFINITY))


@pytest.mark.parametrize("limit", ["tmpfs", "RLIMIT_FSIZE"])
def test_full_disk_stops_with_one_error_line_and_resumes(reference, tiny_model, tmp_path,
                                                         request, limit):
    """The disk fills up (a small tmpfs; or the file-size limit of the job): rank 0 checks
    the room before each write, so the job ends with one error line and exit 2 before HDF5
    ever meets ENOSPC (which crashes it); the file holds every committed generation, and a
    resume after freeing space ends identical to the uninterrupted run."""
    need_mpiexec()
    if limit == "tmpfs":
        where = request.getfixturevalue("small_disk")
        ballast = where / "ballast"
        ballast.write_bytes(b"\0" * (3 << 20))
    else:
        probe = tmp_path / "probe"
        probe.mkdir()
        if not _mount_tmpfs(probe):  # the tmpfs variant runs here: the same path, once
            subprocess.run(["umount", "-l", str(probe)], check=False)
            pytest.skip("the tmpfs variant covers it (RLIMIT_FSIZE: test_space_left_*)")
        where = tmp_path
    run = where / "run.h5"
    # a checkpoint every generation, all kept: the file grows ~170 KB per generation
    cmd = [MPIEXEC, "-n", "2", ES_MPI, "train", "--model", str(tiny_model), "--run", str(run),
           *ARGS, "--generations", str(REFERENCE_GENERATIONS), "--checkpoint-every", "1",
           "--keep-checkpoints", "100"]
    env = cli_env()
    if limit == "RLIMIT_FSIZE":  # MPICH's shared-memory transport would hit the limit too
        env["UCX_TLS"] = "self,tcp"
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120,
                            preexec_fn=_limit_file_size if limit == "RLIMIT_FSIZE" else None)
    # (sized for tests/tiny_model.py's default model: ~170 KB per checkpoint)
    assert result.returncode == 2, result.stdout + result.stderr
    assert_one_error_line(result.stderr, "no room to write")
    done = assert_prefix_of_reference(run, reference)
    assert 1 <= done < REFERENCE_GENERATIONS - 4
    assert runfile.read_info(run).checkpoints[-1] == done

    if limit == "RLIMIT_FSIZE":
        return  # resuming after freeing space: the same as below
    ballast.unlink()  # free space, then continue
    target = next_checkpoint(done)
    resumed = run_cli(["resume", run, "--generations", target])
    assert resumed.returncode == 0, resumed.stderr
    assert_matches_reference(run, reference, target)


def test_space_left_counts_the_file_size_limit(tmp_path):
    """RLIMIT_FSIZE (`ulimit -f`) counts like a full disk in the writer's room check."""
    import resource

    from es_mpi.config import Config

    path = tmp_path / "run.h5"
    writer = runfile.RunWriter.create(path, Config(model="m"), "m", "ab", "cd", n_prompts=2)
    try:
        size = path.stat().st_size
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + (2 << 20), hard))
        try:  # nothing is written while the limit is set
            left = runfile._space_left(path)
            with pytest.raises(runfile.RunFileFull, match="no room to write checkpoint 3"):
                writer.check_space(1 << 20, "checkpoint 3")
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        assert left == 2 << 20
        writer.check_space(1 << 20, "checkpoint 3")  # fine without the limit
    finally:
        writer.close()


# -- 4. damaged run files ---------------------------------------------------------------

COMMANDS = [["inspect", "{run}"], ["resume", "{run}", "--generations", "40"],
            ["export", "{run}", "{tmp}/out"], ["eval", "{run}", "--limit", "1"]]


def _each_command(run, tmp_path):
    for args in COMMANDS:
        yield [a.format(run=run, tmp=tmp_path) for a in args]


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.3, 0.97, "one byte short"])
def test_truncated_run_file_gives_one_error_line_everywhere(reference, tmp_path, fraction):
    """A run file cut short (interrupted copy, full disk): inspect, resume, export and eval
    each give one error line and exit 2; nothing is written."""
    run = tmp_path / "cut.h5"
    shutil.copy(reference, run)
    size = run.stat().st_size
    os.truncate(run, size - 1 if fraction == "one byte short" else int(size * fraction))
    before = digest(run)
    for args in _each_command(run, tmp_path):
        result = invoke(args)
        assert result.exit_code == 2, (args, result.output)
        line = assert_one_error_line(result.stderr, str(run))
        assert "truncated" in line or "cannot be opened as HDF5" in line, line
    assert digest(run) == before and not (tmp_path / "out").exists()


def _corrupt_checkpoint_values(path, generation):
    with h5py.File(path, "r+") as f:
        group = f[f"checkpoints/{generation:08d}"]
        ds = next(d for d in group.values() if isinstance(d, h5py.Dataset))
        ds[0] = ds[0] + 1e-3


def _corrupt_logged_reward(path, generation):
    with h5py.File(path, "r+") as f:
        f.attrs["complete_generations"] = generation + 1  # replay from checkpoint 28
        f["generations/rewards"][generation, 0] += 1.0


def _overwrite_checkpoint_bytes(path, generation):
    """Garbage over one compressed chunk on disk (a bad block): the data no longer decodes."""
    with h5py.File(path, "r") as f:
        ds = max((d for d in f[f"checkpoints/{generation:08d}"].values()
                  if isinstance(d, h5py.Dataset)), key=lambda d: d.size)
        info = ds.id.get_chunk_info(0)
        offset, size = info.byte_offset, info.size
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(bytes(range(256)) * (size // 256) + b"\xff" * (size % 256))


@pytest.mark.parametrize("damage,match", [
    (_corrupt_checkpoint_values, "checkpoint 32 does not reproduce its recorded checksum"),
    (_corrupt_logged_reward, "does not reproduce the recorded weights checksum of generation 29"),
    (_overwrite_checkpoint_bytes, "cannot read checkpoint 32"),
])
def test_checksum_mismatch_is_refused_never_trusted(reference, tmp_path, damage, match):
    """A checkpoint or a logged reward that no longer matches the logged weight checksum
    (bit rot, a bad block, an edit): resume, export and eval refuse with one line naming
    the damage; nothing is written and no weights come out."""
    run = tmp_path / "damaged.h5"
    shutil.copy(reference, run)
    damage(run, 32 if damage is not _corrupt_logged_reward else 29)
    before = digest(run)
    for args in _each_command(run, tmp_path):
        result = invoke(args)
        if args[0] == "inspect":  # inspect reads the header and rows only
            assert result.exit_code == 0, result.output
            continue
        assert result.exit_code == 2, (args, result.output)
        assert_one_error_line(result.stderr, match)
    assert digest(run) == before and not (tmp_path / "out").exists()


def test_newer_format_version_is_refused_naming_both_versions(reference, tmp_path):
    run = tmp_path / "newer.h5"
    shutil.copy(reference, run)
    with h5py.File(run, "r+") as f:
        f.attrs["format_version"] = runfile.FORMAT_VERSION + 1
    before = digest(run)
    for args in _each_command(run, tmp_path):
        result = invoke(args)
        assert result.exit_code == 2, (args, result.output)
        assert_one_error_line(result.stderr, f"has format version {runfile.FORMAT_VERSION + 1}, "
                              f"newer than this es-mpi (")
        assert f"format {runfile.FORMAT_VERSION}); upgrade es-mpi" in result.stderr
    assert digest(run) == before


# -- 5. hostile task code ---------------------------------------------------------------

def test_reward_calling_exit_on_one_rank_stops_every_rank(tiny_model, tmp_path):
    """sys.exit() inside reward code on rank 1 only: reported like any failing reward (both
    ranks exit 2 with its message), never a job that waits forever for rank 1."""
    result, run = train_with_rank1_reward(tiny_model, tmp_path, "sys.exit(0)",
                                          timeout=END_WITHIN)
    assert result.returncode == 2, result.stderr
    assert_one_error_line(result.stderr, "reward raised SystemExit: 0 (member 1, rank 1)")
    assert committed(run) == 0


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.jsonl").write_text(
        "".join(f'{{"prompt": "Say {i}.", "answer": "{i}"}}\n' for i in range(5)))
    return tmp_path


def _reward_module(workdir, name, body):
    (workdir / f"{name}.py").write_text(textwrap.dedent(body))
    return f"{name}:score"


HOSTILE = ["--task", "jsonl:prompts.jsonl", "--population", "4", "--max-new-tokens", "4",
           "--sigma", "0.05", "--lr", "0.05"]


def test_reward_that_swallows_the_timeout_still_times_out(workdir, tiny_model):
    reward = _reward_module(workdir, "swallow", """
        import time

        def score(completion, example):
            while True:
                try:
                    time.sleep(0.05)
                except Exception:
                    pass
    """)
    t0 = time.monotonic()
    result = invoke(["train", "--model", tiny_model, "--run", "r.h5", *HOSTILE,
                     "--reward", reward, "--reward-timeout", "0.3"])
    assert result.exit_code == 2
    assert_one_error_line(result.stderr, "reward took longer than --reward-timeout 0.3 s")
    assert time.monotonic() - t0 < 30
    assert committed(workdir / "r.h5") == 0


@pytest.mark.parametrize("value", ["1.7e308", "-1e151",
                                   "__import__('fractions').Fraction(10**400)"])
def test_rewards_beyond_the_float_range_are_refused(workdir, tiny_model, value):
    """Finite but huge rewards would overflow the population mean (inf) and the z-scores
    (NaN weights): beyond +-1e150 a reward is refused like NaN, before any update."""
    reward = _reward_module(workdir, f"huge{len(value)}", f"""
        def score(completion, example):
            return {value}
    """)
    result = invoke(["train", "--model", tiny_model, "--run", "r.h5", *HOSTILE,
                     "--reward", reward])
    assert result.exit_code == 2
    assert_one_error_line(result.stderr, "rewards must be finite numbers within +-1e+150")
    assert committed(workdir / "r.h5") == 0


def test_zscore_stays_finite_for_extreme_rewards():
    from es_mpi.shaping import zscore

    expected = zscore(np.array([1.0, 1.0, 0.0, 0.0]))
    for scale in (1.7e308, 1e200, 1e-200, 5e-324):
        z = zscore(np.array([1.0, 1.0, 0.0, 0.0]) * scale)
        assert np.isfinite(z).all()
        np.testing.assert_allclose(z, expected)


def test_completions_longer_than_the_model_context_are_refused(tiny_model, tmp_path):
    """max_new_tokens past the model's positions (512 for the tiny model): refused from
    config.json before any weights load. (Huge completions reaching the built-in scorers:
    tests/test_countdown.py, tests/test_arithmetic.py.)"""
    result = invoke(["train", "--model", tiny_model, "--run", tmp_path / "r.h5",
                     "--max-new-tokens", "512"])
    assert result.exit_code == 2
    assert_one_error_line(result.stderr, "max_new_tokens 512 does not fit the context of model")
    assert not (tmp_path / "r.h5").exists()


def test_batched_rewards_returning_the_wrong_count_are_refused():
    from es_mpi.rewards import score
    from tasks import Task

    class Short(Task):
        name = "short"

        def rewards(self, completions, examples):
            return [0.0]

    rewards, error = score(Short(), ["a", "b"], [{}, {}], 0, "member 3, rank 0")
    assert rewards is None
    assert error == "task short: rewards() returned 1 values for 2 completions (member 3, rank 0)"


# -- 6. soak ----------------------------------------------------------------------------

def test_short_soak_ends_identical_to_an_uninterrupted_run(tiny_model, tmp_path):
    """tools/soak.py in short: 20 generations in legs of about 4 on 2, 1, 2, ... ranks,
    ended by SIGKILL of a rank, by SIGUSR1 and by the generation target, each resumed; the
    final weights are bit-identical to one uninterrupted run. (A leg can overshoot its
    target by a generation or two on a loaded machine, so the legs are counted, not
    listed.)"""
    import re

    soak = Path(__file__).parent.parent / "tools" / "soak.py"
    result = subprocess.run([sys.executable, str(soak), "--generations", "20", "--every", "4",
                             "--jitter", "0.05",
                             "--model", str(tiny_model), "--workdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=300, env=cli_env())
    assert result.returncode == 0, result.stdout + result.stderr
    ends = re.search(r"(\d+) by target, (\d+) by SIGUSR1, (\d+) by SIGKILL of a rank",
                     result.stdout)
    assert ends and all(int(n) >= 1 for n in ends.groups()), result.stdout
    assert "identical to the uninterrupted run: yes" in result.stdout
