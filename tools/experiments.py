"""Experiment recipes for docs/results.md: one command each, the same numbers every time.

    python tools/experiments.py conciseness [--mode lowrank|full] [--seeds 0 1 2]
                                            [--task conciseness|conciseness-correct]
    python tools/experiments.py reasoning [--task arithmetic-easy|arithmetic|countdown]
                                          [--seeds 0 1]
    python tools/experiments.py rl [--seeds 0 1 2] [--betas 0 0.01 0.1]  # ES vs TRL GRPO
    python tools/experiments.py sweep [--sigmas ...] [--lrs ...]  # Slurm job array
    python tools/experiments.py table RUN.h5 [RUN.h5 ...]     # the results table again
    python tools/experiments.py table --curves RUN.h5 [...]   # held-out score per evaluation
    python tools/experiments.py samples RUN.h5 [--generation G]  # before/after completions

`conciseness` trains the demo model (demo/model, `make demo` prepares it) with the
`conciseness-lowrank-cpu` preset (or its settings in --mode full, or with the
correct-and-short reward of --task conciseness-correct) once per seed under
`mpiexec -n 2` with one thread per rank, writes results/TASK-MODE-sSEED.h5, the overlay
report results/TASK-MODE/ and prints the markdown table. `reasoning` does the same with
the `reasoning-easy-lowrank-cpu` preset on arithmetic-easy (`reasoning-lowrank-cpu` on
arithmetic or Countdown). `rl` trains ES (conciseness-lowrank-cpu) and TRL's GRPO
(tools/grpo.py, the `rl` extra) per seed and KL weight, scores every final model with
`es-mpi eval --json` on the whole held-out set (KL to the base model included) and
prints the ES vs GRPO table and draws results/TASK-es-vs-grpo.png. `sweep` submits
slurm/sweep_array.sbatch as a job array to the Slurm cluster in SLURM_CONF (a local one:
`tools/slurm_cluster.sh start`), one rank per grid point, waits for it, then writes the
overlay report results/sweep/report and the table. Runs already complete are not trained
again (delete the file to redo one). Rewards and weights are bit-identical on the same
hardware, whatever the number of ranks; only the wall times vary.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TARGET_GAP = 0.70  # issue #9: share of the base model's distance to 0 to close
CONCISENESS_PRESET = "conciseness-lowrank-cpu"  # conciseness recipes and the sweep
REASONING_PRESETS = {"arithmetic-easy": "reasoning-easy-lowrank-cpu",
                     "arithmetic": "reasoning-lowrank-cpu", "countdown": "reasoning-lowrank-cpu"}


def run(cmd: list, env: dict | None = None) -> None:
    print("$", " ".join(map(str, cmd)), flush=True)
    env = {**(env or os.environ), "OMP_NUM_THREADS": "1"}
    subprocess.run([str(c) for c in cmd], check=True, env=env)


def train(preset: str, task: str, model: str, out: Path, mode: str, seed: int, ranks: int,
          extra: list[str]) -> Path:
    path = out / f"{task}-{mode}-s{seed}.h5"
    cmd = [BIN / "es-mpi", "train", "--preset", preset, "--task", task, "--model", model,
           "--mode", mode, "--seed", str(seed), "--run", path, *extra]
    if ranks > 1:
        cmd = [BIN / "mpiexec", "-n", str(ranks), *cmd]
    run(cmd)
    return path


def summarize(path: Path) -> dict:
    """Held-out scores of one run: base, best (and when), last; share of the gap to 0."""
    from es_mpi import runfile

    info = runfile.read_info(path)
    evals = runfile.read_evals(path)
    gens = runfile.read_generations(path, fields=("time_total",))
    gen_e, score_e, acc_e = evals["generation"], evals["mean_reward"], evals["accuracy"]
    kl_e = evals["kl"]
    base = float(score_e[gen_e == 0][0])
    trained = gen_e > 0
    best_i = int(np.argmax(np.where(trained, score_e, -np.inf)))
    last = float(score_e[-1])
    # share of the distance to 0 closed: for rewards that are a negative distance (base < 0)
    closed = 1 - score_e / base if base < 0 else np.full_like(score_e, np.nan)
    reached = np.flatnonzero(trained & (closed >= TARGET_GAP))
    cfg = info.config
    return {"run": str(path), "task": cfg.task, "mode": cfg.mode, "seed": cfg.seed,
            "sigma": cfg.sigma, "lr": cfg.lr,
            "accuracy": (float(acc_e[gen_e == 0][0]), float(acc_e[best_i]), float(acc_e[-1])),
            "kl": (float(kl_e[best_i]), float(kl_e[-1])),
            "generations": info.complete_generations, "base": base,
            "best": float(score_e[best_i]), "best_generation": int(gen_e[best_i]),
            "reached": int(gen_e[reached[0]]) if reached.size else None,
            "last": last, "closed_best": float(closed[best_i]),
            "closed_last": float(closed[-1]), "seconds": float(gens["time_total"].sum())}


def decimals(score: float) -> int:
    """Decimals to print a run's scores with: 1 for conciseness's characters, else 3."""
    return 1 if abs(score) >= 10 else 3


def table(paths: list[Path]) -> str:
    """Markdown: one row per run (held-out base, best, last; the share of the gap to 0
    closed where the reward is a negative distance, as in conciseness; accuracy where the
    task has one; KL to the base model where measured; sigma and lr when they differ
    between the runs), then mean +- std per mode over seeds."""
    rows = [summarize(p) for p in paths]
    gap = all(r["base"] < 0 for r in rows)
    accuracy = any(not np.isnan(r["accuracy"][0]) for r in rows)
    kl = any(not np.isnan(r["kl"][1]) for r in rows)
    grid = len({(r["sigma"], r["lr"]) for r in rows}) > 1
    tasks = len({r["task"] for r in rows}) > 1
    digits = decimals(min((r["base"] for r in rows), key=abs))

    def num(x: float) -> str:
        return f"{x:.{digits}f}"

    def spread(xs: list[float], fmt=num) -> str:
        return f"{fmt(float(np.mean(xs)))} +- {fmt(float(np.std(xs)))}"

    def pct(x: float) -> str:
        return f"{100 * x:.0f}%"

    head = [*(["task"] if tasks else []), "mode", *(["sigma", "lr"] if grid else []), "seed",
            "held-out base", "best (generation)", "at the last generation",
            *(["gap closed: best / last", f"{pct(TARGET_GAP)} closed at"] if gap else []),
            *(["accuracy: base / best / last"] if accuracy else []),
            *(["KL to base: best / last"] if kl else []), "wall time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [*([r["task"]] if tasks else []), r["mode"],
                 *([f"{r['sigma']:g}", f"{r['lr']:g}"] if grid else []),
                 str(r["seed"]), num(r["base"]), f"{num(r['best'])} ({r['best_generation']})",
                 f"{num(r['last'])} (gen {r['generations']})"]
        if gap:
            cells += [f"{pct(r['closed_best'])} / {pct(r['closed_last'])}",
                      "never" if r["reached"] is None else f"gen {r['reached']}"]
        if accuracy:
            cells.append(" / ".join(f"{a:.2f}" for a in r["accuracy"]))
        if kl:
            cells.append(" / ".join("-" if np.isnan(k) else f"{k:.3f}" for k in r["kl"]))
        lines.append("| " + " | ".join([*cells, f"{r['seconds'] / 60:.1f} min"]) + " |")
    if grid:
        return "\n".join(lines)
    for task, mode in sorted({(r["task"], r["mode"]) for r in rows}):
        group = [r for r in rows if (r["task"], r["mode"]) == (task, mode)]
        if len(group) < 2:
            continue
        cells = [*([task] if tasks else []), mode, f"mean +- std ({len(group)} seeds)",
                 num(group[0]["base"]), spread([r["best"] for r in group]),
                 spread([r["last"] for r in group])]
        if gap:
            cells += [spread([r["closed_best"] for r in group], pct), ""]
        if accuracy:
            cells.append("best " + spread([r["accuracy"][1] for r in group],
                                          lambda x: f"{x:.2f}"))
        if kl:
            cells.append("last " + spread([r["kl"][1] for r in group], lambda x: f"{x:.3f}"))
        lines.append("| " + " | ".join([*cells, ""]) + " |")
    return "\n".join(lines)


def curves(paths: list[Path]) -> str:
    """Markdown: each run's held-out score at every evaluation (a row per run)."""
    from es_mpi import runfile

    evals = [runfile.read_evals(p) for p in paths]
    gens = sorted({int(g) for e in evals for g in e["generation"]})
    lines = ["| run | " + " | ".join(map(str, gens)) + " |", "|" + "---|" * (len(gens) + 1)]
    for path, e in zip(paths, evals, strict=True):
        score = dict(zip(e["generation"].tolist(), e["mean_reward"].tolist(), strict=True))
        digits = decimals(e["mean_reward"][0])
        cells = [f"{score[g]:.{digits}f}" if g in score else "" for g in gens]
        lines.append(f"| {path.stem} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def samples(path: Path, generation: int | None, limit: int) -> str:
    """Greedy completions of the held-out prompts before and after training."""
    import tempfile

    import torch

    from es_mpi import model as hf
    from es_mpi import runfile
    from tasks import get_task

    info = runfile.read_info(path)
    cfg = info.config
    task = get_task(cfg.task, data=cfg.task_data or None)
    examples = task.eval_examples()[:limit]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "trained"
        cmd = [BIN / "es-mpi", "export", path, out]
        if generation is not None:
            cmd += ["--generation", str(generation)]
        run(cmd)
        lines = ["| prompt | base model | after ES |", "|---|---|---|"]
        texts = {}
        for name, model_dir in (("base", info.model_path), ("trained", str(out))):
            model, tok = hf.load_model(model_dir, "float32", [torch.device("cpu")])
            prompts = [task.prompt(e, tok) for e in examples]
            batch = hf.encode_prompts(tok, prompts, torch.device("cpu"), task.templated(tok))
            texts[name], _ = hf.generate(model, tok, batch, cfg.max_new_tokens)
    for e, before, after in zip(examples, texts["base"], texts["trained"], strict=True):
        def cell(text: str) -> str:
            return json.dumps(text.strip())[1:-1].replace("|", "\\|")
        lines.append(f"| {cell(e['prompt'])} | {cell(before)} | {cell(after)} |")
    return "\n".join(lines)


def sweep(args: argparse.Namespace) -> list[Path]:
    """The sigma x lr grid as one Slurm job array (slurm/sweep_array.sbatch); blocks until
    every array task has ended. Returns the run files in grid order (lr-major)."""
    from es_mpi import presets
    from es_mpi.config import Config
    from es_mpi.errors import EsError
    from es_mpi.model import check_model_dir

    if shutil.which("sbatch") is None:
        sys.exit("experiments: sbatch is not on PATH; start a local cluster with "
                 "`tools/slurm_cluster.sh start` (or run this on a Slurm login node)")
    # every grid point passes the checks `es-mpi train` makes, before anything is queued
    settings = {**presets.load(CONCISENESS_PRESET), "model": args.model,
                "generations": args.generations, "seed": args.seed}
    for value in (*args.sigmas, *args.lrs):
        try:
            float(value)
        except ValueError:
            sys.exit(f"experiments: sigma and lr must be numbers, not {value!r}")
    for sigma in args.sigmas:
        for lr in args.lrs:
            try:
                Config.from_dict({**settings, "sigma": float(sigma), "lr": float(lr)})
            except EsError as exc:
                sys.exit(f"experiments: {exc}")
    try:
        check_model_dir(args.model)
    except EsError as exc:
        sys.exit(f"experiments: {exc}; `make demo` prepares demo/model, or pass --model DIR")
    run_dir = (args.out / "sweep").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    n = len(args.sigmas) * len(args.lrs)
    env = {**os.environ, "ES_MPI_REPO": str(ROOT), "ES_MPI_LAUNCHER": "mpiexec",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "ES_MPI_SIGMAS": " ".join(args.sigmas), "ES_MPI_LRS": " ".join(args.lrs),
           "ES_MPI_CONFIG": str(presets.path(CONCISENESS_PRESET)),
           "ES_MPI_MODEL": str(Path(args.model).resolve()), "ES_MPI_RUN_DIR": str(run_dir),
           "ES_MPI_ARGS": f"--generations {args.generations} --seed {args.seed}"}
    try:
        run(["sbatch", "--wait", "--parsable", f"--array=0-{n - 1}%{args.parallel}",
             f"--ntasks={args.ranks}", "--cpus-per-task=1", "--export=ALL",
             f"--output={run_dir}/slurm-%x-%A_%a.out", "--chdir", ROOT,
             ROOT / "slurm/sweep_array.sbatch"], env)
    except subprocess.CalledProcessError as e:
        sys.exit(f"experiments: the job array ended with status {e.returncode}; the logs of "
                 f"its tasks are {run_dir}/slurm-es-mpi-sweep-*.out (rerun to continue)")
    return [run_dir / f"run_sigma{s}_lr{lr}.h5" for lr in args.lrs for s in args.sigmas]


# ---------------------------------------------------------------------------------------
# ES against GRPO (TRL), issue #17: the same model, prompts, token budget and held-out set


GRPO_STEPS = 20  # 20 steps x 8 completions x 2 prompts = ES's 20 generations x 8 x 2
GRPO_LR = 2e-5


def held_out(target: str, base: str, task: str, max_new_tokens: int, cache: Path,
             ranks: int) -> dict:
    """`es-mpi eval TARGET --json` on every held-out example with KL to `base`, cached
    in `cache` (a rerun of the recipe reprints the table without scoring again)."""
    if cache.exists():
        return json.loads(cache.read_text())
    cmd = [BIN / "es-mpi", "eval", target, "--task", task, "--limit", "0", "--json",
           "--max-new-tokens", str(max_new_tokens)]
    if "@" not in target:  # a model directory: KL to the model it started from
        cmd += ["--base", base]
    if ranks > 1:
        cmd = [BIN / "mpiexec", "-n", str(ranks), *cmd]
    print("$", " ".join(map(str, cmd)), flush=True)
    out = subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    result = json.loads(out.strip().splitlines()[-1])
    cache.write_text(json.dumps(result))
    return result


def es_point(path: Path, ranks: int) -> dict:
    """An ES run's last generation scored on the held-out set, with its cost."""
    from es_mpi import runfile

    info = runfile.read_info(path)
    cfg, done = info.config, info.complete_generations
    rows = runfile.read_generations(path, fields=("time_total", "prompt_ids"))
    evals = runfile.read_evals(path)
    # training time: in-run held-out scoring is not part of either method's cost
    seconds = float(rows["time_total"].sum() - evals["seconds"][evals["generation"] > 0].sum())
    result = held_out(f"{path}@{done}", cfg.model, cfg.task, cfg.max_new_tokens,
                      path.with_suffix(f".heldout{done}.json"), ranks)
    return {"method": "ES", "setting": f"sigma {cfg.sigma:g}, lr {cfg.lr:g}, {cfg.mode}",
            "seed": cfg.seed, "reward": result["mean_reward"], "kl": result["kl"],
            "seconds": seconds,
            "generated": cfg.population * int(np.asarray(rows["prompt_ids"]).size),
            "backpropagated": 0, "n": result["n_examples"]}


def grpo_point(out: Path, step: int, model: str, ranks: int) -> dict:
    """A GRPO run's model after `step` steps scored on the held-out set, with its cost."""
    record = json.loads((out / "grpo.json").read_text())
    saved = record["saved"][str(step)]
    result = held_out(str(out / f"step-{step}"), model, record["task"],
                      record["max_new_tokens"], out / f"heldout{step}.json", ranks)
    return {"method": "GRPO", "setting": f"beta {record['beta']:g}, lr {record['lr']:g}",
            "seed": record["seed"], "reward": result["mean_reward"], "kl": result["kl"],
            "seconds": saved["wall_s"], "generated": saved["completions_generated"],
            "backpropagated": saved["completions_backpropagated"], "n": result["n_examples"]}


def rl(args: argparse.Namespace) -> list[dict]:
    """Train what is missing (ES per seed, GRPO per beta and seed), score every final
    model on the whole held-out set; the points, base model first."""
    if (missing := [m for m in ("trl", "datasets") if importlib.util.find_spec(m) is None]):
        sys.exit(f"experiments: {' and '.join(missing)} missing; the GRPO baseline needs "
                 "the RL extra: pip install 'es-mpi[rl]'")
    args.out.mkdir(parents=True, exist_ok=True)
    es = [train(CONCISENESS_PRESET, args.task, args.model, args.out, "lowrank", seed,
                args.ranks, []) for seed in args.seeds]
    grpo = []
    for beta in args.betas:
        for seed in args.seeds:
            out = args.out / "grpo" / f"{args.task}-beta{beta}-s{seed}"
            if not (out / "grpo.json").exists():
                run([sys.executable, ROOT / "tools/grpo.py", "--model", args.model,
                     "--task", args.task, "--beta", beta, "--seed", seed, "--steps",
                     args.steps, "--lr", args.lr, "--out", out])
            grpo.append(out)
    from es_mpi import presets

    tokens = presets.load(CONCISENESS_PRESET)["max_new_tokens"]
    base = held_out(args.model, args.model, args.task, tokens,
                    args.out / f"{args.task}-base.heldout.json", args.ranks)
    points = [{"method": "base model", "setting": "", "seed": None,
               "reward": base["mean_reward"], "kl": base["kl"], "seconds": 0.0,
               "generated": 0, "backpropagated": 0, "n": base["n_examples"]}]
    points += [es_point(p, args.ranks) for p in es]
    points += [grpo_point(out, args.steps, args.model, args.ranks) for out in grpo]
    return points


def by_setting(points: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """The points grouped by (method, setting), in first-seen order (seeds together)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for p in points:
        groups.setdefault((p["method"], p["setting"]), []).append(p)
    return groups


def rl_table(points: list[dict]) -> str:
    """Markdown: mean +- std over seeds per method and setting, then one row per run."""
    def spread(xs: list[float], digits: int) -> str:
        if len(xs) == 1:
            return f"{xs[0]:.{digits}f}"
        return f"{np.mean(xs):.{digits}f} +- {np.std(xs):.{digits}f}"

    head = ["method", "setting", "seeds", f"held-out reward ({points[0]['n']} prompts)",
            "KL to base (nats/token)", "wall time", "completions generated",
            "completions back-propagated"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (method, setting), g in by_setting(points).items():
        lines.append("| " + " | ".join([
            method, setting, str(len(g)) if g[0]["seed"] is not None else "",
            spread([p["reward"] for p in g], 1), spread([p["kl"] for p in g], 3),
            f"{np.mean([p['seconds'] for p in g]) / 60:.1f} min",
            str(g[0]["generated"]), str(g[0]["backpropagated"])]) + " |")
    lines += ["", "| method | setting | seed | held-out reward | KL to base |",
              "|---|---|---|---|---|"]
    lines += [f"| {p['method']} | {p['setting']} | {p['seed']} | {p['reward']:.1f} | "
              f"{p['kl']:.3f} |" for p in points if p["seed"] is not None]
    return "\n".join(lines)


def rl_plot(points: list[dict], path: Path) -> None:
    """Held-out reward against KL to the base model: every run, and each setting's mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    markers = {"base model": "*", "ES": "o", "GRPO": "s"}
    for (method, setting), g in by_setting(points).items():
        label = f"{method}, {setting}" if setting else method
        kl, reward = [p["kl"] for p in g], [p["reward"] for p in g]
        line = ax.scatter(kl, reward, marker=markers[method], alpha=0.45, s=28)
        ax.errorbar(np.mean(kl), np.mean(reward), xerr=np.std(kl), yerr=np.std(reward),
                    fmt=markers[method], color=line.get_facecolor()[0][:3], ms=9,
                    capsize=3, label=label)
    ax.set_xlabel("KL to the base model (nats/token, held-out greedy completions)")
    ax.set_ylabel("held-out reward (0 is best)")
    ax.set_title("ES vs GRPO on conciseness: each run (faint) and mean +- std")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)

    def runs_parser(name: str, help: str, default_task: str, tasks: tuple[str, ...],
                    seeds: list[int]) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("--task", choices=tasks, default=default_task)
        c.add_argument("--mode", choices=("lowrank", "full"), default="lowrank")
        c.add_argument("--seeds", type=int, nargs="+", default=seeds)
        c.add_argument("--model", default=str(ROOT / "demo/model"))
        c.add_argument("--out", type=Path, default=ROOT / "results")
        c.add_argument("-n", "--ranks", type=int, default=2)
        c.add_argument("extra", nargs="*", help="more es-mpi train flags, after --")
        return c

    runs_parser("conciseness", "train + report + table, one run per seed", "conciseness",
                ("conciseness", "conciseness-correct"), [0, 1, 2])
    runs_parser("reasoning", "arithmetic or Countdown: held-out accuracy before/after",
                "arithmetic-easy", tuple(REASONING_PRESETS), [0, 1])
    w = sub.add_parser("sweep", help="sigma x lr grid as a Slurm job array, then the report")
    w.add_argument("--sigmas", nargs="+", default=["0.005", "0.01"])
    w.add_argument("--lrs", nargs="+", default=["0.003", "0.006", "0.012"])
    w.add_argument("--generations", type=int, default=10)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--model", default=str(ROOT / "demo/model"))
    w.add_argument("--out", type=Path, default=ROOT / "results")
    w.add_argument("-n", "--ranks", type=int, default=1, help="ranks per grid point")
    w.add_argument("--parallel", type=int, default=2, help="grid points running at once")
    r = sub.add_parser("rl", help="ES against TRL's GRPO on conciseness: table and plot")
    r.add_argument("--task", choices=("conciseness", "conciseness-correct"),
                   default="conciseness")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--betas", nargs="+", default=["0", "0.01", "0.1"],
                   help="GRPO KL weights")
    r.add_argument("--steps", type=int, default=GRPO_STEPS)
    r.add_argument("--lr", default=str(GRPO_LR), help="GRPO learning rate")
    r.add_argument("--model", default=str(ROOT / "demo/model"))
    r.add_argument("--out", type=Path, default=ROOT / "results")
    r.add_argument("-n", "--ranks", type=int, default=2)
    t = sub.add_parser("table", help="the markdown table of finished runs")
    t.add_argument("runs", type=Path, nargs="+")
    t.add_argument("--curves", action="store_true",
                   help="the held-out score at every evaluation instead")
    s = sub.add_parser("samples", help="held-out completions before/after")
    s.add_argument("run", type=Path)
    s.add_argument("--generation", type=int, default=None)
    s.add_argument("--limit", type=int, default=6)
    args = parser.parse_args()

    if args.what in ("conciseness", "reasoning"):
        args.out.mkdir(parents=True, exist_ok=True)
        preset = (CONCISENESS_PRESET if args.what == "conciseness"
                  else REASONING_PRESETS[args.task])
        paths = [train(preset, args.task, args.model, args.out, args.mode, seed, args.ranks,
                       args.extra) for seed in args.seeds]
        run([BIN / "es-mpi", "report", *paths, "-o", args.out / f"{args.task}-{args.mode}"])
        print(table(paths))
    elif args.what == "sweep":
        paths = sweep(args)
        run([BIN / "es-mpi", "report", *paths, "-o", args.out / "sweep" / "report"])
        print(table(paths))
    elif args.what == "rl":
        points = rl(args)
        rl_plot(points, args.out / f"{args.task}-es-vs-grpo.png")
        (args.out / f"{args.task}-es-vs-grpo.json").write_text(json.dumps(points, indent=1))
        print(rl_table(points))
    elif args.what == "table":
        print(curves(args.runs) if args.curves else table(args.runs))
    else:
        print(samples(args.run, args.generation, args.limit))


if __name__ == "__main__":
    main()
