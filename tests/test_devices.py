"""Bounded memory and portable runs, on the CPU: micro-batched generate, the fp32 master
in host memory, the machine record in the run file and what replay elsewhere says.

The CUDA halves of these checks (the same on a GPU, factors drawn on the CPU) are in
tests/test_gpu.py and tools/gpu_check.py.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from conftest import cli_in_process, one_error_line, run_cli
from safetensors.torch import load_file

from es_mpi.errors import EsError

BASE = ["--population", "4", "--sigma", "0.05", "--lr", "0.05", "--max-new-tokens", "5",
        "--antithetic", "-q"]
SETTINGS = [*BASE, "--checkpoint-every", "3", "--eval-every", "2", "--eval-batch-size", "4"]
MODES = {"full": [], "lowrank": ["--mode", "lowrank", "--member-batch", "2"]}


def read(path):
    """(rewards, checksums, held-out completions) of a run file, read with plain h5py."""
    with h5py.File(path, "r") as f:
        done = int(f.attrs["complete_generations"])
        return (f["generations/rewards"][:done], f["generations/checksum"][:done],
                [json.loads(t) for t in f["eval/completions"].asstr()[:]])


@pytest.mark.parametrize("mode", list(MODES))
def test_results_do_not_depend_on_the_micro_batch(tiny_model, mode, tmp_path):
    """Rows cut into micro-batches of 1, 3 (splitting members and prompts unevenly) or
    all at once: the same rewards, weights and held-out completions."""
    runs = {}
    for rows in (0, 1, 3):
        run = tmp_path / f"g{rows}.h5"
        cli_in_process(["train", "--model", tiny_model, "--run", run, "--generations", "3",
                        "--generate-batch", rows, *SETTINGS, *MODES[mode]])
        runs[rows] = read(run)
    rewards, checks, completions = runs[0]
    assert len(np.unique(rewards)) > 1, "rewards do not vary; the test is blind"
    assert len(completions) == 3 and len(completions[0]) > 4  # generations 0, 2, 3
    for rows in (1, 3):
        np.testing.assert_array_equal(runs[rows][0], rewards, err_msg=f"generate_batch {rows}")
        np.testing.assert_array_equal(runs[rows][1], checks, err_msg=f"generate_batch {rows}")
        assert runs[rows][2] == completions, f"generate_batch {rows}"
    with h5py.File(tmp_path / "g3.h5", "r") as f:
        assert json.loads(f.attrs["config"])["generate_batch"] == 3  # recorded as given


def allowed_span(n: int, limit: int, unit: int, r0: int, r1: int) -> bool:
    """Rows r0..r1-1 may be one generate call: at most `limit` rows (0: any number), and
    whole blocks of `unit` rows, or part of a single block where a block exceeds the limit."""
    cap = limit or n
    whole = r0 % unit == 0 and (r1 % unit == 0 or r1 == n)
    inside_one = r0 // unit == (r1 - 1) // unit
    return r1 - r0 <= cap and (whole or (inside_one and cap < unit))


def fewest_spans(n: int, limit: int, unit: int) -> int:
    """Brute force: the fewest allowed spans that cover rows 0..n-1 in order (shortest
    path over every cut point)."""
    best = [0] + [n + 1] * n  # best[r]: the fewest spans covering rows 0..r-1 (n + 1: none)
    for r1 in range(1, n + 1):
        best[r1] = min((best[r0] + 1 for r0 in range(r1)
                        if allowed_span(n, limit, unit, r0, r1)), default=n + 1)
    return best[n]


# (n, unit) -> {limit: the spans}, worked out by hand
BY_HAND = {
    (12, 3): {0: [(0, 12)], 12: [(0, 12)],                       # no limit, or all fit
              7: [(0, 6), (6, 12)],                              # 2 members of 3 rows a call
              5: [(0, 3), (3, 6), (6, 9), (9, 12)],
              2: [(0, 2), (2, 3), (3, 5), (5, 6), (6, 8), (8, 9), (9, 11), (11, 12)]},
    (10, 5): {4: [(0, 4), (4, 5), (5, 9), (9, 10)]},             # a member exceeds the limit
    (7, 1): {3: [(0, 3), (3, 6), (6, 7)]},
    (8, 2): {5: [(0, 4), (4, 8)]},
    (12, 4): {11: [(0, 8), (8, 12)], 3: [(0, 3), (3, 4), (4, 7), (7, 8), (8, 11), (11, 12)]},
}


@pytest.mark.parametrize("n,unit", list(BY_HAND))
def test_micro_batches_cover_the_rows_and_keep_members_whole(n, unit):
    """Every row once, in order, at most `limit` per call; a call holds whole blocks of
    `unit` rows (lowrank's members), or, where one block exceeds the limit, part of one;
    no cut those rules allow has fewer calls (a search over every cut); and the spans
    worked out by hand."""
    from es_mpi.model import micro_batches

    for limit in range(0, n + 2):
        spans = micro_batches(n, limit, unit)
        assert [r for r0, r1 in spans for r in range(r0, r1)] == list(range(n)), limit
        for r0, r1 in spans:
            assert allowed_span(n, limit, unit, r0, r1), (limit, r0, r1)
        assert len(spans) == fewest_spans(n, limit, unit), (limit, spans)
    for limit, want in BY_HAND[n, unit].items():
        assert micro_batches(n, limit, unit) == want, limit


@pytest.mark.parametrize("mode", list(MODES))
def test_master_in_host_memory_gives_the_same_weights(tiny_model, mode, tmp_path):
    """--master host stages every tensor through a separate buffer for perturb and update:
    bit-identical to the master beside the replica, with decay toward the initial
    weights (its anchor lives with the master) and through a resume."""
    decay = ["--weight-decay", "0.5", "--decay-to", "init"]
    device, host = tmp_path / "device.h5", tmp_path / "host.h5"
    cli_in_process(["train", "--model", tiny_model, "--run", device, "--generations", "4",
                    *SETTINGS, *MODES[mode], *decay])
    cli_in_process(["train", "--model", tiny_model, "--run", host, "--generations", "2",
                    "--master", "host", *SETTINGS, *MODES[mode], *decay])
    cli_in_process(["resume", host, "--generations", "4", "-q"])
    rewards, checks, _ = read(device)
    assert len(np.unique(rewards)) > 1, "rewards do not vary; the test is blind"
    np.testing.assert_array_equal(read(host)[0], rewards)
    np.testing.assert_array_equal(read(host)[1], checks)
    out_d, out_h = tmp_path / "out_device", tmp_path / "out_host"
    cli_in_process(["export", device, out_d])
    cli_in_process(["export", host, out_h])
    a, b = load_file(out_d / "model.safetensors"), load_file(out_h / "model.safetensors")
    base = load_file(tiny_model / "model.safetensors")
    assert any(not torch.equal(a[k], base[k]) for k in a), "the weights never moved"
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_run_file_records_the_machine(tiny_model, tmp_path):
    run = tmp_path / "r.h5"
    cli_in_process(["train", "--model", tiny_model, "--run", run, "--generations", "1",
                    "--population", "2", "--max-new-tokens", "2", "-q"])
    cli_in_process(["resume", run, "--generations", "2", "-q"])
    with h5py.File(run, "r") as f:
        history = json.loads(f.attrs["hardware"])
        mem = f["generations/peak_mem_eval"][:], f["generations/peak_mem_update"][:]
    import transformers

    assert [h["generation"] for h in history] == [0, 1]
    for h in history:
        assert h["world_size"] == 1 and h["device"] == "cpu" and h["gpu"] == ""
        assert h["torch"] == torch.__version__ and h["transformers"] == transformers.__version__
        assert h["dtype"] == "float32"  # dtype auto, resolved on this CPU
    # peak memory per phase: the process RSS on the CPU, above the model's bytes
    model_bytes = sum(t.numel() * t.element_size()
                      for t in load_file(tiny_model / "model.safetensors").values())
    assert (mem[0] > model_bytes).all() and (mem[1] > model_bytes).all()
    shown = run_cli(["inspect", run])
    assert "from generation 1: 1 rank(s) on CPU" in shown.stdout, shown.stdout


def _pretend_other_machine(run, dtype: str | None = None) -> None:
    """Rewrite the run file's machine record as if a GPU had computed it."""
    with h5py.File(run, "r+") as f:
        history = json.loads(f.attrs["hardware"])
        for h in history:
            h.update(device="cuda", gpu="NVIDIA H100 80GB HBM3", cuda="12.8", gpus_per_rank=1)
            if dtype:
                h["dtype"] = dtype
        f.attrs["hardware"] = json.dumps(history)


def test_replay_on_another_machine_names_both_or_uses_a_checkpoint(tiny_model, tmp_path):
    run = tmp_path / "r.h5"
    cli_in_process(["train", "--model", tiny_model, "--run", run, "--generations", "4",
                    "--checkpoint-every", "2", *BASE])
    _pretend_other_machine(run)
    # a checkpoint restores exactly anywhere
    cli_in_process(["export", run, tmp_path / "g2", "--generation", "2"])
    # a generation between checkpoints is replayed: a replay that computes other weights
    # (stand-in: a logged reward no longer what the other machine's arithmetic saw)
    with h5py.File(run, "r+") as f:
        f["generations/rewards"][2, 0] += 1.0
    result = run_cli(["export", run, tmp_path / "g3", "--generation", "3"])
    one_error_line(result, "computed on NVIDIA H100 80GB HBM3 (CUDA 12.8", "here on CPU",
                   "use a checkpoint (2, 4)")
    assert not (tmp_path / "g3").exists()


def test_a_gpu_runs_recorded_dtype_is_used_on_a_cpu_node(tiny_model, tmp_path):
    """A run with dtype auto on a GPU trained bf16 replicas; exported on a CPU node, where
    auto means fp32, it must load bf16 again (its fingerprint and deltas are bf16's)."""
    run = tmp_path / "r.h5"
    cli_in_process(["train", "--model", tiny_model, "--run", run, "--generations", "2",
                    "--dtype", "bfloat16", "--checkpoint-every", "2", *BASE])
    with h5py.File(run, "r+") as f:  # as a GPU run with dtype auto would have written it
        config = json.loads(f.attrs["config"])
        config["dtype"] = "auto"
        f.attrs["config"] = json.dumps(config)
    _pretend_other_machine(run, dtype="bfloat16")
    cli_in_process(["export", run, tmp_path / "out"])
    exported = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}


def test_a_job_on_mixed_machines_is_refused():
    from es_mpi.devices import check_uniform

    h100 = {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "cuda": "13.0"}
    a100 = {**h100, "gpu": "NVIDIA A100-SXM4-80GB"}
    check_uniform([h100, dict(h100)])
    with pytest.raises(EsError, match=r"rank 2 computes on NVIDIA A100-SXM4-80GB .* rank 0 "
                                      r"on NVIDIA H100 80GB HBM3"):
        check_uniform([h100, h100, a100])
    with pytest.raises(EsError, match="rank 1 computes on"):
        check_uniform([h100, {**h100, "torch": "2.10.0"}])


def test_member_batch_auto_takes_every_member_records_it_and_continues(tiny_model, tmp_path):
    """--member-batch 0 (the default): on the CPU all N members fit one generate call, so
    one group of 4. The run file records 4; running the same command again continues it
    (auto means the recorded value); on 2 ranks the idle rank is named; the weights equal
    those of an explicit --member-batch 4 run on 1 rank."""
    auto = tmp_path / "auto.h5"
    args = ["train", "--model", tiny_model, "--run", auto, "--mode", "lowrank", *BASE]
    first = run_cli([*args, "--generations", "2"], np=2)
    assert first.returncode == 0, first.stderr
    assert "1 group(s) of members for 2 ranks: 1 rank(s) idle" in first.stdout + first.stderr
    assert "--member-batch 2 gives every rank a group" in first.stdout + first.stderr
    with h5py.File(auto, "r") as f:
        assert json.loads(f.attrs["config"])["member_batch"] == 4
    again = run_cli([*args, "--generations", "3"], np=1)
    assert again.returncode == 0, again.stderr
    explicit = tmp_path / "explicit.h5"
    cli_in_process(["train", "--model", tiny_model, "--run", explicit, "--mode", "lowrank",
                    "--member-batch", "4", "--generations", "3", *BASE])
    with h5py.File(auto, "r") as fa, h5py.File(explicit, "r") as fe:
        assert int(fa.attrs["complete_generations"]) == 3
        assert len(np.unique(fe["generations/rewards"][:3])) > 1, "rewards do not vary"
        np.testing.assert_array_equal(fa["generations/rewards"][:3],
                                      fe["generations/rewards"][:3])
        np.testing.assert_array_equal(fa["generations/checksum"][:3],
                                      fe["generations/checksum"][:3])


def test_micro_batches_stop_at_the_last_row_when_blocks_do_not_divide_it():
    """9 rows in blocks of 4 cut 3 at a time: the last block has 1 row (8), not 8..10."""
    from es_mpi.model import micro_batches

    assert micro_batches(9, 3, 4) == [(0, 3), (3, 4), (4, 7), (7, 8), (8, 9)]
