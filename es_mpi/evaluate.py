"""Held-out evaluation: greedy, batched, the examples shared out across ranks.

Examples are cut into fixed batches of `batch_size` and batch b goes to rank b mod K, so
a batch holds the same rows whatever the number of ranks. One allgather of (example,
reward) rows gives rank 0 all scores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from es_mpi import model as hf
from es_mpi.errors import EsError
from es_mpi.rewards import score

EVAL_ROW = np.dtype([("example", "i8"), ("reward", "f8"), ("tokens", "i8"), ("status", "i4")])


@dataclass
class EvalResult:
    n: int
    mean_reward: float
    accuracy: float          # NaN when the task has no notion of solved
    seconds: float
    rewards: np.ndarray

    def summary(self) -> str:
        acc = "" if np.isnan(self.accuracy) else f", accuracy {self.accuracy:.3f}"
        return f"mean reward {self.mean_reward:.4g}{acc} on {self.n} held-out examples"


def evaluate(s, examples: list, batch_size: int) -> EvalResult:
    """Score the replica's current weights (unperturbed) on `examples`; collective."""
    t0 = time.perf_counter()
    dist = s.dist
    batches = [list(range(i, min(i + batch_size, len(examples))))
               for i in range(0, len(examples), batch_size)]
    mine = batches[dist.rank::dist.size]
    rows = np.zeros(sum(len(b) for b in mine), dtype=EVAL_ROW)
    error = None
    k = 0
    for batch_ids in mine:
        batch_examples = [examples[j] for j in batch_ids]
        prompts = [s.task.prompt(e, s.tokenizer) for e in batch_examples]
        enc = hf.encode_prompts(s.tokenizer, prompts, s.device, s.task.templated(s.tokenizer))
        texts, tokens = hf.generate(s.model, s.tokenizer, enc, s.cfg.max_new_tokens)
        rewards, error = score(s.task, texts, batch_examples, s.cfg.reward_timeout,
                               f"held-out examples {batch_ids[0]}..{batch_ids[-1]}, "
                               f"rank {dist.rank}")
        if error:
            rows["status"] = 1
            break
        for j, r, n in zip(batch_ids, rewards, tokens, strict=True):
            rows[k] = (j, r, n, 0)
            k += 1
    counts = [sum(len(b) for b in batches[r::dist.size]) for r in range(dist.size)]
    gathered = dist.allgather_rows(rows, counts)
    if (gathered["status"] != 0).any():
        dist.agree(error)
    gathered = gathered[np.argsort(gathered["example"], kind="stable")]
    rewards_e = gathered["reward"]
    if s.task.solved_reward is None:
        accuracy = float("nan")
    else:
        accuracy = float(np.mean(rewards_e >= s.task.solved_reward))
    return EvalResult(n=len(examples), mean_reward=float(rewards_e.mean()), accuracy=accuracy,
                      seconds=time.perf_counter() - t0, rewards=rewards_e)


def eval_examples(task, limit: int) -> list:
    examples = task.eval_examples()
    if not examples:
        raise EsError(f"task {task.name} has no held-out (eval) examples")
    return examples[:limit] if limit else examples
