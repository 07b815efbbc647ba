"""How long the other ranks wait for rank 0's checkpoint writes: in line vs background.

Runs `mpiexec -n RANKS es-mpi train ... --checkpoint-every 1` twice per round, once with
the checkpoint written in line (es_mpi.record.BACKGROUND = False, the former code) and
once by rank 0's writer thread, in alternating order over --rounds rounds, on one model
(a random Llama of about 64 M parameters by default, made with tests/tiny_model.py).
Every rank records its own phase times per generation (the run file keeps rank 0's
only); printed are medians over the generations after the first (each follows a
checkpoint) and over the rounds:

    wait   rank 1's time in the generation's two collectives (gather + checksum): what
           it spends waiting for rank 0
    io     rank 0's time on the run file in its main thread (rows, the in-line write, or
           the wait for the thread before the update; the run file's time_io)
    eval   rank 0's evaluation (with the writer thread beside it in the background runs)
    gen    seconds per generation (rank 0's time_total)

`--reward-sleep S` makes each reward call sleep S seconds: an evaluation that leaves the
host's CPU cores idle, as a generate on a GPU does (on a CPU-only machine with one core
per rank, generating leaves the writer thread no core of its own).

    python tools/checkpoint_wait.py [--model DIR] [--rounds 3] [--generations 6]
                                    [--reward-sleep 0]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIELDS = ("time_eval", "time_gather", "time_update", "time_checksum", "time_io")


def worker(background: bool, sleep: float, out: str, args: list[str]) -> None:
    """One rank of a training run that records its own per-generation phase times."""
    import time

    from es_mpi import loop, record
    from es_mpi.cli import cli
    from tasks.conciseness import Conciseness

    record.BACKGROUND = background
    if sleep > 0:
        reward = Conciseness.reward

        def sleeping(self, completion, example):
            time.sleep(sleep)
            return reward(self, completion, example)
        Conciseness.reward = sleeping
    rows: list[dict] = []
    run_generation = loop.run_generation

    def recording(s, t, writer=None):
        row, stop = run_generation(s, t, writer)
        rows.append({"rank": s.dist.rank, **{k: float(row[k]) for k in FIELDS}})
        return row, stop
    loop.run_generation = recording
    try:
        cli(args, standalone_mode=False)
    finally:
        rank = rows[0]["rank"] if rows else 0
        Path(f"{out}.{rank}").write_text(json.dumps(rows))


def one_run(model: str, where: Path, background: bool, opts) -> dict:
    run = where / f"run-{int(background)}.h5"
    out = where / f"times-{int(background)}"
    run.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or "mpiexec"
    cmd = [mpiexec, "-n", str(opts.ranks), sys.executable, __file__, "--worker",
           str(int(background)), str(opts.reward_sleep), str(out), "train", "--model", model,
           "--run", str(run),
           "--generations", str(opts.generations), "--checkpoint-every", str(opts.every),
           "--population", str(opts.population), "--max-new-tokens", str(opts.tokens),
           "--mode", opts.mode, "-q"]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True, text=True)
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(opts.ranks)]
    import h5py

    with h5py.File(run, "r") as f:
        total = f["generations/time_total"][...].tolist()
        io = f["generations/time_io"][...].tolist()
        checksum = int(f["generations/checksum"][-1])
    later = slice(1, None)  # generations that follow a checkpoint
    return {"wait": statistics.median(r["time_gather"] + r["time_checksum"]
                                      for r in ranks[1][later]),
            "gather": statistics.median(r["time_gather"] for r in ranks[1][later]),
            "checksum": statistics.median(r["time_checksum"] for r in ranks[1][later]),
            "io": statistics.median(io[later]),
            "eval": statistics.median(r["time_eval"] for r in ranks[0][later]),
            "gen": statistics.median(total[later]), "final_checksum": checksum}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2] == "1", float(sys.argv[3]), sys.argv[4], sys.argv[5:])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model directory (default: a random Llama made here)")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--generations", type=int, default=6)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--population", type=int, default=4)
    p.add_argument("--tokens", type=int, default=8, help="max new tokens")
    p.add_argument("--mode", default="full", choices=("full", "lowrank"))
    p.add_argument("--reward-sleep", type=float, default=0.0,
                   help="seconds each reward call sleeps (an evaluation leaving the CPU idle)")
    p.add_argument("--every", type=int, default=1,
                   help="--checkpoint-every (more than --generations: a baseline without "
                        "checkpoints but the last)")
    p.add_argument("--json", help="also write the figures here")
    opts = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        model = opts.model
        if model is None:
            sys.path.insert(0, str(ROOT / "tests"))
            from tiny_model import make_tiny_model

            model = str(make_tiny_model(where / "model", hidden_size=opts.hidden,
                                        layers=opts.layers))
        results: dict[str, list[dict]] = {"inline": [], "background": []}
        for k in range(opts.rounds):
            order = [False, True] if k % 2 == 0 else [True, False]
            for background in order:
                got = one_run(model, where, background, opts)
                results["background" if background else "inline"].append(got)
                print(f"round {k + 1} {'background' if background else 'inline':10s} "
                      + "  ".join(f"{n} {v:.2f}" for n, v in got.items()
                                  if n != "final_checksum"), flush=True)
    sums = {r["final_checksum"] for rs in results.values() for r in rs}
    assert len(sums) == 1, f"the runs ended on different weights: {sums}"
    print(f"\nmedians over {opts.rounds} rounds (seconds; generations 2..{opts.generations},"
          f" checkpoint every {opts.every}; {opts.ranks} ranks, {opts.mode} mode, reward sleep "
          f"{opts.reward_sleep} s)")
    print(f"{'writer':12s} {'rank 1 wait':>12s} {'(gather':>8s} {'checksum)':>10s} "
          f"{'rank 0 io':>10s} {'rank 0 eval':>12s} {'s/gen':>7s}")
    table = {}
    for name, rs in results.items():
        med = {n: statistics.median(r[n] for r in rs) for n in rs[0] if n != "final_checksum"}
        lo = {n: min(r[n] for r in rs) for n in med}
        hi = {n: max(r[n] for r in rs) for n in med}
        table[name] = {"median": med, "min": lo, "max": hi}
        print(f"{name:12s} {med['wait']:12.2f} {med['gather']:8.2f} {med['checksum']:10.2f} "
              f"{med['io']:10.2f} {med['eval']:12.2f} {med['gen']:7.2f}"
              f"   (wait {lo['wait']:.2f}-{hi['wait']:.2f}, s/gen {lo['gen']:.2f}-{hi['gen']:.2f})")
    if opts.json:
        Path(opts.json).write_text(json.dumps({"options": vars(opts), **table}, indent=1))


if __name__ == "__main__":
    main()
