"""Reward tasks for es-mpi, by name."""

from __future__ import annotations

from es_mpi.errors import EsError
from tasks.base import Example, Task
from tasks.conciseness import Conciseness

TASKS: dict[str, type[Task]] = {"conciseness": Conciseness}


def get_task(name: str) -> Task:
    """A task instance by registry name; an unknown name lists the known ones."""
    try:
        return TASKS[name]()
    except KeyError:
        raise EsError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


__all__ = ["TASKS", "Example", "Task", "get_task"]
