"""What rank 0 writes into the run file as a run goes: generations, checkpoints and
held-out evaluations. A generation counts once it is committed (es_mpi.runfile)."""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch

from es_mpi import runfile
from es_mpi.basefile import BaseWeights
from es_mpi.evaluate import EvalResult, eval_examples, evaluate
from es_mpi.session import kl_base_model


def write_generation(s, writer: runfile.RunWriter, t: int, row: dict, t_start: float) -> None:
    """Rank 0: append the row, checkpoint if due, then commit (the generation now counts)."""
    t_io = time.perf_counter()
    row["timestamp"] = time.time()
    writer.append_generation(t, row)
    done = t + 1
    if done % s.cfg.checkpoint_every == 0 or done == s.cfg.generations:
        write_checkpoint(s, writer, done, int(row["checksum"]))
    row["time_io"] = time.perf_counter() - t_io
    row["time_total"] = time.perf_counter() - t_start
    writer.set_field(t, "time_io", row["time_io"])
    writer.set_field(t, "time_total", row["time_total"])
    writer.commit(t)


def write_checkpoint(s, writer: runfile.RunWriter, generation: int, check: int) -> None:
    writer.write_checkpoint(generation, check, s.replica.master, base_rows(s.base),
                            s.cfg.keep_checkpoints)


def base_rows(base: Mapping[str, torch.Tensor]):
    """rows(name, r0, r1) of theta_0, each tensor seen as (first axis, rest)."""
    if isinstance(base, BaseWeights):
        return base.rows

    def rows(name: str, r0: int, r1: int) -> torch.Tensor:
        return runfile.as_rows(base[name])[r0:r1].to("cpu", torch.float32)
    return rows


def held_out(s, writer: runfile.RunWriter | None, generation: int) -> EvalResult:
    """Evaluate the current weights on the held-out split (collective); rank 0 records
    it (uncommitted: it counts with the generation's commit)."""
    base = kl_base_model(s) if s.cfg.eval_kl else None
    result = evaluate(s, eval_examples(s.task, s.cfg.eval_limit), s.cfg.eval_batch_size,
                      base_model=base)
    if writer is not None:
        writer.append_eval({"generation": generation, "mean_reward": result.mean_reward,
                            "accuracy": result.accuracy, "n_examples": result.n,
                            "seconds": result.seconds, "kl": result.kl}, result.completions)
    return result
