"""tools/gpu_check.py --dry-run: the GPU acceptance run's code path on the CPU, tiny models.

It must keep working where no GPU is (CI), so that it runs on the first GPU it meets.
Its determinism checks are real: 2 ranks against 1 rank resumed, micro-batches of one
row and the master in host memory, compared bit for bit in both modes. And it must end
by its deadline whatever happens: the first GPU is lent for 15 minutes in all.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MPIEXEC, cli_env, need_mpiexec

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["cuda tests", "build determinism model", "determinism",
         "build qwen2.5-7b", "bench qwen2.5-7b lowrank", "bench qwen2.5-7b full",
         "bench qwen2.5-7b inference", "plan qwen2.5-7b",
         "build qwen2.5-0.5b", "bench qwen2.5-0.5b", "plan qwen2.5-0.5b"]


def gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_dry(tmp_path: Path, deadline: float, timeout: float) -> subprocess.CompletedProcess:
    need_mpiexec()
    env = cli_env()
    env["PATH"] = f"{Path(MPIEXEC).parent}:{env['PATH']}"
    return subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--dry-run",
                           "--out", str(tmp_path), "--deadline", str(deadline)],
                          capture_output=True, text=True, env=env, timeout=timeout, check=False)


@pytest.mark.mpi
def test_gpu_check_dry_run(tmp_path):
    # a deadline far beyond what the dry run takes: this test is about the steps
    proc = run_dry(tmp_path, deadline=1500, timeout=1600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = results["steps"]
    assert list(steps) == STEPS  # the run's order: CUDA tests, determinism, 7b first
    assert all(s["ok"] and s["status"] == "ok" for s in steps.values()), steps
    for mode in ("full", "lowrank"):
        d = steps["determinism"]["result"][mode]
        assert d["rewards_vary"] and d["one_rank_resumed_equals_two_ranks"], d
        assert d["micro_batch_1_equals"] and d["master_host_equals"], d
    for mode in ("lowrank", "full", "inference"):  # 7b: one bench run per mode
        big = steps[f"bench qwen2.5-7b {mode}"]["result"]
        assert set(big["modes"]) == {mode} and big["settings"]["repeat"] == 0, big
        # no 30 GB checkpoint write at 7b; the small sizes still time theirs
        assert "checkpoint_seconds" not in big["modes"][mode], big
    small = steps["bench qwen2.5-0.5b"]["result"]
    assert set(small["modes"]) == {"inference", "lowrank", "full", "paper"}
    assert small["settings"]["repeat"] == 1
    assert small["modes"]["full"]["checkpoint_seconds"] > 0
    for size in ("qwen2.5-7b", "qwen2.5-0.5b"):
        assert set(steps[f"plan {size}"]["result"]) == {"lowrank", "full"}
    assert "| determinism |" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.mpi
def test_gpu_check_ends_by_its_deadline(tmp_path):
    """Far too short a deadline: the run ends within it (and a margin for the slowest
    machine), steps killed at it are recorded as timed out, those it left no time for as
    skipped, each with its reason, and none as failed."""
    deadline = 25
    t = time.monotonic()
    proc = run_dry(tmp_path, deadline=deadline, timeout=deadline + 120)
    took = time.monotonic() - t
    assert took < deadline + 30, (took, proc.stdout[-3000:])
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu_check: INCOMPLETE" in proc.stdout, proc.stdout[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["deadline_s"] == deadline and results["seconds"] < deadline + 10, results
    steps = results["steps"]
    assert list(steps) == STEPS, list(steps)  # every step recorded, run or not
    cut = {name: s for name, s in steps.items() if not s["ok"]}
    assert cut, steps  # the determinism runs alone take longer than that
    for name, s in cut.items():
        assert s["status"] in ("skipped", "timed out"), (name, s)
        assert s["reason"], (name, s)
    assert steps["bench qwen2.5-0.5b"]["status"] == "skipped", steps
    table = (tmp_path / "gpu_check.md").read_text()
    assert "SKIPPED:" in table, table


def test_a_subprocess_past_the_deadline_is_killed_with_its_children(tmp_path, monkeypatch):
    gc = gpu_check_module()
    monkeypatch.setattr(gc, "DEADLINE", gc.Deadline(gc.MARGIN + 1, start=time.monotonic()))
    pidfile = tmp_path / "child.pid"
    script = f"sleep 300 & echo $! > {pidfile}; wait"
    results: dict = {}
    t = time.monotonic()
    assert gc.step(results, "sleep", 0, gc.run_bounded, ["sh", "-c", script], 600,
                   "sleep") is None
    assert time.monotonic() - t < 60  # killed after ~1 s, not after the child's 300
    r = results["sleep"]
    assert r["status"] == "timed out" and not r["ok"], r
    assert re.search(r"killed after \d+ s, at the deadline", r["reason"]), r
    child = int(pidfile.read_text())
    for _ in range(100):  # the grandchild went with its group (reaped, or a zombie)
        stat = Path(f"/proc/{child}/stat")
        if not stat.exists() or stat.read_text().split(")")[-1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the subprocess' child {child} outlived the deadline")
    # past the deadline, nothing more starts: a step is skipped, a subprocess refused
    gc.step(results, "late", 60, gc.run_bounded, ["true"], 600, "true")
    assert results["late"]["status"] == "skipped", results["late"]
    assert "under the 60 s it needs" in results["late"]["reason"], results["late"]
    monkeypatch.setattr(gc, "DEADLINE", gc.Deadline(gc.MARGIN, start=time.monotonic()))
    with pytest.raises(gc.StepTimeout, match="not started, the deadline"):
        gc.run_bounded(["true"], 600, "true")
