"""docs/scaling.md's figures: strong and weak scaling on 1 and 2 ranks, the allgather
microbenchmark, and the communication model for 2 to 4096 ranks.

    python tools/scaling.py [--model demo/model] [--repeat 3] [--json docs/bench/scaling.json]

One thread per rank (OMP_NUM_THREADS=1), at most 2 ranks (a 2-core machine). Full mode
with antithetic pairs: N=4 (2 pairs; one per rank on 2 ranks), and lowrank: N=8 in
batches of 4 members; both on 2 prompts x 16 new tokens, 3 generations (the first is
warm-up). Weak scaling keeps N per rank at the 1-rank N. About 7.5 minutes on 2 cores with
the demo model (SmolLM2-135M).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from es_mpi.tooling import scaling
from es_mpi.tooling.bench import machine

ROOT = Path(__file__).resolve().parent.parent

SIZES = (8, 64, 512, 4096)


def code_state() -> dict:
    """The commit and the uncommitted changes to es_mpi/ (an editable install runs the
    working tree: code edited during a measurement would mix versions)."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip()
    return {"commit": git("rev-parse", "HEAD"),
            "changed": git("status", "--porcelain", "--", "es_mpi", "tasks")}


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "demo/model"), help="model directory")
    ap.add_argument("--task-data", default=str(ROOT / "es_mpi/presets/conciseness_qa.jsonl"),
                    help="conciseness examples (the demo's 4 prompts)")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions, ranks interleaved")
    ap.add_argument("--generations", type=int, default=3, help="per run; the first is warm-up")
    ap.add_argument("--json", default=str(ROOT / "docs/bench/scaling.json"), help="output")
    args = ap.parse_args(argv)
    if not Path(args.model, "config.json").exists():
        sys.exit(f"no model at {args.model}: python tools/prepare_demo_model.py demo/model")

    t0 = time.perf_counter()
    before = code_state()
    common = dict(task_data=args.task_data, prompts=2, max_new_tokens=16,
                  generations=args.generations, ranks=(1, 2), repeat=args.repeat, echo=print)
    measured = {
        "full, antithetic": scaling.measure(args.model, mode="full", population=4,
                                            extra_args=("--antithetic",), **common),
        "lowrank": scaling.measure(args.model, mode="lowrank", population=8, **common),
    }
    print("scaling: allgather microbenchmark on 2 ranks ...")
    allgather = scaling.allgather_latency(ranks=2, sizes=SIZES, repeat=2000, warmup=200)
    # N = 4 per rank: the P=2 row is the measured N=8 (the lowrank runs' population)
    model = scaling.comm_table_rows(allgather, members_per_rank=4)
    after = code_state()
    if after != before:
        print("scaling: WARNING: es_mpi/ changed during the measurement; rerun")
    report = {"machine": {**machine(), "threads_per_rank": 1},
              "code": {"before": before, "after": after, "unchanged": after == before},
              "measured": measured, "allgather": allgather, "model": model,
              "seconds": time.perf_counter() - t0}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(scaling.table(report))
    print(f"\n{report['seconds']:.0f} s; JSON in {args.json}")


if __name__ == "__main__":
    main(sys.argv[1:])
