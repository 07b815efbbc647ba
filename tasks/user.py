"""User tasks: a Task class from `module:attr`, or a JSONL of prompts with a reward function.

    --task my_pkg.my_module:MyTask                  a Task subclass (or instance)
    --task jsonl:prompts.jsonl --reward my_pkg.mod:fn
                                                   fn(completion, example) -> float
The current directory is importable, as with `python -m`.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from es_mpi.errors import EsError
from tasks.base import Example, Task
from tasks.data import load_examples, require


def import_attr(spec: str, what: str) -> Any:
    """The object named by 'module.path:attr'."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise EsError(f"{what} {spec!r}: expected module.path:name")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001  (user code: any import failure is reported)
        raise EsError(f"{what} {spec!r}: cannot import {module_name} "
                      f"({type(exc).__name__}: {exc})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise EsError(f"{what} {spec!r}: module {module_name} has no attribute {attr!r}") from None


def load_task_object(spec: str, data: str | None) -> Task:
    obj = import_attr(spec, "task")
    if isinstance(obj, type) and issubclass(obj, Task):
        try:
            return obj(data=data) if data else obj()
        except EsError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise EsError(f"task {spec!r}: constructing it raised {type(exc).__name__}: {exc}"
                          ) from None
    if isinstance(obj, Task):
        return obj
    raise EsError(f"task {spec!r} is a {type(obj).__name__}, not a subclass of tasks.Task")


class JsonlTask(Task):
    """Prompts from a JSONL/JSON file (field "prompt", any others), scored by a user function."""

    def __init__(self, path: str, reward_fn: Callable[[str, Example], float], name: str):
        self.name = name
        self.reward_fn = reward_fn
        self.train, self.held_out = load_examples(path, lambda e: require(e, "prompt", str))

    def train_examples(self) -> list[Example]:
        return self.train

    def eval_examples(self) -> list[Example]:
        return self.held_out

    def reward(self, completion: str, example: Example) -> float:
        return self.reward_fn(completion, example)
