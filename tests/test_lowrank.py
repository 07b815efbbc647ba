"""Lowrank mode computes what it claims: batched members == materialized perturbed weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny_model import ARCHS, make_tiny_arch, make_tiny_model

from es_mpi import lowrank
from es_mpi.es import LowRankNoise, Replica, es_update_
from es_mpi.noise import lowrank_factors

MODELS = ["untied", "tied", *ARCHS]  # the Llama of most tests, then the architecture matrix


@pytest.fixture(scope="module", params=MODELS)
def model64(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    where = tmp_path_factory.mktemp(f"lr-{request.param}")
    if request.param in ARCHS:
        path = make_tiny_arch(where, request.param)
    else:
        path = make_tiny_model(where, tie=request.param == "tied")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    model.eval()
    return model


def matrix_names(model) -> list[str]:
    """Every weight of two dimensions, from the parameters alone (tied ones once)."""
    return [n for n, p in model.named_parameters() if p.dim() == 2]


def materialized_logits(model, name_seed_sign, sigma, rank, ids):
    """Logits of one member with W + sign * sigma * A B^T / sqrt(r) written into a copy of
    every 2-D weight, in the layout it is stored in (Conv1D's is in x out)."""
    import copy

    member = copy.deepcopy(model)
    params = dict(member.named_parameters())
    with torch.no_grad():
        for name in matrix_names(member):
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
                                             sigma, rows=ids.shape[0]):
        batched = model64(input_ids=ids).logits
    base = model64(input_ids=prompts).logits
    for k, (seed, sign) in enumerate(zip(seeds, signs, strict=True)):
        want = materialized_logits(model64, (seed, sign), sigma, rank, prompts)
        got = batched[2 * k:2 * k + 2]
        assert (got - base).abs().max() > 1e-3  # the perturbation does something
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # the wrappers are gone after the block
    torch.testing.assert_close(model64(input_ids=prompts).logits, base, rtol=0, atol=0)


def test_a_forward_already_wrapped_by_accelerate_is_kept(tmp_path):
    """accelerate's device hooks replace a module's forward on the instance (a replica
    loaded with a device_map): lowrank wraps that forward for the block, the members
    still equal their written-out weights, and afterwards each module has the very
    forward it had before, hook and all."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
    from transformers import AutoModelForCausalLM

    class Count(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path), dtype=torch.float64)
    matrices = lowrank.perturbed_matrices(model)
    modules = [use.module for uses in matrices.values() for use in uses]
    for module in modules:
        add_hook_to_module(module, Count())
    before = [module.__dict__["forward"] for module in modules]
    torch.manual_seed(1)
    prompts = torch.randint(3, model.config.vocab_size, (2, 5))
    master = {n: p.data for n, p in model.named_parameters() if n in matrices}
    seeds, signs, sigma = [7, 7], [1, -1], 0.05
    with torch.no_grad(), lowrank.population(matrices, master, LowRankNoise(1), seeds, signs,
                                             sigma, rows=4):
        batched = model(input_ids=prompts.repeat(2, 1)).logits
    assert Count.calls == len(modules)  # accelerate's forward ran inside the wrapper
    assert [module.__dict__["forward"] for module in modules] == before
    for module in modules:  # a plain model for the written-out weights below
        remove_hook_from_module(module)
    for k, (seed, sign) in enumerate(zip(seeds, signs, strict=True)):
        want = materialized_logits(model, (seed, sign), sigma, 1, prompts)
        torch.testing.assert_close(batched[2 * k:2 * k + 2], want, rtol=1e-9, atol=1e-9)


def test_every_matrix_is_perturbed_and_nothing_else(model64):
    matrices = lowrank.perturbed_matrices(model64)
    assert list(matrices) == matrix_names(model64)
    embedding = model64.get_input_embeddings().weight
    name = next(n for n, p in model64.named_parameters() if p is embedding)
    tied = model64.get_output_embeddings().weight is embedding
    assert len(matrices[name]) == (2 if tied else 1)  # a tied LM head reads it too


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
    assert rep.master["w"].data_ptr() == p.data_ptr()  # no second copy of the weights
    rep.update(np.array([5, 6]), np.array([1, 1], dtype=np.int8), np.array([1.0, -1.0]), 0.1)
    assert torch.equal(rep.master["w"], p.data)
    half = torch.nn.Parameter(torch.randn(4, 3).to(torch.bfloat16), requires_grad=False)
    rep16 = Replica({"w": half}, LowRankNoise(1), share_master=True)
    assert rep16.master["w"].dtype == torch.float32  # bf16 keeps an fp32 master


class _Doubled(torch.nn.Linear):
    def forward(self, x):  # a layout lowrank cannot know: the output is 2 x W x
        return 2 * super().forward(x)


class _Scaled(torch.nn.Embedding):
    """Looks like a scaled embedding by name, but its forward adds, not multiplies."""

    def __init__(self):
        super().__init__(10, 4)
        self.embed_scale = torch.tensor(2.0)

    def forward(self, ids):
        return super().forward(ids) + self.embed_scale


_Scaled.__name__ = "FakeScaledWordEmbedding"


def test_unknown_weight_holders_are_refused_by_name():
    from es_mpi.errors import EsError

    plain = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
    assert list(lowrank.perturbed_matrices(plain)) == ["0.weight", "1.weight"]

    cases = {
        "1.weight (_Doubled)": torch.nn.Sequential(torch.nn.Embedding(10, 4), _Doubled(4, 4)),
        "0.weight (FakeScaledWordEmbedding)": torch.nn.Sequential(_Scaled()),
        "0.weight (Conv2d)": torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3)),
        "0.weight (Embedding)": torch.nn.Sequential(torch.nn.Embedding(10, 4, max_norm=1.0)),
    }
    experts = torch.nn.Module()
    experts.gate_up = torch.nn.Parameter(torch.zeros(3, 4, 4))  # a fused MoE tensor, 3-D
    cases["gate_up (Module)"] = experts
    for named, model in cases.items():
        with pytest.raises(EsError) as err:
            lowrank.perturbed_matrices(model)
        assert named in str(err.value) and "--mode full" in str(err.value)


def test_a_weight_shared_with_an_unknown_module_is_refused():
    from es_mpi.errors import EsError

    emb, head = torch.nn.Embedding(10, 4), _Doubled(4, 10)
    head.weight = emb.weight  # tied, but the head reads it through a forward we cannot see
    with pytest.raises(EsError, match=r"0\.weight \(_Doubled\)"):
        lowrank.perturbed_matrices(torch.nn.Sequential(emb, head))
