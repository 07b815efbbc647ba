"""Held-out evaluation: greedy (or seeded sampling), batched, the examples shared out
across ranks.

Examples are cut into fixed batches of `batch_size` and batch b goes to rank b mod K, so
a batch holds the same rows whatever the number of ranks. Sampled evaluation draws
sample k of batch b with the seed (seed, b's first example, k), so it too is the same on
any number of ranks. One allgather of (example, sample, reward) rows, and one of the
completions, gives rank 0 everything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from es_mpi import model as hf
from es_mpi.errors import EsError
from es_mpi.kl import batch_kl
from es_mpi.noise import derive_seed
from es_mpi.rewards import score

EVAL_ROW = np.dtype([("example", "i8"), ("sample", "i8"), ("reward", "f8"), ("tokens", "i8"),
                     ("status", "i4"), ("kl", "f8")])
KL_ROWS = 4  # rows per teacher-forced forward pass for the KL: (rows, tokens, vocab) logits


@dataclass
class EvalResult:
    n: int
    mean_reward: float       # over examples (and samples)
    accuracy: float          # share solved (greedy) or pass@K (sampled); NaN without "solved"
    seconds: float
    rewards: np.ndarray      # (n,) greedy, (n, K) sampled
    completions: list        # per example: its completion (greedy) or its K samples
    samples: int = 0         # K, or 0 for greedy decoding
    kl: float = float("nan")  # mean per-token KL to the base model (es_mpi.kl); NaN: none
    kls: np.ndarray | None = None  # (n,) each example's per-token KL, where measured

    def summary(self) -> str:
        if self.samples:
            acc = "" if np.isnan(self.accuracy) else f", pass@{self.samples} {self.accuracy:.3f}"
            return (f"mean reward {self.mean_reward:.4g}{acc} over {self.samples} samples of "
                    f"each of {self.n} held-out examples")
        acc = "" if np.isnan(self.accuracy) else f", accuracy {self.accuracy:.3f}"
        kl = "" if np.isnan(self.kl) else f", KL to base {self.kl:.4g} nats/token"
        return f"mean reward {self.mean_reward:.4g}{acc}{kl} on {self.n} held-out examples"


def evaluate(s, examples: list, batch_size: int, samples: int = 0, temperature: float = 1.0,
             seed: int = 0, base_model=None) -> EvalResult:
    """Score the replica's current weights (unperturbed) on `examples`; collective.

    samples = 0: greedy decoding. samples = K: K seeded samples per example at
    `temperature`, reported as the mean reward and pass@K. `base_model` (greedy only): also
    the per-token KL of the replica to it along each greedy completion (es_mpi.kl).
    """
    with_kl = base_model is not None and not samples
    t0 = time.perf_counter()
    dist = s.dist
    draws = max(samples, 1)
    if s.cfg.generate_batch:  # the memory bound holds here too (samples follow the batch)
        batch_size = min(batch_size, s.cfg.generate_batch)
    batches = [list(range(i, min(i + batch_size, len(examples))))
               for i in range(0, len(examples), batch_size)]
    mine = batches[dist.rank::dist.size]
    rows = np.zeros(sum(len(b) for b in mine) * draws, dtype=EVAL_ROW)
    texts_mine: list[str] = []
    error = None
    k = 0
    for batch_ids in mine:
        batch_examples = [examples[j] for j in batch_ids]
        prompts = [s.task.prompt(e, s.tokenizer) for e in batch_examples]
        enc = hf.encode_prompts(s.tokenizer, prompts, s.device, s.task.templated(s.tokenizer))
        for draw in range(draws):
            sampling = None if not samples else hf.Sampling(
                temperature, derive_seed(seed, "eval-sample", batch_ids[0], draw))
            texts, tokens, new_ids = hf.generate(s.model, s.tokenizer, enc,
                                                 s.cfg.max_new_tokens, sampling=sampling,
                                                 return_ids=True)
            kls = _kls(s.model, base_model, enc, new_ids, tokens) if with_kl else \
                [float("nan")] * len(tokens)
            rewards, error = score(s.task, texts, batch_examples, s.cfg.reward_timeout,
                                   f"held-out examples {batch_ids[0]}..{batch_ids[-1]}, "
                                   f"rank {dist.rank}")
            if error:
                rows["status"] = 1
                break
            for j, r, n, kl in zip(batch_ids, rewards, tokens, kls, strict=True):
                rows[k] = (j, draw, r, n, 0, kl)
                k += 1
            texts_mine.extend(texts)
        if error:
            break
    counts = [sum(len(b) for b in batches[r::dist.size]) * draws for r in range(dist.size)]
    gathered = dist.allgather_rows(rows, counts)
    if (gathered["status"] != 0).any():
        dist.agree(error)
    texts_all = [t for part in dist.allgather(texts_mine) for t in part]
    order = np.lexsort((gathered["sample"], gathered["example"]))
    rewards_ek = gathered["reward"][order].reshape(len(examples), draws)
    kls = gathered["kl"][order] if with_kl else None
    texts_ek = [texts_all[i] for i in order]
    completions = [texts_ek[e * draws:(e + 1) * draws] for e in range(len(examples))]
    if s.task.solved_reward is None:
        accuracy = float("nan")
    else:
        accuracy = float(np.mean((rewards_ek >= s.task.solved_reward).any(axis=1)))
    return EvalResult(n=len(examples), mean_reward=float(rewards_ek.mean()), accuracy=accuracy,
                      seconds=time.perf_counter() - t0,
                      rewards=rewards_ek if samples else rewards_ek[:, 0],
                      completions=completions if samples else [c[0] for c in completions],
                      samples=samples, kl=float(kls.mean()) if with_kl else float("nan"),
                      kls=kls)


def _kls(model, base_model, enc: dict, new_ids, tokens: list[int]) -> list[float]:
    """Each row's per-token KL to the base model, KL_ROWS rows per forward pass."""
    out: list[float] = []
    for r0 in range(0, len(tokens), KL_ROWS):
        part = {k: v[r0:r0 + KL_ROWS] for k, v in enc.items()}
        out += batch_kl(model, base_model, part, new_ids[r0:r0 + KL_ROWS],
                        tokens[r0:r0 + KL_ROWS])
    return out


def eval_examples(task, limit: int) -> list:
    examples = task.eval_examples()
    if not examples:
        raise EsError(f"task {task.name} has no held-out (eval) examples")
    return examples[:limit] if limit else examples
