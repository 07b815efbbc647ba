"""Calling a task's reward code safely: every failure becomes one named error message.

Policy (documented in docs/tasks.md): a reward that raises, returns something that is not a
finite real number, or runs past --reward-timeout stops the run with an error naming the
task, the member or example and the rank; the generation is not written, so no update is
ever made from a bad reward.
"""

from __future__ import annotations

import math
import numbers
import signal
from collections.abc import Iterator
from contextlib import contextmanager

from tasks import Example, Task

# bigger rewards would overflow the population's mean and variance (NaN weights)
MAX_REWARD = 1e150


class RewardTimeout(BaseException):
    """Not an Exception, so a reward's own `except Exception:` cannot swallow the deadline."""


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise RewardTimeout in the main thread after `seconds` (0: no limit).

    SIGALRM interrupts Python code; a reward stuck inside one C call is interrupted only
    when that call returns.
    """
    if not seconds:
        yield
        return

    def expire(signum, frame):
        raise RewardTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def score(task: Task, completions: list[str], examples: list[Example], timeout: float,
          where: str) -> tuple[list[float] | None, str | None]:
    """(rewards, None) or (None, error message) for a batch of completions."""
    try:
        with deadline(timeout):
            values = list(task.rewards(completions, examples))
    except RewardTimeout:
        return None, (f"task {task.name}: reward took longer than --reward-timeout {timeout:g} s "
                      f"({where}); make it faster or raise the limit")
    except (Exception, SystemExit) as exc:  # noqa: BLE001  (user code: report, never update)
        # SystemExit too: a reward calling exit() on one rank would leave the others waiting
        return None, (f"task {task.name}: reward raised {type(exc).__name__}: {exc} ({where}); "
                      "fix the reward function")
    if len(values) != len(completions):
        return None, (f"task {task.name}: rewards() returned {len(values)} values for "
                      f"{len(completions)} completions ({where})")
    rewards = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return None, (f"task {task.name}: reward returned {value!r} "
                          f"({type(value).__name__}) ({where}); rewards must be finite numbers")
        try:
            number = float(value)
        except (OverflowError, ValueError):  # e.g. a Fraction beyond the float range
            number = math.inf
        if not math.isfinite(number) or abs(number) > MAX_REWARD:
            return None, (f"task {task.name}: reward returned {str(value)[:40]} ({where}); "
                          f"rewards must be finite numbers within +-{MAX_REWARD:g}")
        rewards.append(number)
    return rewards, None
