"""Lowrank mode computes what it claims: batched hooks == materialized perturbed weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from es_mpi import lowrank
from es_mpi.es import LowRankNoise, Replica, es_update_
from es_mpi.noise import lowrank_factors


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def model64(request, tmp_path_factory):
    from tiny_model import make_tiny_model
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(tmp_path_factory.mktemp(f"lr{request.param}"), tie=request.param)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    model.eval()
    return model


def materialized_logits(model, name_seed_sign, sigma, rank, ids):
    """Logits of one member with W + sign * sigma * A B^T / sqrt(r) written into a copy."""
    import copy

    member = copy.deepcopy(model)
    params = dict(member.named_parameters())
    with torch.no_grad():
        for name in lowrank.perturbed_matrices(member):
            seed, sign = name_seed_sign
            w = params[name]
            a, b = lowrank_factors(seed, name, w.shape, rank, torch.device("cpu"))
            w.add_((a.double() @ b.double().T) * (sign * sigma / math.sqrt(rank)))
        return member(input_ids=ids).logits


@pytest.mark.parametrize("rank", [1, 3])
def test_batched_members_equal_materialized_weights(model64, rank):
    torch.manual_seed(0)
    prompts = torch.randint(3, model64.config.vocab_size, (2, 7))
    seeds, signs, sigma = [11, 11, 29], [1, -1, 1], 0.05
    matrices = lowrank.perturbed_matrices(model64)
    master = {n: p.data for n, p in model64.named_parameters() if n in matrices}
    ids = prompts.repeat(len(seeds), 1)  # member-major rows
    with torch.no_grad(), lowrank.population(matrices, master, LowRankNoise(rank), seeds, signs,
                                             sigma):
        batched = model64(input_ids=ids).logits
    base = model64(input_ids=prompts).logits
    for k, (seed, sign) in enumerate(zip(seeds, signs, strict=True)):
        want = materialized_logits(model64, (seed, sign), sigma, rank, prompts)
        got = batched[2 * k:2 * k + 2]
        assert (got - base).abs().max() > 1e-3  # the perturbation does something
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # hooks are gone after the block
    torch.testing.assert_close(model64(input_ids=prompts).logits, base, rtol=0, atol=0)


def test_every_matrix_is_perturbed_and_nothing_else(model64):
    matrices = lowrank.perturbed_matrices(model64)
    params = dict(model64.named_parameters())
    assert set(matrices) == {n for n, p in params.items() if p.dim() == 2}
    tied = model64.config.tie_word_embeddings
    assert len(matrices["model.embed_tokens.weight"]) == (2 if tied else 1)
    assert ("lm_head.weight" in matrices) is not tied


def test_update_is_the_sum_of_low_rank_terms():
    torch.manual_seed(1)
    w = torch.randn(6, 5)
    master = {"w": w.clone()}
    seeds_n = np.array([3, 3, 8], dtype=np.int64)
    signs_n = np.array([1, -1, 1], dtype=np.int8)
    z_n = np.array([0.7, -0.2, -0.5])
    es_update_(master, seeds_n, signs_n, z_n, lr=0.1, noise=LowRankNoise(2))
    want = w.double().clone()
    for seed, sign, z in zip(seeds_n, signs_n, z_n, strict=True):
        a, b = lowrank_factors(int(seed), "w", w.shape, 2, torch.device("cpu"))
        want += 0.1 / 3 * z * sign * (a.double() @ b.double().T) / math.sqrt(2)
    torch.testing.assert_close(master["w"].double(), want, rtol=1e-6, atol=1e-6)


def test_shared_master_fp32_is_the_parameter_itself():
    p = torch.nn.Parameter(torch.randn(4, 3), requires_grad=False)
    rep = Replica({"w": p}, LowRankNoise(1), share_master=True)
    assert rep.master["w"].data_ptr() == p.data_ptr()
    assert rep._shares("w")  # so restore() skips copying the weights onto themselves
    rep.update(np.array([5, 6]), np.array([1, 1], dtype=np.int8), np.array([1.0, -1.0]), 0.1)
    assert torch.equal(rep.master["w"], p.data)
    half = torch.nn.Parameter(torch.randn(4, 3).to(torch.bfloat16), requires_grad=False)
    rep16 = Replica({"w": half}, LowRankNoise(1), share_master=True)
    assert rep16.master["w"].dtype == torch.float32  # bf16 keeps an fp32 master
