"""Scoring a rank's members: the full and lowrank evaluators behind one interface.

An evaluator turns one group of members into completions of the generation's prompts,

    completions(group, seeds_n, signs_n, batch, timer) -> [(texts, tokens) per member]

and `restore()` leaves the weights at theta. `FullEvaluator` writes each member's
perturbation into every parameter and generates member by member (the paper's
algorithm); `LowRankEvaluator` adds the group's rank-r perturbations inside one batched
generate on unmodified weights (es_mpi.lowrank). `score_members` runs a rank's groups
through either and scores the completions with the task.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np

from es_mpi import lowrank
from es_mpi.rewards import score
from es_mpi.timing import PhaseTimer

ROW_DTYPE = np.dtype([("member", "i8"), ("seed", "i8"), ("reward", "f8"), ("tokens", "i8"),
                      ("seconds", "f8"), ("rank", "i4"), ("status", "i4")])
OK, REWARD_ERROR, SKIPPED = 0, 1, 2  # row status: SKIPPED = not evaluated (stop requested)


def member_groups(cfg) -> list[list[int]]:
    """The population cut into fixed groups, the unit dealt to ranks.

    lowrank: `member_batch` members share one batched generate. full: antithetic pairs
    stay together (the mirror costs no noise), else single members. The groups do not
    depend on the number of ranks, so neither do the batches nor the rewards.
    """
    pair = 2 if cfg.antithetic else 1
    size = cfg.member_batch if cfg.mode == "lowrank" else pair
    n = cfg.population
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def groups_of(rank: int, world: int, groups: list[list[int]]) -> list[list[int]]:
    """Round-robin dealing: group g is evaluated by rank g % world."""
    return groups[rank::world]


class FullEvaluator:
    """Per member: theta + sigma * sign * eps written into the weights, then one generate."""

    def __init__(self, s):
        self.s = s

    def completions(self, group: list[int], seeds_n, signs_n, batch: dict,
                    timer: PhaseTimer) -> list[tuple[list[str], list[int]]]:
        out = []
        for i in group:
            with timer("perturb"):
                self.s.replica.perturb(int(seeds_n[i]), int(signs_n[i]), self.s.cfg.sigma)
            with timer("generate"):
                out.append(self.s.generate(batch))
        return out

    def restore(self) -> None:
        self.s.replica.restore()


class LowRankEvaluator:
    """The group's members x prompts in one generate on unmodified weights: rows
    [k*P, (k+1)*P) see member k's perturbation, added inside the forward pass.

    One evaluator per generation: it has the replica's noise keep the factors it draws,
    so the update reuses them instead of drawing them again (LowRankNoise.keep_draws)."""

    def __init__(self, s):
        self.s = s
        s.replica.noise.keep_draws()

    def completions(self, group: list[int], seeds_n, signs_n, batch: dict,
                    timer: PhaseTimer) -> list[tuple[list[str], list[int]]]:
        s, m, p = self.s, len(group), batch["input_ids"].shape[0]
        big = {k: v.repeat(m, 1) for k, v in batch.items()}  # member-major rows
        with contextlib.ExitStack() as hooks:
            with timer("perturb"):
                rows = hooks.enter_context(lowrank.population(
                    s.matrices, s.replica.master, s.replica.noise,
                    [int(seeds_n[i]) for i in group], [int(signs_n[i]) for i in group],
                    s.cfg.sigma, rows=m * p))
            with timer("generate"):
                texts, tokens = s.generate(big, rows.select, unit=p)
        return [(texts[k * p:(k + 1) * p], tokens[k * p:(k + 1) * p]) for k in range(m)]

    def restore(self) -> None:
        """Nothing to do: the weights were never touched."""


def evaluator_for(s) -> FullEvaluator | LowRankEvaluator:
    return LowRankEvaluator(s) if s.cfg.mode == "lowrank" else FullEvaluator(s)


def score_members(s, groups: list[list[int]], seeds_n: np.ndarray, signs_n: np.ndarray,
                  examples: list, batch: dict, timer: PhaseTimer) -> tuple[np.ndarray, str | None]:
    """This rank's groups of members, scored on the batch of prompts: (rows in member
    order, the first reward error or None). Stops early, rows SKIPPED, when a stop is
    requested; at a reward error, the failing row is REWARD_ERROR."""
    members = [i for g in groups for i in g]
    rows = np.zeros(len(members), dtype=ROW_DTYPE)
    rows["member"], rows["seed"], rows["rank"] = members, seeds_n[members], s.dist.rank
    evaluator = evaluator_for(s)
    k = 0
    try:
        for group in groups:
            if s.stop.requested:  # abandon the generation: every rank sees SKIPPED rows
                rows["status"][k:] = SKIPPED
                return rows, None
            t0 = time.perf_counter()
            done = evaluator.completions(group, seeds_n, signs_n, batch, timer)
            with timer("score"):
                for i, (texts, tokens) in zip(group, done, strict=True):
                    rewards, error = score(s.task, texts, examples, s.cfg.reward_timeout,
                                           f"member {i}, rank {s.dist.rank}")
                    if error:
                        rows[k]["status"] = REWARD_ERROR
                        return rows, error
                    rows[k]["reward"] = float(np.mean(rewards))
                    rows[k]["tokens"] = sum(tokens)
                    k += 1
            rows["seconds"][k - len(group):k] = (time.perf_counter() - t0) / len(group)
    finally:
        evaluator.restore()
    return rows, None
