"""Experiment recipes for docs/results.md: one command each, the same numbers every time.

    python tools/experiments.py conciseness [--mode lowrank|full] [--seeds 0 1 2]
    python tools/experiments.py table RUN.h5 [RUN.h5 ...]     # the results table again
    python tools/experiments.py samples RUN.h5 [--generation G]  # before/after completions

`conciseness` trains the demo model (demo/model, `make demo` prepares it) with the
`conciseness-lowrank-cpu` preset (or its settings in --mode full) once per seed under
`mpiexec -n 2` with one thread per rank, writes results/conciseness-MODE-sSEED.h5, the
overlay report results/conciseness-MODE/ and prints the markdown table. Runs already
complete are not trained again (delete the file to redo one). Rewards and weights are
bit-identical on the same hardware; only the wall times vary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(cmd: list[str]) -> None:
    print("$", " ".join(map(str, cmd)), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([str(c) for c in cmd], check=True, env=env)


def train(model: str, out: Path, mode: str, seed: int, ranks: int, extra: list[str]) -> Path:
    path = out / f"conciseness-{mode}-s{seed}.h5"
    cmd = [BIN / "es-mpi", "train", "--preset", "conciseness-lowrank-cpu", "--model", model,
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
    gens = runfile.read_generations(path, fields=("time_total", "reward_mean"))
    gen_e, score_e = evals["generation"], evals["mean_reward"]
    base = float(score_e[gen_e == 0][0])
    trained = gen_e > 0
    best_i = int(np.argmax(np.where(trained, score_e, -np.inf)))
    last = float(score_e[-1])
    cfg = info.config
    return {"run": str(path), "mode": cfg.mode, "seed": cfg.seed,
            "generations": info.complete_generations, "base": base,
            "best": float(score_e[best_i]), "best_generation": int(gen_e[best_i]),
            "last": last, "closed_best": 1 - float(score_e[best_i]) / base,
            "closed_last": 1 - last / base, "seconds": float(gens["time_total"].sum()),
            "train_reward_first": float(gens["reward_mean"][0]),
            "train_reward_last": float(gens["reward_mean"][-1])}


def table(paths: list[Path]) -> str:
    rows = [summarize(p) for p in paths]
    lines = ["| mode | seed | held-out base | best (generation) | at the last generation | "
             "gap closed: best / last | wall time |", "|" + "---|" * 7]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['seed']} | {r['base']:.1f} | {r['best']:.1f} "
                     f"({r['best_generation']}) | {r['last']:.1f} "
                     f"(gen {r['generations']}) | {100 * r['closed_best']:.0f}% / "
                     f"{100 * r['closed_last']:.0f}% | {r['seconds'] / 60:.1f} min |")
    for mode in sorted({r["mode"] for r in rows}):
        group = [r for r in rows if r["mode"] == mode]
        if len(group) > 1:
            best = np.array([r["best"] for r in group])
            last = np.array([r["last"] for r in group])
            closed = np.array([r["closed_best"] for r in group])
            lines.append(f"| {mode} | mean +- std ({len(group)} seeds) | "
                         f"{group[0]['base']:.1f} | {best.mean():.1f} +- {best.std():.1f} | "
                         f"{last.mean():.1f} +- {last.std():.1f} | "
                         f"{100 * closed.mean():.0f}% +- {100 * closed.std():.0f}% | |")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("conciseness", help="train + report + table, one run per seed")
    c.add_argument("--mode", choices=("lowrank", "full"), default="lowrank")
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    c.add_argument("--model", default=str(ROOT / "demo/model"))
    c.add_argument("--out", type=Path, default=ROOT / "results")
    c.add_argument("-n", "--ranks", type=int, default=2)
    c.add_argument("extra", nargs="*", help="more es-mpi train flags, after --")
    t = sub.add_parser("table", help="the markdown table of finished runs")
    t.add_argument("runs", type=Path, nargs="+")
    s = sub.add_parser("samples", help="held-out completions before/after")
    s.add_argument("run", type=Path)
    s.add_argument("--generation", type=int, default=None)
    s.add_argument("--limit", type=int, default=6)
    args = parser.parse_args()

    if args.what == "conciseness":
        args.out.mkdir(parents=True, exist_ok=True)
        paths = [train(args.model, args.out, args.mode, seed, args.ranks, args.extra)
                 for seed in args.seeds]
        run([BIN / "es-mpi", "report", *paths, "-o", args.out / f"conciseness-{args.mode}"])
        print(table(paths))
    elif args.what == "table":
        print(table(args.runs))
    else:
        print(samples(args.run, args.generation, args.limit))


if __name__ == "__main__":
    main()
