"""Held-out evaluation: `es-mpi eval` on model dirs and run files, and --eval-every."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from conftest import run_cli

pytestmark = pytest.mark.mpi

TRAIN = ["--population", "4", "--sigma", "0.05", "--lr", "0.05", "--max-new-tokens", "6",
         "--generations", "4", "--eval-every", "2", "--eval-batch-size", "2"]


def eval_json(target, np=None, extra=()):
    result = run_cli(["eval", target, "--max-new-tokens", "6", "--batch-size", "2", "--json",
                      *extra], np=np)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def run_with_evals(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "run.h5"
    result = run_cli(["train", "--model", tiny_model, "--run", path, *TRAIN], np=2)
    assert result.returncode == 0, result.stderr
    return path, result.stdout


def test_eval_of_a_model_dir_is_the_same_on_one_and_two_ranks(tiny_model):
    one = eval_json(tiny_model)
    two = eval_json(tiny_model, np=2)
    assert one["n_examples"] == 6 and one["task"] == "conciseness"
    assert one["accuracy"] is None  # conciseness has no notion of solved
    assert one["rewards"] == two["rewards"]
    assert one["mean_reward"] == pytest.approx(np.mean(one["rewards"]))
    limited = eval_json(tiny_model, extra=["--limit", "2"])
    assert limited["rewards"] == one["rewards"][:2]


def test_eval_every_records_held_out_scores(run_with_evals):
    path, stdout = run_with_evals
    assert "gen 0: held-out mean reward" in stdout
    assert stdout.count("| held-out mean reward") == 2
    with h5py.File(path, "r") as f:
        assert f["eval/generation"][:].tolist() == [0, 2, 4]
        assert (f["eval/n_examples"][:] == 6).all()
        assert np.isnan(f["eval/accuracy"][:]).all()
        recorded = f["eval/mean_reward"][:]
    assert eval_json(f"{path}@4")["mean_reward"] == pytest.approx(recorded[2], abs=0)
    info = json.loads(run_cli(["inspect", path, "--json"]).stdout)
    assert [e["generation"] for e in info["evals"]] == [0, 2, 4]
    assert info["evals"][2]["mean_reward"] == recorded[2]
    assert eval_json(f"{path}@2", np=2)["mean_reward"] == pytest.approx(recorded[1], abs=0)


def test_eval_of_generation_zero_is_the_base_model(run_with_evals, tiny_model):
    path, _ = run_with_evals
    assert eval_json(f"{path}@0")["rewards"] == eval_json(tiny_model)["rewards"]


def test_eval_bad_targets(run_with_evals, tmp_path):
    path, _ = run_with_evals
    bad = run_cli(["eval", f"{path}@9"])
    assert bad.returncode == 2 and "generation must be an integer in 0..4" in bad.stderr
    missing = run_cli(["eval", tmp_path / "nothing"])
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_countdown_end_to_end_on_two_ranks(tiny_model, tmp_path):
    path = tmp_path / "countdown.h5"
    result = run_cli(["train", "--model", tiny_model, "--run", path, "--task", "countdown",
                      "--population", "4", "--batch-size", "4", "--max-new-tokens", "8",
                      "--generations", "2", "--eval-every", "2", "--eval-limit", "4"], np=2)
    assert result.returncode == 0, result.stderr
    assert "held-out mean reward" in result.stdout and "accuracy 0.000" in result.stdout
    with h5py.File(path, "r") as f:
        assert f.attrs["task"] == "countdown"
        assert f["generations/prompt_ids"].shape == (2, 4)
        assert f["generations/prompt_ids"][0].tolist() != f["generations/prompt_ids"][1].tolist()
        assert f["eval/accuracy"][:].tolist() == [0.0, 0.0]
        assert f["eval/n_examples"][:].tolist() == [4, 4]
