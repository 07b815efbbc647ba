"""A finished run in numbers, read from its run file alone: what `es-mpi train` prints
when it is done, and what `es-mpi report` (es_mpi.tooling.report) builds its summary on."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from es_mpi import runfile
from es_mpi.errors import EsError
from es_mpi.progress import format_seconds


@dataclass
class Run:
    """One run file's data, as the report uses it."""

    path: Path
    info: runfile.RunInfo
    gens: dict[str, np.ndarray]
    evals: dict[str, np.ndarray]
    label: str = ""   # what sets this run apart from the others in the report
    group: str = ""   # label of its group (runs that differ only by seed)

    @property
    def config(self) -> dict:
        return json.loads(self.info.config.to_json())

    @property
    def done(self) -> int:
        return self.info.complete_generations

    @property
    def x(self) -> np.ndarray:
        """Generation numbers as the progress lines print them: 1..G."""
        return np.arange(1, self.done + 1)


def load_run(path: str | Path) -> Run:
    path = Path(path)
    info = runfile.read_info(path)
    if info.complete_generations == 0:
        raise EsError(f"run file {path} has no complete generation yet; nothing to report")
    short = str(Path(path.parent.name, path.name)) if path.parent.name else path.name
    return Run(path=path, info=info, gens=runfile.read_generations(path),
               evals=runfile.read_evals(path), label=short, group=short)


def run_stats(run: Run) -> dict:
    """The numbers of a run the summary (and the final line of `es-mpi train`) quote."""
    g = run.gens
    mean = g["reward_mean"]
    best = int(np.argmax(mean))
    total = float(np.sum(g["time_total"]))
    eval_time = float(np.sum(g["time_eval"]))
    stats = {
        "generations": run.done, "target": run.info.config.generations,
        "first_mean": float(mean[0]), "last_mean": float(mean[-1]),
        "best_mean": float(mean[best]), "best_generation": best + 1,
        "seconds": total, "seconds_per_generation": total / run.done,
        "tokens_per_second": float(np.sum(g["tokens"])) / eval_time if eval_time > 0 else 0.0,
        "heldout": None,
    }
    ev = run.evals
    if len(ev["generation"]):
        acc = ev["accuracy"]
        stats["heldout"] = {
            "first_generation": int(ev["generation"][0]), "first": float(ev["mean_reward"][0]),
            "last_generation": int(ev["generation"][-1]), "last": float(ev["mean_reward"][-1]),
            "first_accuracy": float(acc[0]) if np.isfinite(acc[0]) else None,
            "last_accuracy": float(acc[-1]) if np.isfinite(acc[-1]) else None,
            "first_kl": float(ev["kl"][0]) if np.isfinite(ev["kl"][0]) else None,
            "last_kl": float(ev["kl"][-1]) if np.isfinite(ev["kl"][-1]) else None,
        }
    return stats


def summary_line(path: str | Path) -> str:
    """One line on a finished run: rewards first -> last, best, held-out, and the time of
    every generation of the run, all its sessions together (after a resume, too)."""
    stats = run_stats(load_run(path))
    line = (f"{stats['generations']} generations, reward mean {stats['first_mean']:.4g} -> "
            f"{stats['last_mean']:.4g} (best {stats['best_mean']:.4g} at generation "
            f"{stats['best_generation']}), {format_seconds(stats['seconds'])} in all")
    if stats["heldout"] is not None:
        h = stats["heldout"]
        line += f"; held-out {h['first']:.4g} -> {h['last']:.4g}"
    return line
