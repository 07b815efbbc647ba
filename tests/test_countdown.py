"""Countdown: the reward's parser and tag rules, the solver, the generator and file loading."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from es_mpi.errors import EsError
from tasks.countdown import Countdown, evaluate, generate, score, solve


def answer(expression: str) -> str:
    return f"<think>some reasoning</think> <answer>{expression}</answer>"


NUMBERS, TARGET = [44, 19, 35], 98  # 44 + 19 + 35


@pytest.mark.parametrize("expression", [
    "44 + 19 + 35",
    "  35+44 +19 ",
    "((44) + (19 + 35))",
    "\n(35 + 19)\n+ 44\n",
])
def test_a_correct_answer_scores_format_plus_one(expression):
    assert score(answer(expression), NUMBERS, TARGET) == pytest.approx(1.1)


@pytest.mark.parametrize(("expression", "why"), [
    ("44 + 44 + 10", "a number reused and one missing"),
    ("44 + 19 + 35 + 0", "a number not in the list"),
    ("44 + 54", "numbers missing"),
    ("44 + 19 + 35 - 19 + 19", "a number reused, value right"),
    ("44 + 19 + 34", "wrong value"),
    ("-44 + 19 + 35 + 88", "unary minus"),
    ("44 + 19 + 35 = 98", "an equation, not an expression"),
    ("x = 44 + 19 + 35", "letters"),
    ("44 + 19 + 35.0", "a decimal point"),
    ("44 + 19 + 35 % 100", "modulo"),
    ("44 + 19 + 35 ** 1", "an exponent"),
    ("44 + 19 + 35 ^ 1", "a caret"),
    ("44 + 19 35", "two numbers without an operator"),
    ("(44 + 19 + 35", "an unclosed parenthesis"),
    ("44 + 19 + 35)", "an unopened parenthesis"),
    ("44 + 19 + ()35", "empty parentheses"),
    ("", "an empty answer"),
    ("98", "the target itself"),
])
def test_a_well_formed_but_wrong_answer_scores_the_format_term_only(expression, why):
    assert score(answer(expression), NUMBERS, TARGET) == pytest.approx(0.1), why


@pytest.mark.parametrize(("completion", "why"), [
    ("44 + 19 + 35", "no tags"),
    ("<answer>44 + 19 + 35", "no closing tag"),
    ("44 + 19 + 35</answer>", "no opening tag"),
    ("<think><answer>44 + 19 + 35</answer></think>", "the answer only inside <think>"),
    ("<answer>44 + 19 + 35</answer> more thoughts </think>", "the answer before </think>"),
    ("<think>the target is 98 with numbers 44, 19, 35</think>", "no answer at all"),
    ("", "an empty completion"),
])
def test_a_missing_or_misplaced_answer_block_scores_zero(completion, why):
    assert score(completion, NUMBERS, TARGET) == 0.0, why


def test_the_last_answer_block_counts():
    first_right = "<answer>44 + 19 + 35</answer> no, wait: <answer>44 + 19 - 35</answer>"
    last_right = "<answer>44 + 19 - 35</answer> no, wait: <answer>44 + 19 + 35</answer>"
    assert score(first_right, NUMBERS, TARGET) == pytest.approx(0.1)
    assert score(last_right, NUMBERS, TARGET) == pytest.approx(1.1)
    # a trailing unclosed tag (a cut-off generation) does not hide the last complete block
    assert score(last_right + " <answer>4", NUMBERS, TARGET) == pytest.approx(1.1)


def test_raw_prompt_completions_need_no_opening_think_tag():
    completion = " 44 + 19 = 63, 63 + 35 = 98 </think>\n<answer> 44 + 19 + 35 </answer>"
    assert score(completion, NUMBERS, TARGET) == pytest.approx(1.1)


def test_the_completion_alone_is_scored_not_the_prompt():
    task = Countdown(n_train=1, n_eval=1)
    example = {"numbers": NUMBERS, "target": TARGET, "solution": "44 + 19 + 35"}
    # the prompt itself holds an <answer> block (its example), worth the format term...
    assert score(task.user_text(example), NUMBERS, TARGET) == pytest.approx(0.1)
    # ...but the reward sees the completion only
    assert task.reward("I am not sure.", example) == 0.0
    assert task.reward("<answer>44 + 19 + 35</answer>", example) == pytest.approx(1.1)


def test_exact_fractions_reach_the_target_and_near_misses_do_not():
    assert score(answer("(1 / 3) * 3"), [1, 3, 3], 1) == pytest.approx(1.1)
    assert score(answer("8 / (3 - 8 / 3)"), [8, 3, 8, 3], 24) == pytest.approx(1.1)
    assert score(answer("100 + 1 / 100"), [100, 1, 100], 100) == pytest.approx(0.1)  # 100.01
    assert score(answer("100 - 1 / 100"), [100, 1, 100], 100) == pytest.approx(0.1)  # 99.99


def test_division_by_zero_scores_the_format_term_only():
    assert score(answer("5 / (3 - 3)"), [5, 3, 3], 5) == pytest.approx(0.1)
    assert score(answer("5 / 0"), [5, 0], 5) == pytest.approx(0.1)


def test_giant_values_are_rejected():
    big = 10**7
    assert score(answer(f"{big} * {big} / {big}"), [big] * 3, big) == pytest.approx(0.1)
    assert score(answer(f"{big} / ({big} * {big})"), [big] * 3, 0) == pytest.approx(0.1)
    assert score(answer("9" * 20), [int("9" * 20)], int("9" * 20)) == pytest.approx(0.1)
    assert score(answer("99 * 99 * 99 * 99"), [99] * 4, 99**4) == pytest.approx(1.1)


def test_nesting_is_bounded():
    assert score(answer("(" * 20 + "7" + ")" * 20), [7], 7) == pytest.approx(1.1)
    assert score(answer("(" * 40 + "7" + ")" * 40), [7], 7) == pytest.approx(0.1)
    assert score(answer("(" * 3000 + "7" + ")" * 3000), [7], 7) == pytest.approx(0.1)
    assert evaluate("(" * 3000 + "7" + ")" * 3000) is None


@pytest.mark.parametrize(("completion", "expected"), [
    ("x" * 5_000_000 + answer("44 + 19 + 35"), 1.1),
    ("<answer>" + "1 + " * 1_250_000 + "1</answer>", 0.1),
    ("</think>" * 600_000 + "<answer>" * 600_000, 0.0),
    ("(" * 5_000_000, 0.0),
    ("<answer>" + "(" * 5_000_000 + "</answer>", 0.1),
])
def test_huge_completions_are_scored_quickly(completion, expected):
    started = time.perf_counter()
    result = score(completion, NUMBERS, TARGET)
    assert time.perf_counter() - started < 0.5
    assert result == pytest.approx(expected)


def test_evaluate_returns_the_exact_value_and_literals():
    value, literals = evaluate("(1 + 2) / 3 * 07")
    assert value == 7 and literals == [1, 2, 3, 7]
    assert evaluate("1 - 2 - 3")[0] == -4  # left-associative
    assert evaluate("2 * 3 + 4 * 5")[0] == 26  # precedence
    assert evaluate("2 ** 3") is None and evaluate("-1") is None and evaluate("1 +") is None


@pytest.mark.parametrize(("numbers", "target"), [
    ([44, 19, 35], 98), ([3, 3, 8, 8], 24), ([1, 5, 5, 5], 24), ([7, 7, 7, 7], 1),
    ([25, 50, 75, 100], 350), ([2, 3], 6), ([5], 5),
])
def test_solve_finds_a_solution_that_scores(numbers, target):
    solution = solve(numbers, target)
    assert solution is not None
    assert score(answer(solution), numbers, target) == pytest.approx(1.1)


@pytest.mark.parametrize(("numbers", "target"), [([1, 1, 1], 100), ([1, 2, 3, 4], 1000), ([5], 6)])
def test_solve_returns_none_when_unsolvable(numbers, target):
    assert solve(numbers, target) is None


def instance(example: dict) -> tuple:
    """What makes two examples the same problem: the numbers in any order and the target."""
    return tuple(sorted(example["numbers"])), example["target"]


def test_generated_examples_are_solvable_and_their_solutions_score():
    examples = generate(300, seed=1)
    assert len({instance(e) for e in examples}) == 300
    assert set(Counter(len(e["numbers"]) for e in examples)) == {3, 4}
    for example in examples:
        numbers, target = example["numbers"], example["target"]
        assert all(1 <= n <= 99 for n in numbers) and 1 <= target <= 999
        assert score(f"<answer>{example['solution']}</answer>", numbers, target) == 1.1
        assert solve(numbers, target) is not None
        json.dumps(example)  # plain JSON-able dicts


def test_generated_splits_are_disjoint_and_deterministic():
    task = Countdown(n_train=64, n_eval=32, seed=3)
    train, evals = task.train_examples(), task.eval_examples()
    assert len(train) == 64 and len(evals) == 32
    assert not {instance(e) for e in train} & {instance(e) for e in evals}
    again = Countdown(n_train=64, n_eval=32, seed=3)
    assert again.train_examples() == train and again.eval_examples() == evals
    assert Countdown(n_train=64, n_eval=32, seed=4).train_examples() != train
    # eval does not move when only the training set grows
    assert Countdown(n_train=80, n_eval=32, seed=3).eval_examples() == evals


def test_prompt_holds_the_numbers_and_target_and_the_raw_form_ends_in_think():
    task = Countdown(n_train=1, n_eval=1)
    example = {"numbers": [44, 19, 35], "target": 98}
    text = task.user_text(example)
    assert text.startswith("Using the numbers [44, 19, 35], create an equation that equals 98.")
    assert "<answer> (1 + 2) / 3 </answer>" in text

    class ChatTokenizer:
        chat_template = "a template"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return f"<user>{messages[0]['content']}</user><assistant>"

    assert task.prompt(example, ChatTokenizer()) == f"<user>{text}</user><assistant>"
    task.prompt_format = "raw"
    raw = task.prompt(example, ChatTokenizer())
    assert raw.startswith("A conversation between User and Assistant.")
    assert f"\nUser: {text}\nAssistant: Let me solve this step by step.\n" in raw
    assert raw.endswith("<think>")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_loads_jsonl_and_json_files(tmp_path):
    records = [{"numbers": [i, 2, 3], "target": i + 5} for i in range(1, 11)]
    task = Countdown(data=write_jsonl(tmp_path / "cd.jsonl", records))
    assert task.train_examples() == records[:8] and task.eval_examples() == records[8:]
    (tmp_path / "cd.json").write_text(json.dumps(records))
    assert Countdown(data=str(tmp_path / "cd.json")).eval_examples() == records[8:]
    # an explicit split decides; TinyZero's "nums" is accepted and normalized
    split = [{"nums": [1, 2], "target": 3, "split": "eval", "source": "TinyZero"},
             {"numbers": [2, 2], "target": 4, "split": "train", "solution": "2 + 2"}]
    task = Countdown(data=write_jsonl(tmp_path / "split.jsonl", split))
    assert task.eval_examples() == [{"numbers": [1, 2], "target": 3}]
    assert task.train_examples() == [{"numbers": [2, 2], "target": 4, "solution": "2 + 2"}]
    assert task.reward("<answer>2 + 2</answer>", task.train_examples()[0]) == 1.1


@pytest.mark.parametrize(("name", "content", "message"), [
    ("bad.jsonl", '{"numbers": [1, 2], "target": 3}\n{"numbers": [1, 2], "target": \n',
     r"bad.jsonl: line 2 is not valid JSON"),
    ("bad.json", '[{"numbers": [1, 2],\n "target": 3},\n oops]',
     r"bad.json: invalid JSON at line 3"),
    ("missing.jsonl", '{"numbers": [1, 2], "target": 3}\n\n{"numbers": [1, 2]}\n',
     r"missing.jsonl: line 3: missing field 'target'"),
    ("typed.json", '[{"numbers": [1, 2], "target": 3}, {"numbers": [1, "2"], "target": 3}]',
     r"typed.json: record 2: field 'numbers' must be a non-empty list of positive integers"),
    ("zero.jsonl", '{"nums": [0, 2], "target": 3}\n', r"line 1: field 'nums' must be a non-empty"),
    ("text.jsonl", '{"numbers": [1, 2], "target": "three"}\n',
     r"line 1: field 'target' must be a number or a decimal string such as \"27.4\", not 'three'"),
    ("bool.jsonl", '{"numbers": [1, 2], "target": true}\n',
     r"line 1: field 'target' must be int or float or str, not bool"),
    ("nan.jsonl", '{"numbers": [1, 2], "target": NaN}\n', r"line 1: field 'target' must be a"),
    ("context.jsonl", '{"numbers": [1, 2], "target": 3, "context": 7}\n',
     r"line 1: field 'context' must be str, not int"),
    ("list.jsonl", "[1, 2, 3]\n", r"line 1: not a JSON object"),
    ("empty.jsonl", "\n\n", r"empty.jsonl holds no examples"),
    ("evalonly.jsonl", '{"numbers": [1, 2], "target": 3, "split": "eval"}\n',
     r"evalonly.jsonl has no training examples"),
    ("split.jsonl", '{"numbers": [1, 2], "target": 3, "split": "test"}\n',
     r"line 1: split must be 'train' or 'eval'"),
])
def test_bad_files_raise_one_line_errors(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(EsError, match=message) as error:
        Countdown(data=str(tmp_path / name))
    assert "\n" not in str(error.value)


def test_a_missing_file_names_the_path(tmp_path):
    with pytest.raises(EsError, match=r"nope.jsonl does not exist"):
        Countdown(data=str(tmp_path / "nope.jsonl"))


# -- the paper's reward (countdown-paper) -------------------------------------------------

def paper_reference(response: str, numbers: list[int], target: float) -> float:
    """The paper's countdown_task.reward_function, re-typed from its repository: regexes
    and Python's eval (safe here: only small given numbers reach it)."""
    import re

    def format_reward(text):
        if re.match(r"^<think>.*?<\/think>\n<answer>.*?<\/answer>$", text, re.DOTALL):
            return 1.0
        return (0.1 if re.search(r"<think>.*?<\/think>", text, re.DOTALL) else 0.0) + (
            0.5 if re.search(r"<answer>.*?<\/answer>", text, re.DOTALL) else 0.0)

    def answer_reward(text):
        matches = re.findall(r"<answer>(.*?)<\/answer>", text, re.DOTALL)
        if not matches:
            return 0.0
        content = matches[-1]
        if not content or not re.match(r"^[0-9+\-*/() ]+$", content):
            return 0.0
        if sorted(int(n) for n in re.findall(r"\d+", content)) != sorted(numbers):
            return 0.0
        try:
            result = eval(content, {"__builtins__": None}, {})
            return 1.0 if abs(float(result) - float(target)) < 1e-5 else 0.0
        except Exception:  # noqa: BLE001 - as the paper's checker
            return 0.0

    return 0.1 * format_reward("<think>" + response) + answer_reward(response)


@pytest.mark.parametrize(("completion", "expected"), [
    ("reasoning</think>\n<answer>44 + 19 + 35</answer>", 1.1),       # full format, solved
    ("reasoning</think>\n<answer>44 + 19 + 35</answer>\n", 1.1),     # `$` before a newline
    ("reasoning</think> <answer>44 + 19 + 35</answer>", 1.06),       # no newline: 0.1 + 0.5
    ("reasoning</think>\n<answer>44 + 19 + 34</answer>", 0.1),       # full format, wrong
    ("no tags at all", 0.0),                                          # "<think>" alone: 0
    ("</think>", 0.01),                                               # the think block only
    ("<answer>98</answer>", 0.05),                                    # answer block, wrong
    ("</think>\n<answer>-(-44) + 19 + 35</answer>", 1.1),            # unary minus counts
    ("</think>\n<answer>44 + 19 + 35 ** 1</answer>", 0.1),           # 1 is not given
    ("<answer>44 + 19 + 35</answer> more</think>", 1.06),            # answer anywhere
    ("</think>\n<answer>44 +\n19 + 35</answer>", 0.1),               # newline inside
    ("</think>\n<answer>44 + 19 + 035</answer>", 0.1),               # Python refuses 035
])
def test_paper_score_examples_agree_with_the_papers_checker(completion, expected):
    from tasks.countdown import paper_score

    assert paper_score(completion, NUMBERS, TARGET) == pytest.approx(expected)
    assert paper_reference(completion, NUMBERS, TARGET) == pytest.approx(expected)


def test_paper_score_equals_the_papers_checker_on_generated_completions():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from tasks.countdown import paper_score, target_value

    pieces = st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "\n", " ", "2",
                              "3", "5", "+", "-", "*", "/", "(", ")", "**", "//", "x", "0"])
    targets = st.sampled_from(["10", "30", "-3", "0.4", "1.5", "7", "243", "1"])

    @settings(max_examples=3000, deadline=None, derandomize=True)
    @given(st.lists(pieces, max_size=24).map("".join), targets)
    def check(completion, target):
        numbers = [2, 3, 5]
        got = paper_score(completion, numbers, target_value(target))
        assert got == pytest.approx(paper_reference(completion, numbers, float(target))), \
            completion

    check()


def test_paper_format_is_linear_on_huge_completions():
    from tasks.countdown import paper_score

    completion = "</think>\n<answer>" * 200_000 + "x</answer>y"  # quadratic for a regex
    t0 = time.perf_counter()
    assert paper_score(completion, NUMBERS, TARGET) == pytest.approx(0.06)
    assert time.perf_counter() - t0 < 5  # a bound on a runaway, not a speed target


def test_the_papers_data_file_loads_as_is(tmp_path):
    """countdown.json of the paper: context, numbers, target as a string (some decimal or
    negative), solution; the raw prompt is the context, verbatim."""
    from tasks.countdown import CountdownPaper

    context = "A conversation ... Using the numbers [4, 5, 2], create ... 27.4.\n<think>"
    records = [{"context": context, "numbers": [4, 5, 2], "target": "27.4",
                "solution": "(4 + 5) * 2 + 9.4"},
               {"context": "c2", "numbers": [3, 5], "target": "-2", "solution": "3 - 5"},
               {"context": "c3", "numbers": [44, 19, 35], "target": "98", "solution": "x"},
               {"context": "c4", "numbers": [137, 5], "target": "27.4", "solution": "137/5"},
               {"context": "c5", "numbers": [1, 2], "target": "3", "solution": "1 + 2"}]
    path = tmp_path / "countdown.json"
    path.write_text(json.dumps(records))
    for cls in (Countdown, CountdownPaper):
        task = cls(data=str(path))
        train, held_out = task.train_examples(), task.eval_examples()
        assert [e["target"] for e in train] == ["27.4", -2, 98, "27.4"]
        assert held_out == [{"numbers": [1, 2], "target": 3, "solution": "1 + 2",
                             "context": "c5"}]
        task.prompt_format = "raw"
        assert task.prompt(train[0], tokenizer=None) == context
        assert task.reward("</think>\n<answer>137 / 5</answer>", train[3]) == \
            pytest.approx(1.1)
        assert task.reward("</think>\n<answer>137 / 5</answer>", train[0]) < 1.0
    # the strict checker has no unary minus; the paper's accepts it, as Python does
    assert Countdown(data=str(path)).reward("<answer>3 - 5</answer>", train[1]) == 1.1
    assert CountdownPaper(data=str(path)).reward("</think>\n<answer>-5 + 3</answer>",
                                                 train[1]) == pytest.approx(1.1)
    assert Countdown(data=str(path)).reward("<answer>-5 + 3</answer>", train[1]) == 0.1


def test_the_default_generator_is_unchanged_by_its_size_options():
    # seed 1's first examples, as generated before generate() took size options
    assert generate(2, seed=1) == [
        {"numbers": [73, 98, 9], "target": 225, "solution": "(98 - 73) * 9"},
        {"numbers": [76, 14, 41], "target": 498, "solution": "(41 * 14) - 76"}]


def test_countdown_easy_draws_two_or_three_small_numbers_and_scores_as_the_paper():
    from tasks import get_task

    task = get_task("countdown-easy")
    examples = task.train_examples() + task.eval_examples()
    assert len({instance(e) for e in examples}) == len(examples)
    assert set(Counter(len(e["numbers"]) for e in examples)) == {2, 3}
    for example in examples:
        numbers, target = example["numbers"], example["target"]
        assert all(1 <= n <= 10 for n in numbers) and 1 <= target <= 50
        assert solve(numbers, target) is not None
    # the paper's graded format: a bare <answer> block earns 0.1 * 0.5 without <think>
    solution = examples[0]["solution"]
    assert task.reward(f"<answer>{solution}</answer>", examples[0]) == pytest.approx(1.05)
    assert task.reward("<answer>1 + 1 + 1 + 1</answer>", examples[0]) == pytest.approx(0.05)
