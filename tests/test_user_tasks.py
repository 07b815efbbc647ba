"""User tasks and hostile reward code, through the real CLI on a tiny real model."""

from __future__ import annotations

import json
import textwrap

import h5py
import pytest
from click.testing import CliRunner

from es_mpi.cli import cli
from es_mpi.errors import EsError
from tasks import get_task

ARGS = ["--population", "4", "--max-new-tokens", "4", "--sigma", "0.05", "--lr", "0.05"]


def invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A directory with prompts.jsonl and importable reward modules (cwd is importable)."""
    monkeypatch.chdir(tmp_path)
    rows = [{"prompt": f"Say the number {i}.", "answer": str(i)} for i in range(5)]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return tmp_path


def module(workdir, name, body):
    (workdir / f"{name}.py").write_text(textwrap.dedent(body))
    return name


def test_jsonl_task_with_a_user_reward_trains(workdir):
    mod = module(workdir, "rew_len", """
        def score(completion, example):
            return -abs(len(completion) - len(example["answer"]))
    """)
    result = invoke(["train", "--model", workdir.parent / "m", "--run", "r.h5"])  # no model
    assert result.exit_code == 2
    from tiny_model import make_tiny_model

    model = make_tiny_model(workdir / "model")
    result = invoke(["train", "--model", model, "--run", "r.h5", "--task", "jsonl:prompts.jsonl",
                     "--reward", f"{mod}:score", "--generations", "2", *ARGS])
    assert result.exit_code == 0, result.output
    with h5py.File(workdir / "r.h5", "r") as f:
        assert f.attrs["complete_generations"] == 2
        assert f["generations/prompt_ids"].shape == (2, 4)  # 5 examples: 4 train + 1 eval


def test_task_class_from_a_module(workdir, tiny_model):
    mod = module(workdir, "my_tasks", """
        from tasks import Task

        class Echo(Task):
            name = "echo"
            solved_reward = 0.0
            def train_examples(self):
                return [{"prompt": "Hi"}, {"prompt": "Yo"}]
            def eval_examples(self):
                return [{"prompt": "Hey"}]
            def reward(self, completion, example):
                return -float(len(completion))
    """)
    task = get_task(f"{mod}:Echo")
    assert task.name == "echo" and len(task.train_examples()) == 2
    result = invoke(["train", "--model", tiny_model, "--run", "r.h5", "--task", f"{mod}:Echo",
                     "--generations", "1", "--eval-every", "1", *ARGS])
    assert result.exit_code == 0, result.output
    assert "held-out mean reward" in result.output and "accuracy" in result.output


@pytest.mark.parametrize("spec,reward,match", [
    ("nosuchmod:Task", None, "cannot import nosuchmod (ModuleNotFoundError"),
    ("json:Task", None, "module json has no attribute 'Task'"),
    ("json:dumps", None, "not a subclass of tasks.Task"),
    ("jsonl:prompts.jsonl", None, "needs --reward module:function"),
    ("jsonl:missing.jsonl", "json:dumps", "task data missing.jsonl does not exist"),
    ("jsonl:prompts.jsonl", "json:nope", "module json has no attribute 'nope'"),
    ("conciseness", "json:dumps", "--reward applies to --task jsonl:PATH only"),
])
def test_user_task_errors_are_named(workdir, spec, reward, match):
    with pytest.raises(EsError, match=match.replace("(", r"\(")):
        get_task(spec, reward=reward)


def test_bad_task_data_names_the_line(workdir):
    (workdir / "bad.jsonl").write_text('{"prompt": "a", "answer": "b"}\n{"prompt": 3}\n')
    with pytest.raises(EsError, match=r"bad\.jsonl: line 2: field 'prompt' must be str, not int"):
        get_task("conciseness", data="bad.jsonl")
    (workdir / "broken.jsonl").write_text('{"prompt": "a", "answer": "b"}\n{"prompt": \n')
    with pytest.raises(EsError, match="line 2 is not valid JSON"):
        get_task("conciseness", data="broken.jsonl")
    (workdir / "empty.jsonl").write_text("\n")
    with pytest.raises(EsError, match="holds no examples"):
        get_task("conciseness", data="empty.jsonl")
    (workdir / "split.jsonl").write_text(
        '{"prompt": "a", "answer": "b", "split": "train"}\n'
        '{"prompt": "c", "answer": "d", "split": "test"}\n')
    with pytest.raises(EsError, match="line 2: split must be 'train' or 'eval'"):
        get_task("conciseness", data="split.jsonl")


@pytest.mark.parametrize("body,extra,match", [
    ("raise ValueError('bad scorer')", [],
     "reward raised ValueError: bad scorer (member 0, rank 0)"),
    ("return float('nan')", [], "reward returned nan (member 0, rank 0)"),
    ("return float('-inf')", [], "reward returned -inf"),
    ("return 'high'", [], "reward returned 'high' (str)"),
    ("return None", [], "reward returned None (NoneType)"),
    ("import time; time.sleep(30)", ["--reward-timeout", "0.5"],
     "reward took longer than --reward-timeout 0.5 s (member 0, rank 0)"),
])
def test_hostile_rewards_stop_the_run_before_any_update(workdir, tiny_model, body, extra, match):
    name = f"hostile_{abs(hash((body, tuple(extra))))}"
    mod = module(workdir, name, f"""
        def score(completion, example):
            {body}
    """)
    result = invoke(["train", "--model", tiny_model, "--run", "r.h5", "--task",
                     "jsonl:prompts.jsonl", "--reward", f"{mod}:score", *ARGS, *extra])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("es-mpi: error: task jsonl:prompts.jsonl: " + match), lines[0]
    with h5py.File(workdir / "r.h5", "r") as f:
        assert f.attrs["complete_generations"] == 0


def test_equal_rewards_make_no_update(workdir, tiny_model):
    """std 0: z-scores are all zero, so the weights stay exactly the base weights."""
    mod = module(workdir, "flat", """
        def score(completion, example):
            return 1.0
    """)
    result = invoke(["train", "--model", tiny_model, "--run", "r.h5", "--task",
                     "jsonl:prompts.jsonl", "--reward", f"{mod}:score", "--generations", "2",
                     *ARGS])
    assert result.exit_code == 0, result.output
    with h5py.File(workdir / "r.h5", "r") as f:
        base = int(f.attrs["model_fingerprint"], 16)
        assert f["generations/checksum"][:].tolist() == [base, base]
        assert (f["generations/reward_std"][:] == 0).all()
