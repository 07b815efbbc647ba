"""Bad input through the real CLI: one error line, exit code 2, nothing written."""

from __future__ import annotations

import hashlib

import h5py
import pytest
from click.testing import CliRunner
from conftest import run_cli

from es_mpi.cli import cli

TINY_ARGS = ["--population", "4", "--max-new-tokens", "4", "--generations", "2",
             "--sigma", "0.05", "--lr", "0.05"]


def invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_one_error_line(result, match):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("es-mpi: error: ")
    assert match in lines[0], lines[0]


@pytest.fixture(scope="module")
def small_run(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "run.h5"
    result = invoke(["train", "--model", tiny_model, "--run", path, *TINY_ARGS])
    assert result.exit_code == 0, result.output
    return path


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("args,match", [
    (["--model", "{tmp}/missing"], "does not exist"),
    (["--model", "{tmp}"], "no config.json"),
    (["--model", "{model}", "--task", "nonsense"], "unknown task 'nonsense'"),
    (["--model", "{model}", "--sigma", "0"], "sigma"),
    (["--model", "{model}", "--lr", "-1"], "lr"),
    (["--model", "{model}", "--population", "1"], "population"),
    (["--model", "{model}", "--population", "5", "--antithetic"], "even population"),
    (["--model", "{model}", "--batch-size", "9"], "training examples"),
    (["--model", "{model}", "--run", "{tmp}/no/such/dir/run.h5"], "does not exist"),
    (["--config", "{tmp}/bad.toml", "--model", "{model}"], "unknown key 'sigam'"),
])
def test_train_rejects_bad_input_before_writing(tiny_model, tmp_path, args, match):
    (tmp_path / "bad.toml").write_text("sigam = 0.1\n")
    run = tmp_path / "run.h5"
    full = ["train", "--run", run] + [a.format(tmp=tmp_path, model=tiny_model) for a in args]
    result = invoke(full)
    assert_one_error_line(result, match)
    assert not run.exists()


def test_train_refuses_run_file_of_another_config(tiny_model, small_run):
    before = digest(small_run)
    result = invoke(["train", "--model", tiny_model, "--run", small_run, *TINY_ARGS,
                     "--sigma", "0.02", "--seed", "7"])
    assert_one_error_line(result, "another config (sigma: 0.05 in the file, 0.02 now; seed")
    assert digest(small_run) == before


def test_train_with_same_config_continues_the_run(tiny_model, small_run, tmp_path):
    copy = tmp_path / "run.h5"
    copy.write_bytes(small_run.read_bytes())
    result = invoke(["train", "--model", tiny_model, "--run", copy, *TINY_ARGS,
                     "--generations", "3"])
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output and "gen 3/3" in result.output
    with h5py.File(copy, "r") as f:
        assert f.attrs["complete_generations"] == 3
    again = invoke(["train", "--model", tiny_model, "--run", copy, *TINY_ARGS,
                    "--generations", "3"])
    assert again.exit_code == 0 and "already has 3 generations" in again.output


def test_resume_and_export_bad_input(tiny_model, small_run, tmp_path):
    assert_one_error_line(invoke(["resume", tmp_path / "none.h5"]), "does not exist")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = 1
    assert_one_error_line(invoke(["resume", other]), "not an es-mpi run file")
    before = digest(small_run)
    assert_one_error_line(invoke(["resume", small_run, "--model", tmp_path]), "no config.json")
    assert_one_error_line(invoke(["resume", small_run, "--generations", "0"]), ">= 1")
    assert_one_error_line(invoke(["export", small_run, tmp_path / "out", "--generation", "9"]),
                          "has generations 0..2")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert_one_error_line(invoke(["export", small_run, tmp_path / "full"]), "not empty")
    assert digest(small_run) == before


def test_resume_with_another_base_model_is_refused(small_run, tmp_path):
    from tiny_model import make_tiny_model

    other = make_tiny_model(tmp_path / "other", seed=1)
    before = digest(small_run)
    result = invoke(["resume", small_run, "--generations", "4", "--model", other])
    assert_one_error_line(result, "is not the base model of run file")
    assert digest(small_run) == before


def test_error_line_from_a_real_process(tmp_path):
    result = run_cli(["train", "--model", tmp_path / "missing", "--run", tmp_path / "r.h5"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"es-mpi: error: model directory {tmp_path / 'missing'} does not exist"]
    assert not (tmp_path / "r.h5").exists()


def test_help_documents_every_flag():
    result = invoke(["train", "--help"])
    for flag in ["--population", "--sigma", "--lr", "--generations", "--seed", "--mode",
                 "--antithetic", "--shaping", "--checkpoint-every", "--max-new-tokens",
                 "--weight-decay", "--config", "--gpus-per-rank"]:
        assert flag in result.output
    for cmd in ["resume", "export", "inspect"]:
        assert invoke([cmd, "--help"]).exit_code == 0


def test_relative_model_path_survives_resume_from_another_directory(tiny_model, tmp_path):
    run = tmp_path / "rel.h5"
    first = run_cli(["train", "--model", tiny_model.name, "--run", run, *TINY_ARGS,
                     "--generations", "1"], cwd=tiny_model.parent)
    assert first.returncode == 0, first.stderr
    again = run_cli(["resume", run, "--generations", "2"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "gen 2/2" in again.stdout
