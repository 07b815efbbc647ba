"""Held-out evaluation: `es-mpi eval` on model dirs and run files, and --eval-every."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import run_cli

import tasks
from es_mpi import runfile

pytestmark = pytest.mark.mpi

# the built-in conciseness held-out set: one question per line of its file
HELD_OUT = sum(1 for line in Path(tasks.__file__).with_name("conciseness_heldout.jsonl")
               .read_text().splitlines() if line.strip())
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
    assert one["n_examples"] == HELD_OUT and one["task"] == "conciseness"
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
        assert (f["eval/n_examples"][:] == HELD_OUT).all()
        assert np.isnan(f["eval/accuracy"][:]).all()
        recorded = f["eval/mean_reward"][:]
    assert eval_json(f"{path}@4")["mean_reward"] == pytest.approx(recorded[2], abs=0)
    info = json.loads(run_cli(["inspect", path, "--json"]).stdout)
    assert [e["generation"] for e in info["evals"]] == [0, 2, 4]
    assert info["evals"][2]["mean_reward"] == recorded[2]
    # the recorded completions are what the weights of generation 4 generate, made anew
    assert info["evals"][2]["completions"] == eval_json(f"{path}@4")["completions"]
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
    assert "held-out mean reward" in result.stdout and "accuracy " in result.stdout
    with h5py.File(path, "r") as f:
        assert f.attrs["task"] == "countdown"
        assert f["generations/prompt_ids"].shape == (2, 4)
        assert f["generations/prompt_ids"][0].tolist() != f["generations/prompt_ids"][1].tolist()
        accuracy = f["eval/accuracy"][:].tolist()
        assert f["eval/n_examples"][:].tolist() == [4, 4]
    # the accuracy is the share of held-out completions that solve their example, checked
    # here with a checker of our own: the last <answer> block, only numbers and + - * / ( ),
    # each given number used once, equal to the target
    from tasks import get_task

    examples = get_task("countdown").eval_examples()[:4]
    assert all(_solves(f"<answer>{e['solution']}</answer>", e["numbers"], e["target"])
               for e in examples)  # the checker does see a solution
    completions = runfile.read_eval_completions(path)
    assert len(completions) == 2 and all(len(c) == 4 for c in completions)
    for acc, texts in zip(accuracy, completions, strict=True):
        solved = [_solves(t, e["numbers"], e["target"]) for t, e in zip(texts, examples,
                                                                           strict=True)]
        assert acc == pytest.approx(np.mean(solved))
        assert f"accuracy {acc:.3f}" in result.stdout


def _solves(text: str, numbers: list[int], target: int) -> bool:
    blocks = re.findall(r"<answer>(.*?)</answer>", text, re.S)
    if not blocks or not re.fullmatch(r"[\d+\-*/()\s]+", blocks[-1]):
        return False
    if sorted(int(n) for n in re.findall(r"\d+", blocks[-1])) != sorted(numbers):
        return False
    try:
        return abs(eval(blocks[-1], {"__builtins__": {}}) - target) < 1e-9
    except (SyntaxError, ZeroDivisionError, TypeError):
        return False


EVEN_TASK = '''
from tasks.conciseness import Conciseness

class EvenLength(Conciseness):
    """Solved when the completion has an even number of characters."""
    solved_reward = 1.0

    def reward(self, completion, example):
        return float(len(completion) % 2 == 0)
'''


def test_sampled_eval_is_seeded_the_same_on_one_and_two_ranks(tiny_model, tmp_path):
    (tmp_path / "even_task.py").write_text(EVEN_TASK)

    def sampled(np=None, seed="7"):
        result = run_cli(["eval", tiny_model, "--task", "even_task:EvenLength",
                          "--max-new-tokens", "6", "--batch-size", "4", "--samples", "3",
                          "--temperature", "1.5", "--seed", seed, "--json"], np=np, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    one, two = sampled(), sampled(np=2)
    assert one == {**two, "seconds": one["seconds"],
                   "sampled": {**two["sampled"], "seconds": one["sampled"]["seconds"]}}
    draws = one["sampled"]
    assert draws["samples"] == 3 and len(draws["completions"]) == one["n_examples"] == HELD_OUT
    # rewards rescored here from the completions, pass@3 and the mean from those
    rescored = [[float(len(c) % 2 == 0) for c in row] for row in draws["completions"]]
    assert draws["rewards"] == rescored
    assert draws["pass_at_3"] == pytest.approx(np.mean([max(r) for r in rescored]))
    assert draws["mean_reward"] == pytest.approx(np.mean(rescored))
    assert one["accuracy"] == pytest.approx(np.mean(one["rewards"]))  # greedy: the share
    # they are samples: not all the greedy completion, and another seed draws others
    flat = [c for row in draws["completions"] for c in row]
    greedy = [c for c in one["completions"] for _ in range(3)]
    assert flat != greedy and len(set(flat)) > len(set(one["completions"]))
    assert sampled(seed="8")["sampled"]["completions"] != draws["completions"]
