"""Reward tasks for es-mpi: built-in ones by name, and user tasks.

    get_task("conciseness")                          built-in (see TASKS)
    get_task("conciseness", data="qa.jsonl")         built-in task, examples from a file
    get_task("my_pkg.tasks:MyTask")                  a user's Task subclass
    get_task("jsonl:prompts.jsonl", reward="my_pkg.rewards:score")
"""

from __future__ import annotations

from es_mpi.errors import EsError
from tasks.arithmetic import Arithmetic, ArithmeticEasy
from tasks.base import Example, Task
from tasks.conciseness import Conciseness, ConcisenessCorrect
from tasks.countdown import Countdown, CountdownEasy, CountdownPaper

TASKS: dict[str, type[Task]] = {
    "arithmetic": Arithmetic,
    "arithmetic-easy": ArithmeticEasy,
    "conciseness": Conciseness,
    "conciseness-correct": ConcisenessCorrect,
    "countdown": Countdown,
    "countdown-easy": CountdownEasy,
    "countdown-paper": CountdownPaper,
}


def get_task(name: str, data: str | None = None, reward: str | None = None) -> Task:
    """A task instance; every problem (unknown name, bad data, bad import) is an EsError."""
    from tasks.user import JsonlTask, import_attr, load_task_object

    if name.startswith("jsonl:"):
        if not reward:
            raise EsError(f"task {name}: a JSONL task needs --reward module:function")
        fn = import_attr(reward, "reward")
        if not callable(fn):
            raise EsError(f"reward {reward!r} is not callable")
        return JsonlTask(name.removeprefix("jsonl:"), fn, name=name)
    if reward:
        raise EsError(f"--reward applies to --task jsonl:PATH only, not to task {name!r}")
    if name in TASKS:
        return TASKS[name](data=data) if data else TASKS[name]()
    if ":" in name:
        return load_task_object(name, data)
    raise EsError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))} "
                  "(or module:Class, or jsonl:PATH with --reward module:function)")


__all__ = ["TASKS", "Example", "Task", "get_task"]
