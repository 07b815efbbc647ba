"""The generation loop, on every rank (docs/design.md, "One generation").

One generation t:
    seeds_n, signs_n = member_seeds(seed, t)       derived, never random state
    rewards of my members                          an evaluator (es_mpi.evaluators)
    rows = allgather(member, seed, reward, ...)    the only collective of the data
    z_n = shape(rewards_n)                         over the whole population
    theta += lr/N * sum_i z_i sign_i eps_i         same on every rank, in member order
    checksum and stop signals                      a second allgather of 4 int64
Rank 0 then appends the generation to the run file and commits it (es_mpi.record); a
due checkpoint is written by a thread of rank 0 during the next generation's evaluation
(which leaves the master alone) and commits its generation when complete; rank 0 waits
for it before its next update.
"""

from __future__ import annotations

import functools
import signal
import time

import numpy as np

from es_mpi import memory, progress, record, runfile
from es_mpi import model as hf
from es_mpi.diagnostics import generation_diagnostics
from es_mpi.errors import EsError
from es_mpi.evaluators import REWARD_ERROR, SKIPPED, groups_of, member_groups, score_members
from es_mpi.noise import member_seeds
from es_mpi.record import finish_checkpoint, held_out, write_checkpoint, write_generation
from es_mpi.session import Session, prompt_ids_for
from es_mpi.shaping import shape
from es_mpi.stop import Stopped
from es_mpi.timing import PhaseTimer
from es_mpi.tracking import TensorBoard


def run_generation(s: Session, t: int,
                   writer: runfile.RunWriter | None = None) -> tuple[dict, int]:
    """Evaluate, gather, shape, update: (the generation's run-file row, stop signal).
    Raises Stopped (on every rank) if the generation was abandoned for a stop signal.
    `writer` (rank 0): its checkpoint in flight, written while this generation evaluated,
    is waited for before the update changes the master (the wait counts as time_io)."""
    cfg, dist = s.cfg, s.dist
    timer, moved = PhaseTimer(s.devices), dist.bytes_moved
    memory.reset_peak(s.devices)
    seeds_n, signs_n = member_seeds(cfg.seed, t, cfg.population, cfg.antithetic)
    prompt_ids = prompt_ids_for(cfg, t, len(s.train))
    examples = [s.train[j] for j in prompt_ids]
    batch = hf.encode_prompts(s.tokenizer, [s.task.prompt(e, s.tokenizer) for e in examples],
                              s.device, s.task.templated(s.tokenizer))
    groups = member_groups(cfg)
    with timer("eval"):
        mine, error = score_members(s, groups_of(dist.rank, dist.size, groups), seeds_n,
                                    signs_n, examples, batch, timer)
    peak_eval = memory.peak_bytes(s.devices)
    memory.reset_peak(s.devices)
    with timer("gather"):
        counts = [sum(map(len, groups_of(r, dist.size, groups))) for r in range(dist.size)]
        rows = dist.allgather_rows(mine, counts)
        rows = rows[np.argsort(rows["member"], kind="stable")]
        _check_rows(s, rows, seeds_n, error, t)
    rewards_n = rows["reward"].astype(np.float64)
    due = (t + 1) % cfg.checksum_every == 0
    if writer is not None:
        with timer("io"):
            finish_checkpoint(writer)
    with timer("update"):  # with the checksum when due or on rank 0 (the run file's)
        z_n = shape(rewards_n, cfg.shaping)
        summed = s.replica.update(seeds_n, signs_n, z_n, cfg.lr, cfg.weight_decay, s.anchor,
                                 with_checksum=due or dist.is_root)
    with timer("checksum"):
        check, stop, peaks = _agree_after_update(s, t, summed or 0, due, peak_eval)
    row = {"seeds": seeds_n, "signs": signs_n, "rewards": rewards_n, "tokens": rows["tokens"],
           "eval_seconds": rows["seconds"], "eval_rank": rows["rank"], "prompt_ids": prompt_ids,
           "reward_mean": rewards_n.mean(), "reward_std": rewards_n.std(),
           "reward_min": rewards_n.min(), "reward_max": rewards_n.max(), "checksum": check,
           "world_size": dist.size, "comm_bytes": dist.bytes_moved - moved,
           "peak_mem_eval": peaks[0], "peak_mem_update": peaks[1],
           **generation_diagnostics(rewards_n, seeds_n, signs_n, z_n, cfg.lr, cfg.antithetic)}
    for phase in ("eval", "perturb", "generate", "score", "gather", "update", "checksum"):
        row[f"time_{phase}"] = timer[phase]
    # rank 0 writing (es_mpi.record), after any wait for the previous checkpoint
    row.update(time_io=timer["io"], time_total=0.0, timestamp=0.0)
    return row, stop


def _check_rows(s: Session, rows: np.ndarray, seeds_n: np.ndarray, error: str | None,
                t: int) -> None:
    """Every rank raises alike: a reward error, a stop, or rows that do not add up."""
    if (rows["status"] == REWARD_ERROR).any():
        s.dist.agree(error)  # every rank raises the failing rank's message
    if (rows["status"] == SKIPPED).any():
        signum = next((sig for sig in s.dist.allgather(s.stop.signum) if sig), signal.SIGTERM)
        raise Stopped(signum, t)
    if not (np.array_equal(rows["member"], np.arange(len(seeds_n)))
            and np.array_equal(rows["seed"], seeds_n)):
        raise RuntimeError(f"generation {t}: gathered rows do not match the member seeds")


def _agree_after_update(s: Session, t: int, check: int, due: bool,
                        peak_eval: int) -> tuple[int, int, list[int]]:
    """The second collective: weight checksums when due (replicas must agree), any rank's
    stop signal and the ranks' peak memory. Returns (checksum or 0, signal, peaks)."""
    status = s.dist.allgather_ints([check if due else 0, s.stop.signum, peak_eval,
                                    memory.peak_bytes(s.devices)])
    bad = [r for r, c in enumerate(status[:, 0]) if c != status[0, 0]]
    if due and bad:
        raise EsError(f"replicas diverged after generation {t}: weight checksum of rank(s) "
                      f"{', '.join(map(str, bad))} differs from rank 0; stop and resume "
                      "from the run file (hardware fault or nondeterministic kernel?)")
    stop = next((int(sig) for sig in status[:, 1] if sig), 0)
    return check, stop, [int(status[:, 2].max()), int(status[:, 3].max())]


def train_loop(s: Session, writer: runfile.RunWriter | None, start: int, fresh: bool,
               board: TensorBoard | None = None) -> None:
    """Generations start..G-1; `fresh`: a new run, its base model scored first on the
    held-out split. On a stop signal: rank 0 checkpoints, then Stopped on every rank.
    `board`: rank 0's TensorBoard writer (--tensorboard), fed as generations commit."""
    try:
        _generations(s, writer, start, fresh, board)
        finish_checkpoint(writer)  # the last generation's
    except Stopped as stopped:
        finish_checkpoint(writer)
        if writer is not None and stopped.complete > 0:
            if stopped.complete not in runfile.checkpoint_list(writer.f):
                write_checkpoint(s, writer, stopped.complete, s.replica.checksum())
            writer.f.flush()
        raise
    except BaseException:
        if writer is not None and writer.pending is not None:
            writer.pending.wait()  # its generation is committed if it completes; an
            writer.pending = None  # error of its own is second to the one raised here
        raise


def _generations(s: Session, writer: runfile.RunWriter | None, start: int, fresh: bool,
                 board: TensorBoard | None) -> None:
    every, total = s.cfg.eval_every, s.cfg.generations
    show = progress.current(s.dist.is_root)  # rank 0's lines (--quiet/--verbose)
    if every and fresh:
        result = held_out(s, writer, 0)
        if writer is not None:
            writer.f.flush()
        if board is not None:
            board.held_out(0, result)
        show.info(f"gen 0: held-out {result.summary()}")
    for t in range(start, total):
        t_start = time.perf_counter()
        with show.running(t, total):  # a live status line on a terminal
            row, stop = run_generation(s, t, writer)
            done, result = t + 1, None
            if not stop and every and (done % every == 0 or done == total):
                result = held_out(s, writer, done)
            if s.dist.is_root:  # the board after the commit: never ahead of the run file
                write_generation(s, writer, t, row, t_start, record.BACKGROUND,
                                 None if board is None else
                                 functools.partial(_publish, board, t, row, done, result))
        if s.dist.is_root:
            show.generation(t, total, row, None if result is None else result.summary())
        if stop:
            raise Stopped(stop, done)


def _publish(board: TensorBoard, t: int, row: dict, done: int, result) -> None:
    """Generation t on the TensorBoard, once the run file has committed it."""
    board.generation(t, row)
    if result is not None:
        board.held_out(done, result)
    board.flush()
