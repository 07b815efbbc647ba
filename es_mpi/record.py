"""What rank 0 writes into the run file as a run goes: generations, checkpoints and
held-out evaluations. A generation counts once it is committed (es_mpi.runfile).

Checkpoints off the critical path: the training loop has a due checkpoint written by a
thread of rank 0 (`InFlight`) while every rank goes on with the next generation's
evaluation, which never changes the fp32 master (full mode writes master + noise into
the parameters, a separate copy; lowrank mode never writes the weights at all). The
thread writes the checkpoint, then commits its generation: a generation still counts
only once its checkpoint is complete and flushed. Rank 0 waits for the thread
(`finish_checkpoint`) before its next update changes the master, and before any other
use of the run file, so the thread is the file's only user while it runs (h5py
releases the GIL while it writes, so the evaluation goes on beside it).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping

import torch

from es_mpi import runfile
from es_mpi.basefile import BaseWeights
from es_mpi.heldout import EvalResult, eval_examples, evaluate
from es_mpi.session import kl_base_model

BACKGROUND = True  # the training loop writes checkpoints in a thread (False: in line)


class InFlight:
    """One checkpoint being written, and its generation committed, by a thread."""

    def __init__(self, generation: int, work: Callable[[], None]):
        self.generation = generation
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), daemon=False,
                                        name=f"es-mpi checkpoint {generation}")
        self._thread.start()

    def _run(self, work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 (raised again by finish_checkpoint)
            self.error = exc

    def wait(self) -> None:
        self._thread.join()


def finish_checkpoint(writer: runfile.RunWriter | None) -> None:
    """Wait for the checkpoint in flight, if any: its generation is committed after, or
    its error is raised here (on rank 0 alone, as an in-line write would)."""
    pending = None if writer is None else writer.pending
    if pending is None:
        return
    writer.pending = None
    pending.wait()
    if pending.error is not None:
        raise pending.error


def write_generation(s, writer: runfile.RunWriter, t: int, row: dict, t_start: float,
                     background: bool = False, then: Callable[[], None] | None = None) -> None:
    """Rank 0: append the row, checkpoint if due, then commit (the generation now counts),
    then `then()`. `background`: a due checkpoint is written, and the generation committed,
    by a thread (`InFlight`, es_mpi.loop waits for it before the next update). The row's
    time_io adds rank 0's own time on the file to what it holds (a wait for the previous
    checkpoint)."""
    finish_checkpoint(writer)
    t_io = time.perf_counter()
    row["timestamp"] = time.time()
    writer.append_generation(t, row)
    done = t + 1
    due = done % s.cfg.checkpoint_every == 0 or done == s.cfg.generations
    if due and not background:
        write_checkpoint(s, writer, done, int(row["checksum"]))
    row["time_io"] = row.get("time_io", 0.0) + time.perf_counter() - t_io
    row["time_total"] = time.perf_counter() - t_start
    writer.set_field(t, "time_io", row["time_io"])
    writer.set_field(t, "time_total", row["time_total"])
    if due and background:
        ready = _queued(s.devices)

        def work() -> None:
            with _own_streams(ready):
                write_checkpoint(s, writer, done, int(row["checksum"]), verify=True)
            writer.commit(t)
            if then is not None:
                then()
        writer.pending = InFlight(done, work)
        return
    writer.commit(t)
    if then is not None:
        then()


def _queued(devices) -> list[tuple[torch.device, torch.cuda.Event]]:
    """CUDA: an event after the work queued so far on each device (the update)."""
    return [(d, torch.cuda.current_stream(d).record_event()) for d in set(devices)
            if d.type == "cuda"]


@contextlib.contextmanager
def _own_streams(ready: list[tuple[torch.device, torch.cuda.Event]]) -> Iterator[None]:
    """The thread's device-to-host copies on streams of its own, after `ready`: beside the
    evaluation's kernels rather than queued between them."""
    with contextlib.ExitStack() as stack:
        for device, event in ready:
            stream = torch.cuda.Stream(device=device)
            stream.wait_event(event)
            stack.enter_context(torch.cuda.stream(stream))
        yield


def write_checkpoint(s, writer: runfile.RunWriter, generation: int, check: int,
                     verify: bool = False) -> None:
    writer.write_checkpoint(generation, check, s.replica.master, base_rows(s.base),
                            s.cfg.keep_checkpoints, verify)


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
    finish_checkpoint(writer)  # (none in flight here: the loop waited before the update)
    base = kl_base_model(s) if s.cfg.eval_kl else None
    result = evaluate(s, eval_examples(s.task, s.cfg.eval_limit), s.cfg.eval_batch_size,
                      base_model=base)
    if writer is not None:
        writer.append_eval({"generation": generation, "mean_reward": result.mean_reward,
                            "accuracy": result.accuracy, "n_examples": result.n,
                            "seconds": result.seconds, "kl": result.kl}, result.completions)
    return result
