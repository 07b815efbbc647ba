"""Optional experiment tracking: a run's per-generation scalars and held-out evaluations
as TensorBoard event files (`--tensorboard DIR`), written by rank 0 as the run goes.

The run file stays the record; the event files are a view of it for the tools people
already watch runs with (TensorBoard itself; `wandb sync --sync-tensorboard DIR` imports
them into W&B). The step of every point is the generation it describes, so a resumed run
continues the same curves. tensorboard is not a dependency of es-mpi: `check` refuses
the option, before any model is loaded, where it is not installed.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

from es_mpi.errors import EsError

# scalars of a generation's run-file row, by tag (arrays and bookkeeping are left out)
GENERATION_TAGS = {
    "reward/mean": "reward_mean", "reward/std": "reward_std",
    "reward/min": "reward_min", "reward/max": "reward_max",
    "diagnostics/pair_disagree": "pair_disagree", "diagnostics/pair_gap": "pair_gap",
    "diagnostics/distinct_rewards": "distinct_rewards",
    "diagnostics/update_coef_norm": "update_coef_norm",
    "comm/bytes": "comm_bytes",
    "memory/peak_eval": "peak_mem_eval", "memory/peak_update": "peak_mem_update",
    "time/total": "time_total", "time/eval": "time_eval", "time/generate": "time_generate",
    "time/score": "time_score", "time/gather": "time_gather", "time/update": "time_update",
    "time/checksum": "time_checksum", "time/io": "time_io",
}


def check(directory: str) -> None:
    """Cheap, on every rank, before any model loads: the option's package is installed
    and the directory can be made where it is asked for (else one error line)."""
    if not directory:
        return
    if importlib.util.find_spec("tensorboard") is None:
        raise EsError("--tensorboard needs the tensorboard package, which is not installed: "
                      "pip install tensorboard (or es-mpi[track]), or leave the option out")
    path = Path(directory)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise EsError(f"--tensorboard {directory}: {existing} exists and is not a directory; "
                      "give a directory path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise EsError(f"--tensorboard {directory}: no permission to write in {existing}; "
                      "give a directory you can write")


class TensorBoard:
    """Rank 0's event-file writer."""

    def __init__(self, directory: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(directory))

    def generation(self, t: int, row: dict) -> None:
        """Generation t's scalars at step t + 1 (the weights after t + 1 generations)."""
        for tag, field in GENERATION_TAGS.items():
            if field in row:
                self._scalar(tag, row[field], t + 1)
        tokens, seconds = float(row["tokens"].sum()), float(row["time_generate"])
        if seconds > 0:
            self._scalar("time/tokens_per_second", tokens / seconds, t + 1)

    def held_out(self, generation: int, result) -> None:
        """A held-out evaluation of the weights after `generation` generations."""
        self._scalar("held_out/mean_reward", result.mean_reward, generation)
        self._scalar("held_out/accuracy", result.accuracy, generation)
        self._scalar("held_out/kl", result.kl, generation)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def _scalar(self, tag: str, value, step: int) -> None:
        value = float(value)
        if math.isfinite(value):  # NaN means "not measured" in the run file
            self.writer.add_scalar(tag, value, step)
