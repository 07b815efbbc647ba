"""`es-mpi report`: PNG plots and a markdown summary of one or more run files.

One run file gives:
    reward.png    population reward per generation: mean, +- std band, min-max band
    heldout.png   held-out score after each evaluation (--eval-every), if any, and the
                  per-token KL to the base model where it was measured
    diagnostics.png  mirrored-pair disagreement, distinct rewards, update size per
                  generation (es_mpi.diagnostics), if the file records them
    phases.png    where each generation's time went (stacked phases, seconds)
    ranks.png     seconds each rank spent evaluating its members (load balance)
    summary.md    config, best generation, final scores, total time, the plots

Several run files: reward.png and heldout.png overlay them, one line per group of runs
whose configs differ only by seed (mean over the seeds, band = min-max across seeds),
labelled by the config keys that differ between the files ("sigma=0.001"); phases.png
compares the mean time per generation of each run; each run's own plots go to a
subdirectory. Reads the files with es_mpi.runfile alone (no torch, no model); matplotlib
draws off-screen (Agg), so it works on a cluster node without a display.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from es_mpi import __version__
from es_mpi.config import Config
from es_mpi.errors import EsError
from es_mpi.progress import format_seconds, phase_fields
from es_mpi.summary import Run, load_run, run_stats, summary_line  # noqa: F401 (the report's API)

DPI = 100
SIZE = (7.0, 4.0)  # inches: 700 x 400 px at DPI
MAX_RANK_LINES = 8  # more ranks: median line and min-max band instead of one line each
# legend names of the phase timings (time_<name>); unknown ones show as their name
PHASE_NAMES = {"eval": "evaluate members", "gather": "gather rewards",
               "update": "update weights", "checksum": "weight checksum",
               "io": "write run file / checkpoint"}
OTHER_PHASE = "other (held-out eval, ...)"
TRAJECTORY_KEYS = [f.name for f in dataclasses.fields(Config) if not f.metadata["resumable"]]


@dataclass
class Report:
    """What `write_report` wrote: files, and the legend labels of each plot (for tests)."""

    out_dir: Path
    files: list[Path] = field(default_factory=list)
    legends: dict[str, list[str]] = field(default_factory=dict)


# -- labels and groups -----------------------------------------------------------------

def _value_text(key: str, value) -> str:
    if key in ("model", "task_data") and value:
        return Path(value).name
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _identity(run: Run) -> dict[str, str]:
    """The settings that shape a run's weights, plus the base model's fingerprint."""
    config = run.config
    values = {k: _value_text(k, config[k]) for k in TRAJECTORY_KEYS}
    values["model"] = f"{Path(run.info.model_path).name} ({run.info.model_fingerprint[:8]})"
    return values


def label_runs(runs: list[Run]) -> None:
    """Label each run by the settings that differ between the runs (e.g. "sigma=0.001"),
    and its group by the same without the seed. Same settings: the file names label."""
    if len(runs) < 2:
        return
    ids = [_identity(r) for r in runs]
    keys = [k for k in ids[0] if len({i[k] for i in ids}) > 1]
    stems = [r.path.stem for r in runs]
    if len(set(stems)) < len(stems):
        stems = [f"{r.path.parent.name}/{r.path.stem}" for r in runs]
    for run, ident, stem in zip(runs, ids, stems, strict=True):
        run.label = ", ".join(f"{k}={ident[k]}" for k in keys) or stem
        run.group = ", ".join(f"{k}={ident[k]}" for k in keys if k != "seed")


def group_runs(runs: list[Run]) -> list[tuple[str, list[Run]]]:
    """Runs with the same group label, in the order first seen: [(legend label, runs)]."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    out = []
    for name, members in groups.items():
        seeds = {m.config["seed"] for m in members}
        if len(members) == 1:
            label = members[0].label
        else:
            what = f"{len(members)} seeds" if len(seeds) == len(members) else f"{len(members)} runs"
            label = f"{name} ({what})" if name else f"mean of {what}"
        out.append((label, members))
    return out


def _stack(series: list[np.ndarray]) -> np.ndarray:
    """Runs of different lengths as rows of one array, NaN-padded."""
    width = max(len(s) for s in series)
    out = np.full((len(series), width), np.nan)
    for i, s in enumerate(series):
        out[i, :len(s)] = s
    return out


# -- plots -----------------------------------------------------------------------------

def _duration(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 10 else format_seconds(seconds)


def _figure(nrows: int = 1, height: float = SIZE[1], integer_x: bool = True):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise EsError("es-mpi report needs matplotlib: pip install matplotlib") from None
    fig = Figure(figsize=(SIZE[0], height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # off-screen rendering, no display needed
    axes = fig.subplots(nrows, 1, sharex=True, squeeze=False)[:, 0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
        if integer_x:  # generation numbers
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, axes


def _save(fig, path: Path, report: Report, legends: list[str]) -> None:
    fig.savefig(path, dpi=DPI)
    report.files.append(path)
    report.legends[path.name] = legends


def _marker(n: int) -> str | None:
    return "o" if n <= 40 else None


def _width(n: int) -> float:
    return 1.5 if n <= 100 else 0.8  # long runs: thin lines that stay apart


def _config_line(run: Run) -> str:
    c = run.config
    extra = ", antithetic" if c["antithetic"] else ""
    return (f"task {c['task']}, N={c['population']}, sigma={c['sigma']:g}, lr={c['lr']:g}, "
            f"{c['max_new_tokens']} new tokens{extra}, seed {c['seed']}")


def plot_reward(runs: list[Run], path: Path, report: Report) -> None:
    fig, (ax,) = _figure()
    if len(runs) == 1:
        run = runs[0]
        g, x = run.gens, run.x
        mean, std = g["reward_mean"], g["reward_std"]
        ax.plot(x, mean, color="C0", marker=_marker(len(x)), markersize=4,
                linewidth=_width(len(x)), label="population mean")
        ax.fill_between(x, mean - std, mean + std, color="C0", alpha=0.3, linewidth=0,
                        label="mean \u00b1 std")
        ax.fill_between(x, g["reward_min"], g["reward_max"], color="C0", alpha=0.12,
                        linewidth=0, label="min \u2013 max over members")
        ax.set_title(f"Training reward per generation: {run.label}\n{_config_line(run)}",
                     fontsize=10)
    else:
        spread = False
        for k, (label, members) in enumerate(group_runs(runs)):
            means = _stack([m.gens["reward_mean"] for m in members])
            x = np.arange(1, means.shape[1] + 1)
            color = f"C{k % 10}"
            if len(members) > 1:
                spread = True
                ax.fill_between(x, np.nanmin(means, axis=0), np.nanmax(means, axis=0),
                                color=color, alpha=0.2, linewidth=0)
            ax.plot(x, np.nanmean(means, axis=0), color=color, marker=_marker(len(x)),
                    markersize=4, linewidth=_width(len(x)), label=label)
        note = "\nband: min \u2013 max across seeds" if spread else ""
        ax.set_title(f"Population mean reward per generation{note}", fontsize=10)
    ax.set_xlabel("generation")
    ax.set_ylabel("reward (mean over training prompts)")
    ax.legend(loc="best", fontsize=9)
    labels = ax.get_legend_handles_labels()[1]
    _save(fig, path, report, labels)


def _has_accuracy(runs: list[Run]) -> bool:
    return any(np.isfinite(r.evals["accuracy"]).any() for r in runs if len(r.evals["accuracy"]))


def _has_kl(runs: list[Run]) -> bool:
    return any(np.isfinite(r.evals["kl"]).any() for r in runs if len(r.evals["kl"]))


def plot_heldout(runs: list[Run], path: Path, report: Report) -> bool:
    """Held-out mean reward (and accuracy where the task has one); False if no evals."""
    runs = [r for r in runs if len(r.evals["generation"])]
    if not runs:
        return False
    metrics = [("mean_reward", "held-out mean reward")]
    if _has_accuracy(runs):
        metrics.append(("accuracy", "held-out accuracy"))
    if _has_kl(runs):
        metrics.append(("kl", "KL to base\n(nats/token)"))
    fig, axes = _figure(len(metrics), height=SIZE[1] + 1.5 * (len(metrics) - 1))
    labels: list[str] = []
    groups = group_runs(runs) if len(runs) > 1 else [(runs[0].label, runs)]
    for k, (label, members) in enumerate(groups):
        color = f"C{k % 10}"
        # generations evaluated in every run of the group
        common = sorted(set.intersection(*(set(m.evals["generation"].tolist()) for m in members)))
        for ax, (name, ylabel) in zip(axes, metrics, strict=True):
            values = np.array([[float(m.evals[name][m.evals["generation"] == g][-1])
                                for g in common] for m in members])
            if len(members) > 1:
                ax.fill_between(common, values.min(axis=0), values.max(axis=0), color=color,
                                alpha=0.2, linewidth=0)
            ax.plot(common, values.mean(axis=0), color=color, marker="o", markersize=5,
                    label=label)
            ax.set_ylabel(ylabel)
        labels.append(label)
    if _has_accuracy(runs):  # a fraction: keep 0 in view rather than zoom on noise
        finite = np.concatenate([r.evals["accuracy"] for r in runs])
        top = float(finite[np.isfinite(finite)].max())
        axes[1].set_ylim(-0.02, min(1.02, max(0.1, 1.15 * top)))
    sizes = {int(r.evals["n_examples"][-1]) for r in runs}
    title = f"Held-out score ({sizes.pop()} examples, greedy)" if len(sizes) == 1 \
        else "Held-out score (greedy)"
    if len(runs) == 1:
        title += f": {runs[0].label}"
    elif any(len(m) > 1 for _, m in groups):
        title += "\nband: min \u2013 max across seeds"
    axes[0].set_title(title, fontsize=10)
    axes[-1].set_xlabel("generations trained (0 = base model)")
    if len(groups) > 1:
        axes[0].legend(loc="best", fontsize=9)
    _save(fig, path, report, labels)
    return True


def _phase_segments(run: Run) -> list[tuple[str, np.ndarray]]:
    """A run's time per generation split into phases that add up to time_total."""
    g = run.gens
    phases, eval_parts = phase_fields(g)
    segments = []
    for name in phases:
        values = np.nan_to_num(g[name].astype(np.float64))
        if name == "time_eval" and eval_parts:
            parts = [(p[5:], np.nan_to_num(g[p].astype(np.float64))) for p in eval_parts]
            if any(v.any() for _, v in parts):
                segments += [(f"evaluate: {n}", v) for n, v in parts]
                values = np.clip(values - sum(v for _, v in parts), 0, None)
                segments.append(("evaluate: rest", values))
                continue
        segments.append((PHASE_NAMES.get(name[5:], name[5:]), values))
    named = sum(v for _, v in segments)
    segments.append((OTHER_PHASE, np.clip(g["time_total"] - named, 0, None)))
    return [(n, v) for n, v in segments if v.any()]


def _phase_colors(names: list[str]) -> dict[str, object]:
    """Evaluation (and its parts) in blues, the other phases in distinct hues, rest grey."""
    from matplotlib import colormaps

    evals = [n for n in names if n.startswith("evaluate")]
    blues = colormaps["Blues"]
    colors: dict[str, object] = {
        n: blues(0.9 - 0.55 * i / max(1, len(evals) - 1)) for i, n in enumerate(evals)}
    tab10 = colormaps["tab10"]
    hues = [tab10(i) for i in (1, 2, 3, 4, 5, 6, 8, 9)]  # tab10 without its blue and grey
    others = [n for n in names if n not in colors and n != OTHER_PHASE]
    colors.update({n: hues[i % len(hues)] for i, n in enumerate(others)})
    colors[OTHER_PHASE] = "0.8"  # not a phase of the generation loop
    return colors


def plot_phases(runs: list[Run], path: Path, report: Report) -> None:
    if len(runs) == 1:
        run = runs[0]
        segments = _phase_segments(run)
        colors = _phase_colors([n for n, _ in segments])
        fig, (ax,) = _figure()
        x, bottom = run.x, np.zeros(run.done)
        if run.done <= 80:
            for name, values in segments:
                ax.bar(x, values, bottom=bottom, width=0.8, color=colors[name], label=name)
                bottom = bottom + values
        else:
            ax.stackplot(x, *[v for _, v in segments], colors=[colors[n] for n, _ in segments],
                         labels=[n for n, _ in segments])
        total = float(np.sum(run.gens["time_total"]))
        ax.set_title(f"Time per generation by phase (rank 0): {run.label}\n"
                     f"total {_duration(total)}, mean {total / run.done:.1f} s/generation",
                     fontsize=10)
        ax.set_xlabel("generation")
        ax.set_ylabel("seconds")
        fig.legend(loc="outside right upper", fontsize=8, frameon=False)
        _save(fig, path, report, [n for n, _ in segments])
        return
    # several runs: one horizontal bar each, mean seconds per generation by phase
    means = [{n: float(v.mean()) for n, v in _phase_segments(r)} for r in runs]
    names = list(dict.fromkeys(n for m in means for n in m))
    colors = _phase_colors(names)
    fig, (ax,) = _figure(height=max(2.5, 1.2 + 0.45 * len(runs)), integer_x=False)
    y = np.arange(len(runs))[::-1]
    left = np.zeros(len(runs))
    for name in names:
        widths = np.array([m.get(name, 0.0) for m in means])
        ax.barh(y, widths, left=left, height=0.6, color=colors[name], label=name)
        left += widths
    ax.set_yticks(y, [r.label for r in runs], fontsize=8)
    ax.set_xlabel("seconds per generation (mean over the run, rank 0)")
    ax.set_title("Time per generation by phase", fontsize=10)
    fig.legend(loc="outside right upper", fontsize=8, frameon=False)
    _save(fig, path, report, names)


def plot_ranks(run: Run, path: Path, report: Report) -> None:
    """Seconds each rank spent on its members per generation, against the phase's wall time."""
    g = run.gens
    ranks = sorted(int(r) for r in np.unique(g["eval_rank"]))
    busy = np.full((len(ranks), run.done), np.nan)
    for t in range(run.done):
        for i, r in enumerate(ranks):
            mine = g["eval_rank"][t] == r
            if mine.any():
                busy[i, t] = g["eval_seconds"][t][mine].sum()
    fig, (ax,) = _figure()
    x = run.x
    labels = []
    if len(ranks) <= MAX_RANK_LINES:
        for i, r in enumerate(ranks):
            ax.plot(x, busy[i], marker=_marker(len(x)), markersize=3, color=f"C{i % 10}",
                    linewidth=_width(len(x)), label=f"rank {r}")
            labels.append(f"rank {r}")
    else:
        ax.fill_between(x, np.nanmin(busy, axis=0), np.nanmax(busy, axis=0), color="C0",
                        alpha=0.25, linewidth=0, label=f"min \u2013 max over {len(ranks)} ranks")
        ax.plot(x, np.nanmedian(busy, axis=0), color="C0", linewidth=_width(len(x)),
                label="median rank")
        labels += [f"min \u2013 max over {len(ranks)} ranks", "median rank"]
    wall = "evaluation phase, wall time on rank 0"
    ax.plot(x, g["time_eval"], color="0.3", linestyle="--", linewidth=2 * _width(len(x)),
            alpha=0.5, zorder=1, label=wall)
    labels.append(wall)
    mean_busy = np.nanmean(busy, axis=0)
    imbalance = float(np.nanmean(np.nanmax(busy, axis=0) / np.where(mean_busy > 0, mean_busy,
                                                                        np.nan)))
    note = (f"slowest rank / mean rank: {imbalance:.2f} (average over generations)"
            if math.isfinite(imbalance) else "")
    ax.set_title(f"Evaluation time per rank (load balance): {run.label}\n{note}", fontsize=10)
    ax.set_xlabel("generation")
    ax.set_ylabel("seconds on its own members")
    ax.set_ylim(bottom=0)
    ax.legend(loc="best", fontsize=8)
    _save(fig, path, report, labels)


DIAGNOSTICS = [("pair_disagree", "mirrored pairs\nwith unequal rewards"),
               ("distinct_rewards", "distinct rewards / N"),
               ("update_coef_norm", "update RMS per weight\n(expected, noise part)")]


def plot_diagnostics(run: Run, path: Path, report: Report) -> bool:
    """Per-generation diagnostics (es_mpi.diagnostics); False where the file has none."""
    shown = [(k, label) for k, label in DIAGNOSTICS
             if k in run.gens and np.isfinite(run.gens[k]).any()]
    if not shown:
        return False
    fig, axes = _figure(len(shown), height=SIZE[1] + 1.5 * (len(shown) - 1))
    x = run.x
    for ax, (name, ylabel) in zip(axes, shown, strict=True):
        ax.plot(x, run.gens[name], color="C0", marker=_marker(len(x)), markersize=4,
                linewidth=_width(len(x)))
        ax.set_ylabel(ylabel, fontsize=9)
        if name != "update_coef_norm":
            ax.set_ylim(-0.02, 1.02)
    axes[0].set_title(f"Population diagnostics per generation: {run.label}", fontsize=10)
    axes[-1].set_xlabel("generation")
    _save(fig, path, report, [k for k, _ in shown])
    return True


def _diagnostics_text(run: Run) -> str | None:
    """Mean over the generations (and the last value) of each recorded diagnostic."""
    parts = []
    for name, text in (("pair_disagree", "pairs with unequal rewards"),
                       ("pair_gap", "mean pair gap r+ vs r-"),
                       ("distinct_rewards", "distinct rewards / N"),
                       ("update_coef_norm", "update RMS per weight (expected)")):
        values = run.gens.get(name)
        if values is None or not np.isfinite(values).any():
            continue
        parts.append(f"{text} {np.nanmean(values):.4g} (last {values[-1]:.4g})")
    return "; ".join(parts) or None


# -- summary ---------------------------------------------------------------------------

def _heldout_text(h: dict | None) -> str:
    if h is None:
        return "not evaluated (train with --eval-every K)"
    def one(value, acc):
        return f"{value:.4g}" + ("" if acc is None else f" (accuracy {acc:.3f})")
    return (f"{one(h['first'], h['first_accuracy'])} after {h['first_generation']} -> "
            f"{one(h['last'], h['last_accuracy'])} after {h['last_generation']} generations")


def _kl_rows(h: dict | None) -> list[str]:
    if h is None or h["last_kl"] is None:
        return []
    first = "not measured" if h["first_kl"] is None else f"{h['first_kl']:.4g}"
    return [f"| held-out KL to base (nats/token) | {first} after {h['first_generation']} -> "
            f"{h['last_kl']:.4g} after {h['last_generation']} generations |"]


def _spread(values: np.ndarray) -> str:
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{values.mean():.4g} \u00b1 {values.std():.2g}"


def _summary_markdown(runs: list[Run], report: Report, subdirs: dict[Path, str]) -> str:
    out = [f"# es-mpi report\n\nes-mpi {__version__}, {len(runs)} run file(s).\n"]
    if len(runs) > 1:
        out.append("| run | file | generations | reward mean first -> last | best (generation) "
                   "| held-out | time |")
        out.append("|---|---|---|---|---|---|---|")
        for run in runs:
            s = run_stats(run)
            h = s["heldout"]
            held = "-" if h is None else f"{h['first']:.4g} -> {h['last']:.4g}"
            out.append(f"| {run.label} | `{run.path}` | {s['generations']} | "
                       f"{s['first_mean']:.4g} -> {s['last_mean']:.4g} | "
                       f"{s['best_mean']:.4g} ({s['best_generation']}) | {held} | "
                       f"{_duration(s['seconds'])} |")
        groups = group_runs(runs)
        if any(len(m) > 1 for _, m in groups):
            out.append("\nAcross seeds (reward mean of the population; mean \u00b1 std over "
                       "the runs of a group):\n")
            out.append("| group | runs | last generation | best generation |")
            out.append("|---|---|---|---|")
            for label, members in groups:
                last = np.array([m.gens["reward_mean"][-1] for m in members])
                best = np.array([m.gens["reward_mean"].max() for m in members])
                out.append(f"| {label} | {len(members)} | {_spread(last)} | {_spread(best)} |")
        out.append("")
        for name in ("reward.png", "heldout.png", "phases.png"):
            if name in report.legends:
                out.append(f"![{name[:-4]}]({name})\n")
    for run in runs:
        s = run_stats(run)
        prefix = subdirs.get(run.path, "")
        config = run.config
        settings = ", ".join(f"{k}={_value_text(k, config[k])}" for k in TRAJECTORY_KEYS
                             if config[k] != "")
        out += [
            f"## {run.label}\n",
            "| | |", "|---|---|",
            f"| file | `{run.path}` ({run.path.stat().st_size / 2**20:.1f} MiB) |",
            f"| model | `{run.info.model_path}` (fingerprint {run.info.model_fingerprint}) |",
            f"| settings | {settings} |",
            f"| generations | {s['generations']} of {s['target']}, world size(s) "
            f"{sorted({int(w) for w in run.gens['world_size']})} |",
            f"| reward mean | {s['first_mean']:.4g} (generation 1) -> {s['last_mean']:.4g} "
            f"(generation {s['generations']}); best {s['best_mean']:.4g} at generation "
            f"{s['best_generation']} |",
            f"| held-out mean reward | {_heldout_text(s['heldout'])} |",
            *_kl_rows(s["heldout"]),
            *[f"| diagnostics (mean over generations) | {d} |"
              for d in [_diagnostics_text(run)] if d],
            f"| time | {_duration(s['seconds'])} in all, "
            f"{s['seconds_per_generation']:.1f} s per generation, "
            f"{s['tokens_per_second']:.0f} generated tokens/s |",
            f"| checkpoints | {run.info.checkpoints or 'none'} |",
            "",
        ]
        for name in ("reward.png", "heldout.png", "diagnostics.png", "phases.png",
                     "ranks.png"):
            key = f"{prefix}/{name}" if prefix else name
            if key in report.legends:
                out.append(f"![{name[:-4]}]({key})\n")
    return "\n".join(out) + "\n"


# -- the command -----------------------------------------------------------------------

def _single_run_plots(run: Run, out: Path, report: Report, key_prefix: str = "") -> None:
    sub = Report(out)
    plot_reward([run], out / "reward.png", sub)
    plot_heldout([run], out / "heldout.png", sub)
    plot_diagnostics(run, out / "diagnostics.png", sub)
    plot_phases([run], out / "phases.png", sub)
    plot_ranks(run, out / "ranks.png", sub)
    report.files += sub.files
    for name, labels in sub.legends.items():
        report.legends[f"{key_prefix}/{name}" if key_prefix else name] = labels


def write_report(paths: list[str | Path], out_dir: str | Path) -> Report:
    """Plots and summary.md of the run files in `paths`, written to `out_dir`."""
    if not paths:
        raise EsError("report: give at least one run file")
    runs = [load_run(p) for p in paths]
    label_runs(runs)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EsError(f"cannot create report directory {out}: {exc.strerror}") from None
    report = Report(out)
    subdirs: dict[Path, str] = {}
    if len(runs) == 1:
        _single_run_plots(runs[0], out, report)
    else:
        plot_reward(runs, out / "reward.png", report)
        plot_heldout(runs, out / "heldout.png", report)
        plot_phases(runs, out / "phases.png", report)
        used: set[str] = set()
        for run in runs:
            name = run.path.stem
            while name in used:
                name += "_"
            used.add(name)
            subdirs[run.path] = name
            (out / name).mkdir(exist_ok=True)
            _single_run_plots(run, out / name, report, key_prefix=name)
    summary = out / "summary.md"
    summary.write_text(_summary_markdown(runs, report, subdirs))
    report.files.append(summary)
    return report
