"""Conciseness: short questions with short reference answers.

Reward = -|len(completion) - len(reference)| in characters (after stripping whitespace),
so 0 is best. The model learns to answer as briefly as the reference.
"""

from __future__ import annotations

from tasks.base import Example, Task

TRAIN = [
    {"prompt": "What is the capital of France? Answer in one word.", "answer": "Paris"},
    {"prompt": "What is 7 times 8?", "answer": "56"},
    {"prompt": "Which planet is the largest in the solar system?", "answer": "Jupiter"},
    {"prompt": "What color is a clear daytime sky?", "answer": "Blue"},
]

EVAL = [
    {"prompt": "What is the capital of Italy?", "answer": "Rome"},
    {"prompt": "What is 9 plus 6?", "answer": "15"},
    {"prompt": "Which animal is known as the king of the jungle?", "answer": "Lion"},
    {"prompt": "What is the chemical symbol for gold?", "answer": "Au"},
]


class Conciseness(Task):
    name = "conciseness"

    def train_examples(self) -> list[Example]:
        return list(TRAIN)

    def eval_examples(self) -> list[Example]:
        return list(EVAL)

    def reward(self, completion: str, example: Example) -> float:
        return -float(abs(len(completion.strip()) - len(example["answer"])))
