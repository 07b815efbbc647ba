"""What a new user copies and shares: the commands printed at the end of a run run as
printed from the same shell, and an exported model is readable by the group like every
other file."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

from conftest import cli_env

VENV_BIN = Path(sys.executable).parent
TINY = ["--population", "2", "--max-new-tokens", "2", "--generations", "1", "-q"]


def test_the_printed_next_steps_run_as_printed(tiny_model, tmp_path):
    """es-mpi started by its path (a venv that is not activated, as after `make demo`):
    the printed commands name that path, and the printed inspect command runs from the
    same shell, where `es-mpi` alone is not found."""
    env = cli_env()
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep)
                                  if Path(p).resolve() != VENV_BIN.resolve()) or "/usr/bin"
    run = tmp_path / "r.h5"
    es_mpi = VENV_BIN / "es-mpi"
    done = subprocess.run([str(es_mpi), "train", "--model", str(tiny_model), "--run",
                           str(run), *TINY], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    line = next(ln for ln in done.stdout.splitlines() if ln.strip().startswith("inspect:"))
    command = shlex.split(line.split(":", 1)[1])
    assert command[0] == str(es_mpi), line
    again = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path,
                           timeout=300, check=False)
    assert again.returncode == 0 and "run file" in again.stdout, again.stderr
    assert "last 1 generation(s)" in again.stdout  # the rows that follow say what they are
    bare = subprocess.run(["bash", "-c", "command -v es-mpi"], env=env, capture_output=True,
                          text=True, check=False)
    assert bare.returncode != 0, "es-mpi is on PATH: the test is blind"


def test_exported_files_have_the_mode_of_any_new_file(tiny_model, tmp_path):
    """safetensors writes 0600; colleagues on a shared cluster could not read an export.
    Under umask 022 every exported file is 0644, as a file made by `touch` is."""
    run, out = tmp_path / "r.h5", tmp_path / "out"
    script = (f"umask 022 && {shlex.quote(str(VENV_BIN / 'es-mpi'))} train --model "
              f"{shlex.quote(str(tiny_model))} --run {run} {' '.join(TINY)} && "
              f"{shlex.quote(str(VENV_BIN / 'es-mpi'))} export {run} {out} && "
              f"touch {tmp_path / 'plain'}")
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          env=cli_env(), timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    plain = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()}
    assert "model.safetensors" in modes and plain == 0o644
    assert modes == dict.fromkeys(modes, plain), modes


def _closed_pipe_run(args: list, cwd: Path) -> subprocess.CompletedProcess:
    """es-mpi ARGS with its stdout a pipe whose reader is already gone (`... | head -1`
    once head has exited): every write meets EPIPE."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([str(VENV_BIN / "es-mpi"), *map(str, args)], stdout=write,
                              stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=cwd,
                              timeout=300, check=False)
    finally:
        os.close(write)


def test_output_into_a_closed_pipe_neither_fails_nor_stops_a_run(tiny_model, tmp_path):
    """`es-mpi inspect RUN | head -2` ended in BrokenPipeError and exit 1; a training run
    piped into head must go on to its end."""
    import h5py

    run = tmp_path / "r.h5"
    train = _closed_pipe_run(["train", "--model", tiny_model, "--run", run,
                              "--population", "2", "--max-new-tokens", "2",
                              "--generations", "2"], tmp_path)
    assert train.returncode == 0 and "Error" not in train.stderr, train.stderr
    with h5py.File(run, "r") as f:
        assert int(f.attrs["complete_generations"]) == 2
    inspect = _closed_pipe_run(["inspect", run], tmp_path)
    assert inspect.returncode == 0 and inspect.stderr == "", inspect.stderr


def test_train_help_names_the_tasks_and_that_a_model_is_required():
    """`--task` listed no task names (only the error for a wrong one did), and `--model`
    showed "[default: none]" although a run needs one."""
    from tasks import TASKS

    out = subprocess.run([str(VENV_BIN / "es-mpi"), "train", "--help"], capture_output=True,
                         text=True, env=cli_env(), timeout=120, check=True).stdout
    flat = " ".join(out.split())
    assert all(name in flat for name in TASKS), flat
    model = flat[flat.index("--model DIR"):flat.index("--task")]
    assert "required" in model and "default: none" not in model, model


def test_paths_in_a_config_are_relative_to_the_config(tiny_model, tmp_path):
    """demo.toml's task data was found from the repository root only; a config's
    relative paths now mean files beside it, from whatever directory it is used."""
    import h5py

    root = Path(__file__).resolve().parent.parent
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    conf_dir = tmp_path / "exp"
    conf_dir.mkdir()
    (conf_dir / "qa.jsonl").write_text('{"prompt": "Say hi.", "answer": "hi"}\n'
                                       '{"prompt": "Say no.", "answer": "no"}\n')
    (conf_dir / "run.toml").write_text('task_data = "qa.jsonl"\nrun = "out/run.h5"\n'
                                       'population = 2\nmax_new_tokens = 2\n'
                                       'generations = 1\n')
    (conf_dir / "out").mkdir()
    for config, run in ((conf_dir / "run.toml", conf_dir / "out" / "run.h5"),
                        (root / "es_mpi" / "presets" / "demo.toml", elsewhere / "demo.h5")):
        args = ["train", "--config", config, "--model", tiny_model, "--generations", "1",
                "--max-new-tokens", "2", "-q"]
        if config.name == "demo.toml":
            args += ["--run", run]
        proc = subprocess.run([str(VENV_BIN / "es-mpi"), *map(str, args)], cwd=elsewhere,
                              capture_output=True, text=True, env=cli_env(), timeout=300,
                              check=False)
        assert proc.returncode == 0, proc.stderr
        with h5py.File(run, "r") as f:
            import json

            data = json.loads(f.attrs["config"])["task_data"]
        assert Path(data) == config.parent / Path(data).name, data
