"""The benchmark of docs/speed.md: one ES generation per mode vs pure inference, demo model.

    python tools/bench.py [--model demo/model] [--json docs/bench/cpu.json] [extra flags]

Population 8 x 2 prompts x 64 new tokens, antithetic pairs (as the figures of
docs/speed.md were measured; bench itself defaults to train's default, off), 3
interleaved rounds; every other flag
goes to `es-mpi bench` (see `es-mpi bench --help`), e.g. --dtype bfloat16 on a GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> None:
    from es_mpi.cli import cli

    args = ["bench", "--population", "8", "--prompts", "2", "--max-new-tokens", "64",
            "--antithetic",
            "--task-data", str(ROOT / "es_mpi/presets/conciseness_qa.jsonl")]
    if "--model" not in argv:
        args += ["--model", str(ROOT / "demo/model")]
    cli([*args, *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
