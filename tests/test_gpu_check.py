"""tools/gpu_check.py --dry-run: the GPU acceptance run's code path on the CPU, tiny models.

It must keep working where no GPU is (CI), so that it runs on the first GPU it meets.
Its determinism checks are real: 2 ranks against 1 rank resumed, micro-batches of one
row and the master in host memory, compared bit for bit in both modes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MPIEXEC, cli_env, need_mpiexec

pytestmark = pytest.mark.mpi

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run(tmp_path):
    need_mpiexec()
    env = cli_env()
    env["PATH"] = f"{Path(MPIEXEC).parent}:{env['PATH']}"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--dry-run",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = results["steps"]
    assert all(s["ok"] for s in steps.values()), steps
    for mode in ("full", "lowrank"):
        d = steps["determinism"]["result"][mode]
        assert d["rewards_vary"] and d["one_rank_resumed_equals_two_ranks"], d
        assert d["micro_batch_1_equals"] and d["master_host_equals"], d
    bench = steps["bench qwen2.5-0.5b"]["result"]["modes"]
    assert set(bench) == {"inference", "lowrank", "full", "paper"}
    assert set(steps["plan qwen2.5-0.5b"]["result"]) == {"lowrank", "full"}
    assert "| determinism |" in (tmp_path / "gpu_check.md").read_text()
