"""Conciseness (the paper's first experiment): answer as briefly as a short reference.

Reward = -|len(completion) - len(answer)| in characters, after stripping surrounding
whitespace from the completion (0 is best). It scores length only: a short wrong answer
beats a long right one.

`conciseness-correct` scores the same examples for a correct *and* short answer:
1 when the answer appears in the completion as a whole word (case-insensitive), plus
0.5 * min(len(completion), len(answer)) / max(len(completion), len(answer)). A correct
answer scores in (1, 1.5] (1.5: exactly the answer), a wrong one at most 0.5, so
`solved_reward` = 1 and held-out accuracy is the share answered correctly.

Training prompts default to the paper's two; the held-out prompts are 58 other
short-answer questions with one short reference answer each (capitals, arithmetic, colors,
simple science; tasks/conciseness_heldout.jsonl, written for es-mpi), never trained on.
Its first 6 are the held-out set of es-mpi before it grew, so `eval_limit = 6` scores
exactly those. A JSON/JSONL file of {"prompt": ..., "answer": ...} objects replaces both
(see tasks/data.py); es_mpi/presets/conciseness_large.jsonl holds 60 training questions
(the paper's two first) and these 58 held-out ones.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tasks.base import Example, Task
from tasks.data import load_examples, require

PAPER_PROMPTS = [
    {"prompt": "Solve: 3 + 5 =", "answer": "8"},
    {"prompt": "If all birds can fly and penguins are birds, can penguins fly?", "answer": "No"},
]

HELD_OUT_FILE = Path(__file__).with_name("conciseness_heldout.jsonl")  # package data


def held_out_examples() -> list[Example]:
    """The built-in held-out questions, in file order."""
    lines = HELD_OUT_FILE.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def check_example(example: Example) -> str | None:
    return require(example, "prompt", str) or require(example, "answer", str)


class Conciseness(Task):
    name = "conciseness"

    def __init__(self, data: str | None = None):
        if data:
            self.train, self.held_out = load_examples(data, check_example)
        else:
            self.train, self.held_out = list(PAPER_PROMPTS), held_out_examples()

    def train_examples(self) -> list[Example]:
        return self.train

    def eval_examples(self) -> list[Example]:
        return self.held_out

    def reward(self, completion: str, example: Example) -> float:
        return -float(abs(len(completion.strip()) - len(example["answer"])))


BREVITY_WEIGHT = 0.5  # < 1, so that no wrong answer outscores a right one


def contains_answer(completion: str, answer: str) -> bool:
    """`answer` occurs in `completion` as a whole word or number, ignoring case."""
    pattern = r"(?<!\w)" + re.escape(answer.strip()) + r"(?!\w)"
    return re.search(pattern, completion, flags=re.IGNORECASE) is not None


class ConcisenessCorrect(Conciseness):
    name = "conciseness-correct"
    solved_reward = 1.0

    def reward(self, completion: str, example: Example) -> float:
        text, answer = completion.strip(), example["answer"]
        brevity = min(len(text), len(answer)) / max(len(text), len(answer), 1)
        return float(contains_answer(text, answer)) + BREVITY_WEIGHT * brevity
