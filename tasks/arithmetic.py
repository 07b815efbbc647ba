"""Arithmetic word problems: 2-4 steps on one quantity, with an exact integer answer.

A generated example keeps the structure it was written from, so the answer can be checked:
`{"question": "Sam has 12 apples. Sam buys 3 bags with 7 apples in each bag. ...",
"answer": 24, "start": 12, "steps": [{"op": "+", "value": 21, "groups": [3, 7]},
{"op": "-", "value": 9}]}`. Every intermediate value is a positive integer <= MAX_VALUE.

Reward = answer + 0.1 * format, so a solved example scores 1.0 or 1.1:

- answer = 1 when the extracted answer equals the reference. It is the last number inside
  the last `\\boxed{...}` when the completion has one (closed within MAX_BOXED_CHARS),
  else the last number in the completion's final TAIL_CHARS characters. Numbers may carry
  a minus sign and thousands commas (-1,234); a decimal counts when integral (15.0).
- format = 1 when that `\\boxed{...}` is present.

Both scans are bounded (str.rfind, then regexes over at most a few thousand characters),
so a multi-megabyte completion is cheap and nothing in it can make `score` raise.
"""

from __future__ import annotations

import random
import re
from collections import deque
from dataclasses import dataclass
from typing import Any

from tasks.base import Example, Task
from tasks.data import ProceduralTask, require

FORMAT_WEIGHT = 0.1
MAX_BOXED_CHARS = 200  # a \boxed{ with no '}' this close is not an answer box
TAIL_CHARS = 2000  # where the fallback looks for the last number
MAX_VALUE = 999  # bound on every intermediate value of a generated problem

INSTRUCTION = "Reason briefly, then give the final answer as an integer in \\boxed{}."

# A number not glued to the end of a word or another number. A minus is a sign only where
# it cannot be a subtraction: "10-3" and "(2+5)-3" end in 3, "is -3" in -3. Thousands
# groups come in threes, so "3,4,5" is three numbers and "1,234" one.
_NUMBER = re.compile(
    r"(?:(?<![\w.)])(?P<sign>-))?(?<![\w.])"
    r"(?P<integer>\d{1,3}(?:,\d{3})+|\d+)(?P<fraction>\.\d+)?(?!\d)"
)


# ---------------------------------------------------------------------------------------
# Reward


def extract_answer(completion: str) -> int | None:
    """The model's final answer: last number in the last \\boxed{}, else the last number."""
    return _extract(completion)[0]


def score(completion: str, answer: int) -> float:
    """1 if the extracted answer equals `answer`, plus 0.1 if the completion has a \\boxed{}."""
    value, boxed = _extract(completion)
    return (1.0 if value == answer else 0.0) + (FORMAT_WEIGHT if boxed else 0.0)


def _extract(completion: str) -> tuple[int | None, bool]:
    """(answer, whether it came from a \\boxed{})."""
    box = completion.rfind("\\boxed{")
    if box >= 0:
        start = box + len("\\boxed{")
        end = completion.find("}", start, start + MAX_BOXED_CHARS)
        if end >= 0:
            return _last_number(completion[start:end]), True
    # Widen the tail a little over digits so a number on its edge is not cut in half.
    start = max(0, len(completion) - TAIL_CHARS)
    floor = max(0, start - 64)
    while start > floor and completion[start - 1] in "0123456789,.-":
        start -= 1
    return _last_number(completion[start:]), False


def _last_number(text: str) -> int | None:
    """The last number in a short text as an int; None if none or it is not integral."""
    last = deque(_NUMBER.finditer(text), maxlen=1)
    if not last:
        return None
    match = last[0]
    fraction = match["fraction"]
    if fraction and fraction.strip(".0"):
        return None
    value = int(match["integer"].replace(",", ""))
    return -value if match["sign"] else value


# ---------------------------------------------------------------------------------------
# Generator


@dataclass(frozen=True)
class Scene:
    """Sentences about one quantity: a start, step templates by kind, and the question.

    Step kinds: "add" n, "groups" (adds k groups of m), "sub" n, "mul" (k times as many),
    "div" (split into k equal parts, keep one); a kind a scene lacks is never drawn. The
    templates fill in {name}, {n}, {k}, {m} and {times}; each is used once per problem, so
    a problem never repeats a sentence.
    """

    start: str
    steps: dict[str, tuple[str, ...]]
    question: str


SCENES = (
    Scene(
        start="{name} has {n} apples.",
        steps={
            "add": ("{name} picks {n} more apples.", "A neighbour gives {name} {n} apples."),
            "groups": ("{name} buys {k} bags with {m} apples in each bag.",
                       "{name} fills {k} baskets with {m} apples each from the orchard."),
            "sub": ("{name} gives away {n} apples.", "{name} uses {n} apples to bake pies."),
            "mul": ("After a trade at the market, {name} has {times} as many apples as "
                    "before.",),
            "div": ("{name} shares the apples equally among {k} baskets and keeps one "
                    "basket.",),
        },
        question="How many apples does {name} have now?",
    ),
    Scene(
        start="{name} keeps {n} marbles in a jar.",
        steps={
            "add": ("{name} wins {n} marbles at recess.", "A cousin gives {name} {n} marbles."),
            "groups": ("{name} gets {k} pouches of {m} marbles each.",
                       "{name} wins {k} games and each game pays {m} marbles."),
            "sub": ("{name} loses {n} marbles.", "{name} gives {n} marbles to a friend."),
            "mul": ("A lucky game leaves {name} with {times} as many marbles as before.",),
            "div": ("{name} splits the marbles evenly into {k} jars and gives away all but "
                    "one jar.",),
        },
        question="How many marbles does {name} have now?",
    ),
    Scene(
        start="{name} has saved {n} dollars.",
        steps={
            "add": ("{name} earns {n} dollars walking dogs.",
                    "{name} finds {n} dollars in an old coat."),
            "groups": ("{name} sells {k} drawings for {m} dollars each.",
                       "{name} babysits {k} evenings at {m} dollars an evening."),
            "sub": ("{name} spends {n} dollars on a book.", "{name} pays {n} dollars for lunch."),
            "mul": ("A birthday gift leaves {name} with {times} as much money as before.",),
            "div": ("{name} divides the money equally into {k} envelopes and keeps one "
                    "envelope.",),
        },
        question="How many dollars does {name} have now?",
    ),
    Scene(
        start="A bus leaves the depot with {n} passengers.",
        steps={
            "add": ("At the next stop, {n} people get on.", "{n} students board at the school."),
            "groups": ("Later, {k} groups of {m} tourists board the bus.",
                       "At the station, {k} families of {m} get on."),
            "sub": ("At the market, {n} passengers get off.", "{n} passengers leave at the park."),
        },
        question="How many passengers are on the bus now?",
    ),
    Scene(
        start="A library shelf holds {n} books.",
        steps={
            "add": ("The librarian puts {n} more books on the shelf.",
                    "Readers return {n} books to the shelf."),
            "groups": ("Then {k} boxes with {m} books each are unpacked onto the shelf.",
                       "A school donates {k} sets of {m} books, all placed on the shelf."),
            "sub": ("Readers borrow {n} books from the shelf.",
                    "The librarian removes {n} worn books from the shelf."),
        },
        question="How many books are on the shelf now?",
    ),
)

STEPS, START = (2, 4), (5, 60)  # steps per problem, first value
EASY_STEPS, EASY_START = (1, 1), (2, 20)  # arithmetic-easy: one step on a small value

NAMES = ("Sam", "Ava", "Liam", "Maya", "Noah", "Zoe", "Omar", "Lena", "Ravi", "Iris")
TIMES = {2: "twice", 3: "three times", 4: "four times"}


def generate(count: int, seed: int, steps: tuple[int, int] = STEPS,
             start: tuple[int, int] = START) -> list[Example]:
    """`count` problems from `seed` with pairwise different questions, each of
    steps[0]..steps[1] steps from a first value in start[0]..start[1]."""
    rng = random.Random(seed)
    seen: set[str] = set()
    examples: list[Example] = []
    while len(examples) < count:
        example = _random_problem(rng, steps, start)
        if example is not None and example["question"] not in seen:
            seen.add(example["question"])
            examples.append(example)
    return examples


def apply_steps(start: int, steps: list[dict[str, Any]]) -> int:
    """The value after the steps; a generated answer is this by construction."""
    value = start
    for step in steps:
        op, operand = step["op"], step["value"]
        if op == "+":
            value += operand
        elif op == "-":
            value -= operand
        elif op == "*":
            value *= operand
        else:
            value //= operand
    return value


def _random_problem(rng: random.Random, counts: tuple[int, int],
                    starts: tuple[int, int]) -> Example | None:
    """A problem of counts[0]..counts[1] steps, or None in the rare case no step fits (the
    caller redraws)."""
    scene, name = rng.choice(SCENES), rng.choice(NAMES)
    start = value = rng.randint(*starts)
    sentences = [scene.start.format(name=name, n=value)]
    steps: list[dict[str, Any]] = []
    used: set[str] = set()
    for _ in range(rng.randint(*counts)):
        drawn = _random_step(scene, value, used, rng)
        if drawn is None:
            return None
        step, template, fill = drawn
        used.add(template)
        value = apply_steps(value, [step])
        steps.append(step)
        sentences.append(template.format(name=name, **fill))
    sentences.append(scene.question.format(name=name))
    return {"question": " ".join(sentences), "answer": value, "start": start, "steps": steps}


def _random_step(
    scene: Scene, value: int, used: set[str], rng: random.Random
) -> tuple[dict[str, Any], str, dict[str, Any]] | None:
    """(step, its sentence template, the template's fields) keeping the value in
    2..MAX_VALUE, from the templates not yet used; None if none fits."""
    room = MAX_VALUE - value
    divisors = [k for k in (2, 3, 4, 5) if value % k == 0 and value // k >= 2]
    fits = {"add": room >= 2, "groups": room >= 4, "sub": value > 2,
            "mul": value * 2 <= MAX_VALUE, "div": bool(divisors)}
    candidates = [(kind, template) for kind, templates in scene.steps.items() if fits[kind]
                  for template in templates if template not in used]
    if not candidates:
        return None
    kind, template = rng.choice(candidates)
    if kind == "add":
        n = rng.randint(2, min(30, room))
        return {"op": "+", "value": n}, template, {"n": n}
    if kind == "groups":
        k = rng.randint(2, min(5, room // 2))
        m = rng.randint(2, min(12, room // k))
        return {"op": "+", "value": k * m, "groups": [k, m]}, template, {"k": k, "m": m}
    if kind == "sub":
        n = rng.randint(1, min(40, value - 2))
        return {"op": "-", "value": n}, template, {"n": n}
    if kind == "mul":
        k = rng.choice([k for k in TIMES if value * k <= MAX_VALUE])
        return {"op": "*", "value": k}, template, {"times": TIMES[k]}
    k = rng.choice(divisors)
    return {"op": "/", "value": k}, template, {"k": k}


# ---------------------------------------------------------------------------------------
# Task


def check_example(example: Example) -> str | None:
    """None if a file record is a problem, else what is wrong with it: it needs an integer
    "answer" and a "question" (the instruction is appended) or a "prompt" (used verbatim)."""
    texts = [field for field in ("question", "prompt") if field in example]
    if not texts:
        return "missing field 'question' (or 'prompt')"
    for field in texts:
        if problem := require(example, field, str):
            return problem
    return require(example, "answer", int)


def from_record(record: Example) -> Example:
    """A checked file record without the fields the task does not use (e.g. "split")."""
    return {field: record[field] for field in ("question", "prompt", "answer") if field in record}


class Arithmetic(ProceduralTask, Task):
    """Word problems from a seed (`data=None`) or a .json/.jsonl file of examples."""

    name = "arithmetic"
    solved_reward = 1.0
    check_example = staticmethod(check_example)
    from_record = staticmethod(from_record)
    generate = staticmethod(generate)

    def user_text(self, example: Example) -> str:
        if "question" in example:
            return f"{example['question']}\n{INSTRUCTION}"
        return example["prompt"]

    def reward(self, completion: str, example: Example) -> float:
        return score(completion, example["answer"])


def generate_easy(count: int, seed: int) -> list[Example]:
    """One-step problems from a first value in 2..20 (arithmetic-easy)."""
    return generate(count, seed, EASY_STEPS, EASY_START)


class ArithmeticEasy(Arithmetic):
    """The same word problems with one step on a small number: a size the demo model
    solves some of (about 1 in 7), so ES has a reward signal to follow (docs/results.md)."""

    name = "arithmetic-easy"
    generate = staticmethod(generate_easy)
