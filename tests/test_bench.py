"""es-mpi bench on a tiny model: every mode runs and reports what the README table shows."""

from __future__ import annotations

import json
import statistics
import time

import pytest
from conftest import run_cli
from tiny_model import make_tiny_model


@pytest.fixture(scope="module")
def bigger_model(tmp_path_factory):
    """The tiny Llama, wider: 5.9 M fp32 weights, about 22 MiB, so that a copy of the
    weights stands out of the RSS that imports and activations take. Every matrix is
    1 MiB or more: glibc maps such blocks apart (es-mpi sets M_MMAP_THRESHOLD to 1 MiB),
    so a copy of them is new resident memory, not freed heap memory reused."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "bigger", hidden_size=768,
                           layers=1)


def weights_bytes(model_dir) -> int:
    """The bytes of the weights as stored in the model's safetensors file (its header read
    with the json module: 8 bytes of length, then the tensors' dtypes and offsets)."""
    raw = (model_dir / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    spans = [t["data_offsets"] for name, t in header.items() if name != "__metadata__"]
    assert all(t["dtype"] == "F32" for n, t in header.items() if n != "__metadata__")
    return sum(b - a for a, b in spans)


def test_bench_runs_every_mode_and_writes_json(bigger_model, tmp_path, monkeypatch):
    """--prompts left at its default: all of the task's training prompts, as train does.
    Every figure is held against what the test knows without bench: the wall time it
    measured around the bench call, N x P x T tokens from the settings, the model file's
    bytes, and the communication of a generation counted by hand. On the CPU, where the
    weights are in the RSS, whatever GPU the machine has."""
    from tasks import get_task

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")

    out = tmp_path / "bench.json"
    n_train = len(get_task("conciseness").train_examples())
    weights = weights_bytes(bigger_model)
    assert weights > 20 * 2**20  # big enough to stand out of the RSS's own noise
    t0 = time.perf_counter()
    result = run_cli(["bench", "--model", bigger_model, "--population", "4",
                      "--max-new-tokens", "3", "--threads", "1", "--antithetic",
                      "--repeat", "2", "--json", out])
    wall = time.perf_counter() - t0
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    modes = report["modes"]
    assert list(modes) == ["inference", "lowrank", "full", "paper"]
    # time: every mode ran alone (one generation, then a checkpoint where it writes one)
    # and in 2 rounds, one process after another, all inside the bench call the test timed
    timed = sum(r["alone_seconds"] + r.get("checkpoint_seconds", 0.0) + sum(r["rounds"])
                for r in modes.values())
    assert 0 < timed <= wall, (timed, wall)
    for mode, r in modes.items():
        # EOS ignored: every mode generated N x P x T tokens (4 members, the task's 2
        # training prompts, 3 new tokens)
        assert r["prompts"] == n_train == 2 and r["tokens"] == 4 * 2 * 3, mode
        assert r["threads"] == 1
        assert len(r["rounds"]) == 2 and all(t > 0 for t in r["rounds"]), mode
        assert r["seconds_min"] <= r["seconds"] <= r["seconds_max"]
        assert sorted(r["rounds"]) == [r["seconds_min"], r["seconds_max"]]
        # memory: the weights (the file's bytes) are resident while the generation runs,
        # above the RSS before the model was loaded
        assert r["model_bytes"] == weights, mode
        assert r["peak_rss_bytes"] - r["base_rss_bytes"] >= weights, mode
    # models held: full mode keeps an fp32 master copy beside the weights, lowrank (fp32)
    # uses the weights as their own master; each ran alone in its own process, through
    # the same session code (the same imports and buffers but the master)
    full, lowrank = modes["full"]["peak_rss_bytes"], modes["lowrank"]["peak_rss_bytes"]
    assert full - lowrank >= 0.75 * weights, (full, lowrank, weights)
    # ratios: per round, to the same round's inference (the median of 2 is their mean)
    for mode, r in modes.items():
        ratios = [a / b for a, b in zip(r["rounds"], modes["inference"]["rounds"], strict=True)]
        assert r["ratio_to_inference"] == pytest.approx(statistics.mean(ratios)), mode
    # member batch 0 (auto) on the CPU: the 4 members x 2 prompts fit in one generate call
    assert modes["lowrank"]["member_batch"] == 4
    for mode in ("lowrank", "full"):
        assert {"perturb", "generate", "update", "checksum", "io"} <= set(modes[mode]["phases"])
        assert modes[mode]["checkpoint_seconds"] > 0
    assert {"perturb", "generate", "restore", "update"} == set(modes["paper"]["phases"])
    # traffic per rank and generation, counted by hand: a row of 48 B per member (member,
    # seed, reward, tokens, seconds: 5 x 8 B; rank, status: 2 x 4 B), and 4 int64 per rank
    # (checksum, stop signal, two peak-memory figures); a rank sends its members' rows
    # (ceil(4 / ranks)) and its 4 int64, and receives every rank's
    assert report["comm_bytes_per_rank"] == {
        "1": {"sent": 4 * 48 + 32, "received": 4 * 48 + 32},
        "2": {"sent": 2 * 48 + 32, "received": 4 * 48 + 2 * 32},
        "8": {"sent": 1 * 48 + 32, "received": 4 * 48 + 8 * 32},
        "64": {"sent": 1 * 48 + 32, "received": 4 * 48 + 64 * 32}}
    for mode in ("lowrank", "full"):  # the modes' own generation, on one rank
        assert modes[mode]["comm_bytes_per_rank_formula"] == {"sent": 224, "received": 224}
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
                      "--antithetic", "--repeat", "0", "--scaling", "--json", out])
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
