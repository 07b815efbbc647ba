"""Honest 16-bit full mode: the update credits the perturbation a replica really received.

A bf16 replica holds rounded(master + sigma * eps); where sigma * eps is below half a
bf16 step of a weight, that weight does not move, yet crediting eps (the paper's rule)
moves it in the update. The references here are written with plain torch from the noise
alone, in float64, independent of es_mpi.es's chunked arithmetic.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from conftest import cli_in_process, run_cli

from es_mpi.es import Replica, es_update_
from es_mpi.noise import derive_seed, tensor_noise

SHAPES = {"a.weight": (64, 48), "b.weight": (48,), "c.weight": (3, 5, 7)}


def bf16_params(scale: float = 1.0) -> dict[str, torch.nn.Parameter]:
    torch.manual_seed(0)
    return {n: torch.nn.Parameter((torch.randn(s) * scale).to(torch.bfloat16))
            for n, s in SHAPES.items()}


def reference_update(master, seeds, signs, z, lr, sigma, realized: bool):
    """theta + lr/N * sum_i z_i * d_i in float64, d_i the realized perturbation
    (bf16(theta + s_i sigma eps_i) - bf16(theta)) / sigma, or the intended s_i * eps_i."""
    out = {}
    for name, theta in master.items():
        acc = torch.zeros(theta.shape, dtype=torch.float64)
        for seed, sign, zi in zip(seeds.tolist(), signs.tolist(), z.tolist(), strict=True):
            eps = tensor_noise(seed, name, theta.shape, torch.device("cpu"))
            if realized:
                moved = (theta + sign * sigma * eps).to(torch.bfloat16).double()
                d = (moved - theta.to(torch.bfloat16).double()) / sigma
            else:
                d = sign * eps.double()
            acc += zi * d
        out[name] = theta.double() + lr / len(z) * acc
    return out


@pytest.mark.parametrize("on_host", [False, True])
def test_the_update_credits_what_the_replica_received(on_host):
    """A small sigma: many weights never move. Their masters stay bit-identical (no
    credit), and every weight's update matches the float64 reference."""
    params = bf16_params()
    replica = Replica(params, master_on_host=on_host, sigma=2e-3, credit="realized")
    before = {n: t.clone() for n, t in replica.master.items()}
    seeds = np.array([11, 11, 12, 12], dtype=np.int64)
    signs = np.array([1, -1, 1, -1], dtype=np.int8)
    z = np.array([1.5, -0.5, 0.25, -1.25])
    # what each member's replica really held, read from the parameters after perturb
    held = []
    for seed, sign in zip(seeds.tolist(), signs.tolist(), strict=True):
        replica.perturb(seed, sign, 2e-3)
        held.append({n: p.detach().clone() for n, p in params.items()})
    replica.restore()
    replica.update(seeds, signs, z, lr=0.1)
    want = reference_update(before, seeds, signs, z, 0.1, 2e-3, realized=True)
    unmoved_total = 0
    for name, theta in replica.master.items():
        rest = before[name].to(torch.bfloat16)
        unmoved = torch.stack([h[name] == rest for h in held]).all(0)
        unmoved_total += int(unmoved.sum())
        assert torch.equal(theta[unmoved], before[name][unmoved]), name
        torch.testing.assert_close(theta.double(), want[name], rtol=0, atol=1e-6)
    assert unmoved_total > 0.1 * sum(t.numel() for t in before.values()), "test is blind"
    # the paper's rule moves the unmoved weights too
    paper = reference_update(before, seeds, signs, z, 0.1, 2e-3, realized=False)
    assert any(not torch.allclose(paper[n], want[n], atol=1e-6) for n in want)


def test_intended_credit_and_fp32_are_the_plain_update():
    """credit "intended" (old run files) and fp32 replicas: the noise itself, as before."""
    seeds = np.array([5, 6], dtype=np.int64)
    signs = np.array([1, 1], dtype=np.int8)
    z = np.array([1.0, -1.0])
    for params, credit in ((bf16_params(), "intended"),
                           ({n: torch.nn.Parameter(p.float()) for n, p in bf16_params().items()},
                            "realized")):
        replica = Replica(params, sigma=2e-3, credit=credit)
        plain = {n: t.clone() for n, t in replica.master.items()}
        replica.update(seeds, signs, z, lr=0.1)
        es_update_(plain, seeds, signs, z, lr=0.1)
        for n in plain:
            assert torch.equal(replica.master[n], plain[n]), (credit, n)


def test_decay_applies_after_the_realized_perturbations_are_taken():
    """The members saw theta before the decay: the realized noise is read from it."""
    params = bf16_params()
    replica = Replica(params, sigma=5e-3, credit="realized")
    before = {n: t.clone() for n, t in replica.master.items()}
    seeds, signs, z = np.array([3, 4], np.int64), np.array([1, 1], np.int8), np.array([1., -1.])
    replica.update(seeds, signs, z, lr=0.05, weight_decay=0.5)
    want = reference_update(before, seeds, signs, z, 0.05, 5e-3, realized=True)
    for n, theta in replica.master.items():
        want_n = want[n] - 0.05 * 0.5 * before[n].double()
        torch.testing.assert_close(theta.double(), want_n, rtol=0, atol=1e-6)


def test_rounding_loss_counts_the_weights_that_do_not_move():
    params = bf16_params()
    replica = Replica(params, sigma=2e-3, credit="realized")
    got = replica.rounding_loss(99)
    unmoved = total = 0
    dot = a2 = b2 = 0.0
    for n, p in params.items():
        theta = p.detach().double()
        eps = tensor_noise(99, n, p.shape, torch.device("cpu")).double() * 2e-3
        real = (theta + eps).to(torch.bfloat16).double() - p.detach().double()
        unmoved += int((real == 0).sum())
        total += p.numel()
        dot, a2, b2 = dot + float((real * eps).sum()), a2 + float(real.square().sum()), \
            b2 + float(eps.square().sum())
    assert got["unmoved"] == pytest.approx(unmoved / total, abs=2 / total)
    assert got["noise_cosine"] == pytest.approx(dot / (a2 * b2) ** 0.5, abs=1e-3)
    assert 0.05 < got["unmoved"] < 0.95
    fp32 = Replica({n: torch.nn.Parameter(p.float()) for n, p in params.items()}, sigma=2e-3)
    assert fp32.rounding_loss(99) == {}


BF16 = ["--dtype", "bfloat16", "--population", "4", "--antithetic", "--sigma", "0.002",
        "--lr", "0.05", "--max-new-tokens", "4", "--checkpoint-every", "2", "-q"]


@pytest.mark.mpi
def test_bf16_full_mode_is_bit_identical_on_any_rank_count_and_resume(tiny_model, tmp_path):
    two, one = tmp_path / "two.h5", tmp_path / "one.h5"
    result = run_cli(["train", "--model", tiny_model, "--run", two, "--generations", "3",
                      *BF16], np=2)
    assert result.returncode == 0, result.stderr
    cli_in_process(["train", "--model", tiny_model, "--run", one, "--generations", "1",
                    *BF16])
    cli_in_process(["resume", one, "--generations", "3", "-q"])
    with h5py.File(two, "r") as a, h5py.File(one, "r") as b:
        assert len(np.unique(a["generations/rewards"][:3])) > 1, "rewards do not vary"
        np.testing.assert_array_equal(a["generations/checksum"][:3],
                                      b["generations/checksum"][:3])
        config = json.loads(a.attrs["config"])
        hw = json.loads(a.attrs["hardware"])[0]
    assert config["credit"] == "realized" and hw["dtype"] == "bfloat16"
    assert 0 < hw["unmoved"] < 1 and 0 < hw["noise_cosine"] <= 1


def test_train_says_when_the_dtype_loses_the_perturbation(tiny_model, tmp_path):
    """A sigma far below bf16's step: one line names the loss; the loss is recorded, and
    equals a count made here from the model's weights and the same noise."""
    from safetensors.torch import load_file

    run = tmp_path / "r.h5"
    result = run_cli(["train", "--model", tiny_model, "--run", run, "--generations", "1",
                      "--dtype", "bfloat16", "--population", "2", "--sigma", "1e-4",
                      "--max-new-tokens", "2", "--seed", "7"])
    assert result.returncode == 0, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if "round back" in ln]
    assert len(lines) == 1 and "--sigma" in lines[0], result.stderr
    with h5py.File(run, "r") as f:
        hw = json.loads(f.attrs["hardware"])[0]
    weights = load_file(tiny_model / "model.safetensors")
    seed = derive_seed(7, "rounding")
    unmoved = total = 0
    for name, w in weights.items():
        theta = w.to(torch.bfloat16).float()  # the master of a bf16 replica
        eps = tensor_noise(seed, name, theta.shape, torch.device("cpu"))
        moved = torch.add(theta, eps, alpha=1e-4).to(torch.bfloat16)
        unmoved += int((moved == theta.to(torch.bfloat16)).sum())
        total += theta.numel()
    assert hw["unmoved"] == pytest.approx(unmoved / total, abs=1e-6)
    assert f"{hw['unmoved']:.0%}" in lines[0]
    quiet = run_cli(["train", "--model", tiny_model, "--run", tmp_path / "f.h5",
                     "--generations", "1", "--population", "2", "--max-new-tokens", "2"])
    assert "round back" not in quiet.stderr + quiet.stdout


def test_run_files_from_before_the_credit_replay_as_they_were_made():
    from es_mpi.config import Config

    legacy = json.loads(Config(model="m").to_json())
    del legacy["credit"]
    assert Config.from_json(json.dumps(legacy)).credit == "intended"
    assert Config(model="m").credit == "realized"


def test_float16_overflow_is_one_error_line_not_garbage_tokens(tiny_model, tmp_path):
    """float16 tops out at 65504: logits past it are inf, and greedy decoding would pick
    tokens from them without a word. A model whose LM head overflows fails with one line;
    the tiny model itself runs in float16."""
    import shutil

    from conftest import one_error_line
    from transformers import AutoModelForCausalLM

    big = tmp_path / "big"
    shutil.copytree(tiny_model, big)
    model = AutoModelForCausalLM.from_pretrained(big)
    model.config.tie_word_embeddings = False
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone() * 1e6)
    model.save_pretrained(big)
    ok = run_cli(["train", "--model", tiny_model, "--run", tmp_path / "ok.h5", "--dtype",
                  "float16", "--generations", "1", "--population", "2", "--max-new-tokens",
                  "2", "-q"])
    assert ok.returncode == 0, ok.stderr
    bad = run_cli(["train", "--model", big, "--run", tmp_path / "bad.h5", "--dtype",
                   "float16", "--generations", "1", "--population", "2", "--max-new-tokens",
                   "2", "-q"])
    one_error_line(bad, "float16 overflow", "--dtype bfloat16")
