"""Arithmetic word problems: answer extraction, the reward, the generator and file loading."""

from __future__ import annotations

import json
import re
import time

import pytest

from es_mpi.errors import EsError
from tasks.arithmetic import Arithmetic, extract_answer, generate, score


@pytest.mark.parametrize(("completion", "expected"), [
    ("3 + 4 = 7, so \\boxed{7}.", 7),
    ("\\boxed{12} hmm, no: \\boxed{15}", 15),
    ("The answer is \\boxed{15} apples, from 3 bags.", 15),  # the box wins over later numbers
    ("\\boxed{x = 3 + 4 = 7}", 7),
    ("\\boxed{\\text{42}}", 42),
    ("\\boxed{-5}", -5),
    ("\\boxed{1,234}", 1234),
    ("\\boxed{15.0}", 15),
    ("\\boxed{15.5}", None),
    ("\\boxed{seven}", None),  # a box without a number is the answer: none
    ("Sam has 12 apples, then 12 + 9 = 21. The answer is 21.", 21),
    ("The total is -3", -3),
    ("so 10-3", 3),  # a subtraction, not a negative number
    ("(2+5)-3", 3),
    ("We end with 1,234,567 dollars", 1234567),
    ("It comes to 15.00.", 15),
    ("It comes to 15.25.", None),
    ("numbers 3,4,5", 5),
    ("\\boxed{42", 42),  # an unclosed box is no box: the last number
    ("no digits here", None),
    ("", None),
])
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize(("completion", "expected"), [
    ("... so \\boxed{24}", 1.1),
    ("... the answer is 24", 1.0),
    ("... \\boxed{23}", 0.1),
    ("... the answer is 23", 0.0),
    ("\\boxed{24} wait, 25", 1.1),
    ("24 apples. \\boxed{}", 0.1),
    ("", 0.0),
])
def test_score_is_answer_plus_format(completion, expected):
    assert score(completion, 24) == pytest.approx(expected)


@pytest.mark.parametrize(("completion", "expected"), [
    ("x" * 5_000_000 + "\\boxed{24}", 1.1),
    ("7" * 5_000_000, 0.0),
    ("\\boxed{" + "2" * 5_000_000, 0.0),
    ("\\boxed{" * 1_000_000, 0.0),
    ("word " * 1_000_000 + "24", 1.0),
])
def test_huge_completions_are_scored_quickly(completion, expected):
    started = time.perf_counter()
    result = score(completion, 24)
    assert time.perf_counter() - started < 0.5
    assert result == pytest.approx(expected)


def recompute(example: dict) -> int:
    """The answer from the stored steps, independently of the generator's own helper."""
    value = example["start"]
    assert value > 0
    for step in example["steps"]:
        if "groups" in step:
            count, each = step["groups"]
            assert step["value"] == count * each
        operand = step["value"]
        if step["op"] == "/":
            assert value % operand == 0
        value = {"+": value + operand, "-": value - operand, "*": value * operand,
                 "/": value // operand}[step["op"]]
        assert value > 0
    return value


def test_generated_answers_follow_from_the_stated_numbers():
    examples = generate(400, seed=2)
    for example in examples:
        assert example["answer"] == recompute(example)
        assert 2 <= len(example["steps"]) <= 4
        question = example["question"]
        mentioned = [int(n) for n in re.findall(r"\d+", question)]
        assert mentioned[0] == example["start"]
        for step in example["steps"]:
            if step["op"] in "+-":
                assert set(step.get("groups", [step["value"]])) <= set(mentioned), question
        json.dumps(example)
    assert {step["op"] for e in examples for step in e["steps"]} == {"+", "-", "*", "/"}


def test_a_reference_completion_scores_solved():
    task = Arithmetic(n_train=8, n_eval=4)
    for example in task.train_examples() + task.eval_examples():
        completion = f"Working it out step by step. \\boxed{{{example['answer']}}}"
        assert task.reward(completion, example) == pytest.approx(1.1)
        assert task.reward(completion, example) >= task.solved_reward


def test_generated_splits_are_disjoint_and_deterministic():
    task = Arithmetic(n_train=64, n_eval=32, seed=5)
    train, evals = task.train_examples(), task.eval_examples()
    assert len(train) == 64 and len(evals) == 32
    assert not {e["question"] for e in train} & {e["question"] for e in evals}
    again = Arithmetic(n_train=64, n_eval=32, seed=5)
    assert again.train_examples() == train and again.eval_examples() == evals
    assert Arithmetic(n_train=64, n_eval=32, seed=6).train_examples() != train


def test_prompt_asks_for_a_boxed_answer():
    task = Arithmetic(n_train=1, n_eval=1)
    example = task.train_examples()[0]
    text = task.user_text(example)
    assert text.startswith(example["question"]) and "\\boxed{}" in text
    assert task.user_text({"prompt": "Exactly this.", "answer": 1}) == "Exactly this."


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_loads_jsonl_and_json_files(tmp_path):
    records = [{"question": f"What is {i} + 1?", "answer": i + 1} for i in range(5)]
    task = Arithmetic(data=write_jsonl(tmp_path / "a.jsonl", records))
    assert task.train_examples() == records[:4] and task.eval_examples() == records[4:]
    mixed = [{"prompt": "2 + 2?", "answer": 4, "split": "train", "note": "unused"},
             {"question": "3 + 3?", "answer": 6, "split": "eval"}]
    (tmp_path / "a.json").write_text(json.dumps(mixed))
    task = Arithmetic(data=str(tmp_path / "a.json"))
    assert task.train_examples() == [{"prompt": "2 + 2?", "answer": 4}]
    assert task.eval_examples() == [{"question": "3 + 3?", "answer": 6}]


@pytest.mark.parametrize(("content", "message"), [
    ('{"question": "1 + 1?", "answer": 2}\n{"question": "2 + 2?", "answer": 4,\n',
     r"bad.jsonl: line 2 is not valid JSON"),
    ('{"answer": 2}\n', r"bad.jsonl: line 1: missing field 'question'"),
    ('{"question": "1 + 1?"}\n', r"bad.jsonl: line 1: missing field 'answer'"),
    ('{"question": "1 + 1?", "answer": "2"}\n', r"line 1: field 'answer' must be int, not str"),
    ('{"question": "1 + 1?", "answer": true}\n', r"line 1: field 'answer' must be int, not bool"),
    ('{"question": 7, "answer": 7}\n', r"line 1: field 'question' must be str, not int"),
    ('{"prompt": "1 + 1?", "answer": 2.5}\n', r"line 1: field 'answer' must be int, not float"),
    ("", r"bad.jsonl holds no examples"),
])
def test_bad_files_raise_one_line_errors(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(EsError, match=message) as error:
        Arithmetic(data=str(tmp_path / "bad.jsonl"))
    assert "\n" not in str(error.value)


def test_bad_sizes_and_missing_files_raise(tmp_path):
    with pytest.raises(EsError, match=r"n_train and n_eval must be >= 1"):
        Arithmetic(n_train=0)
    with pytest.raises(EsError, match=r"gone.json does not exist"):
        Arithmetic(data=str(tmp_path / "gone.json"))


def test_the_default_generator_is_unchanged_by_its_size_options():
    # the first problem of seed 2, as generated before generate() took steps/start options:
    # the held-out sets in docs/results.md were drawn from this sequence
    first = generate(1, seed=2)[0]
    assert first["question"].startswith("Ava has 10 apples. Ava buys 4 bags with 6 apples")
    assert first["answer"] == 40 and first["start"] == 10
    assert [s["op"] for s in first["steps"]] == ["+", "-", "*"]


def test_arithmetic_easy_is_one_step_on_a_small_value():
    from tasks import get_task

    task = get_task("arithmetic-easy")
    examples = task.train_examples() + task.eval_examples()
    assert len({e["question"] for e in examples}) == len(examples)
    for example in examples:
        assert len(example["steps"]) == 1 and 2 <= example["start"] <= 20
        assert example["answer"] == recompute(example)
        mentioned = [int(n) for n in re.findall(r"\d+", example["question"])]
        assert mentioned[0] == example["start"]
    assert {e["steps"][0]["op"] for e in examples} == {"+", "-", "*", "/"}
    completion = f"So the answer is \\boxed{{{examples[0]['answer']}}}."
    assert task.reward(completion, examples[0]) == pytest.approx(1.1)
