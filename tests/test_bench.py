"""es-mpi bench on a tiny model: every mode runs and reports what the README table shows."""

from __future__ import annotations

import json
import statistics

import pytest
from conftest import run_cli


def test_bench_runs_every_mode_and_writes_json(tiny_model, tmp_path):
    """--prompts left at its default: all of the task's training prompts, as train does."""
    from tasks import get_task

    out = tmp_path / "bench.json"
    n_train = len(get_task("conciseness").train_examples())
    result = run_cli(["bench", "--model", tiny_model, "--population", "4",
                      "--max-new-tokens", "3", "--threads", "1", "--antithetic",
                      "--repeat", "2", "--json", out])
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    modes = report["modes"]
    assert list(modes) == ["inference", "lowrank", "full", "paper"]
    for mode, r in modes.items():
        # EOS ignored: every mode generated N x P x T tokens
        assert r["prompts"] == n_train == 2 and r["tokens"] == 4 * n_train * 3, mode
        assert r["seconds"] > 0 and r["peak_rss_bytes"] > r["model_bytes"] > 0
        assert r["threads"] == 1
    # times and ratios come from 2 interleaved rounds: medians of the rounds' own figures
    for mode, r in modes.items():
        assert len(r["rounds"]) == 2 and r["seconds"] == statistics.median(r["rounds"]), mode
        assert r["seconds_min"] <= r["seconds"] <= r["seconds_max"]
        ratios = [a / b for a, b in zip(r["rounds"], modes["inference"]["rounds"], strict=True)]
        assert r["ratio_to_inference"] == statistics.median(ratios), mode
    # member batch 0 (auto) on the CPU: the 4 members x 2 prompts fit in one generate call
    assert modes["lowrank"]["member_batch"] == 4
    speedups = [a / b for a, b in zip(modes["paper"]["rounds"], modes["full"]["rounds"],
                                      strict=True)]
    assert modes["full"]["speedup_over_paper"] == statistics.median(speedups)
    for mode in ("lowrank", "full"):
        assert {"perturb", "generate", "update", "checksum", "io"} <= set(modes[mode]["phases"])
        assert modes[mode]["checkpoint_seconds"] > 0
    assert {"perturb", "generate", "restore", "update"} == set(modes["paper"]["phases"])
    # traffic per rank: O(N) scalars, nothing that depends on the model
    # rows of 48 B, and 4 int64 per rank (checksum, stop signal, two peak-memory figures)
    assert report["comm_bytes_per_rank"]["2"] == {"sent": 2 * 48 + 32, "received": 4 * 48 + 64}
    assert "| lowrank |" in result.stdout and "x inference" in result.stdout
    assert "4 members x 2 prompts x 3 new tokens" in result.stdout


def test_bench_bad_mode_is_one_error_line(tiny_model):
    result = run_cli(["bench", "--model", tiny_model, "--modes", "inference,fast"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "es-mpi: error: --modes: unknown mode(s) fast; choose from inference, lowrank, full, "
        "paper"]


@pytest.mark.mpi
def test_bench_scaling_reports_speedup_and_efficiency_of_real_runs(tiny_model, tmp_path):
    """--scaling: real 1- and 2-rank training runs in both modes; the printed speedup and
    efficiency are those of the runs' own seconds, and N fixed gives the same weights."""
    out = tmp_path / "bench.json"
    result = run_cli(["bench", "--model", tiny_model, "--population", "4", "--prompts", "2",
                      "--max-new-tokens", "3", "--threads", "1", "--modes", "inference",
                      "--repeat", "0", "--scaling", "--json", out])
    assert result.returncode == 0, result.stderr
    scaling = json.loads(out.read_text())["scaling"]
    assert set(scaling) == {"full, antithetic", "lowrank"}
    for label, rep in scaling.items():
        runs = [r for r in rep["runs"] if r["kind"] == "strong"]
        t = {r["ranks"]: r["seconds"] for r in runs}
        assert sorted(t) == [1, 2] and len(runs) == 2, label
        strong = rep["strong"]["ranks"]["2"]
        assert strong["speedup"] == pytest.approx(t[1] / t[2])
        assert strong["efficiency"] == pytest.approx(t[1] / t[2] / 2)
        assert rep["strong"]["identical"], label
        assert f"| {label} | strong | 2 | 4 |" in result.stdout
