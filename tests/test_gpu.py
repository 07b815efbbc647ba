"""On a real GPU: binding, lowrank factors, the host master, loading, a split replica.
Skipped without CUDA (tests/test_binding.py checks the binding logic on a faked CUDA).
None of these has run on a GPU yet: no GPU was available while they were written."""

from __future__ import annotations

import textwrap

import pytest
import torch
from conftest import run_python_mpi

pytestmark = pytest.mark.cuda

needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@needs_two_gpus
def test_each_rank_binds_its_own_gpu(tmp_path):
    script = tmp_path / "bind.py"
    script.write_text(textwrap.dedent("""
        from es_mpi.devices import bind
        from es_mpi.dist import Dist
        import torch
        d = Dist()
        devices = bind(d, 1)
        print(f"rank {d.rank} local {d.local_rank} device {devices[0]} "
              f"current {torch.cuda.current_device()}", flush=True)
    """))
    result = run_python_mpi(script, [], np=2)
    assert result.returncode == 0, result.stderr
    lines = sorted(ln for ln in result.stdout.splitlines() if ln.startswith("rank"))
    assert lines == ["rank 0 local 0 device cuda:0 current 0",
                     "rank 1 local 1 device cuda:1 current 1"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_more_ranks_than_gpus_is_a_clear_error_unless_shared(tmp_path):
    """One more rank than the node's GPUs, every rank seeing them all (mpiexec): the last
    has none of its own. Before, a one-GPU node took a shortcut (`visible == k`) and put
    both ranks on GPU 0 without a word."""
    n = torch.cuda.device_count()
    script = tmp_path / "bind.py"
    script.write_text(textwrap.dedent("""
        import sys
        from es_mpi.devices import bind
        from es_mpi.dist import Dist
        from es_mpi.errors import EsError
        d = Dist()
        try:
            text = f"got {bind(d, 1, sys.argv[1] == 'share')[0]}"
        except EsError as exc:
            text = f"error {exc}"
        with open(f"{sys.argv[2]}.{d.rank}", "w") as fh:  # mpiexec may merge stdout lines
            fh.write(text)
    """))
    for mode, want in (("alone", "error"), ("share", "got cuda:")):
        result = run_python_mpi(script, [mode, tmp_path / mode], np=n + 1)
        assert result.returncode == 0, result.stderr
        texts = [(tmp_path / f"{mode}.{r}").read_text() for r in range(n + 1)]
        assert all(t.startswith(want) for t in texts), texts
        if mode == "alone":
            assert all("--share-gpus" in t for t in texts), texts


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
def test_lowrank_factors_are_drawn_on_the_cpu_whatever_the_device():
    """A GPU's generator depends on the GPU model; lowrank noise must not."""
    from es_mpi.noise import derive_seed, lowrank_factors

    a, b = lowrank_factors(7, "layer.weight", torch.Size((96, 64)), 2, "cuda")
    gen = torch.Generator().manual_seed(derive_seed(7, "layer.weight"))
    want = torch.randn((96 + 64, 2), generator=gen)  # written out: one CPU draw, split
    assert a.device.type == "cuda"
    assert torch.equal(a.cpu(), want[:96]) and torch.equal(b.cpu(), want[96:])


@needs_cuda
@pytest.mark.parametrize("kind", ["full", "lowrank"])
def test_master_in_host_memory_matches_the_device_master_on_cuda(kind):
    """bf16 parameters on the GPU: perturb, restore and update give the same bits with the
    fp32 master in (pinned) host memory as with the master on the GPU."""
    import numpy as np

    from es_mpi.es import FullNoise, LowRankNoise, Replica

    torch.manual_seed(0)
    shapes = {"a.weight": (256, 128), "b.weight": (64, 256), "c.bias": (64,)}
    if kind == "lowrank":
        shapes.pop("c.bias")
    base = {n: torch.randn(s) for n, s in shapes.items()}
    replicas = []
    for on_host in (False, True):
        params = {n: torch.nn.Parameter(t.to("cuda", torch.bfloat16)) for n, t in base.items()}
        noise = FullNoise() if kind == "full" else LowRankNoise(2)
        replicas.append((params, Replica(params, noise, master_on_host=on_host)))
    assert replicas[1][1].master["a.weight"].device.type == "cpu"
    seeds = np.array([11, 11, 12, 12], dtype=np.int64)
    signs = np.array([1, -1, 1, -1], dtype=np.int8)
    for step in range(3):
        z = np.array([0.5, -1.0, 1.5, -0.25]) * (step + 1)
        for _, replica in replicas:
            if kind == "full":
                replica.perturb(int(seeds[2]), -1, 0.01)
            replica.update(seeds, signs, z, lr=0.1, weight_decay=0.01)
        (p_dev, r_dev), (p_host, r_host) = replicas
        assert r_dev.checksum() == r_host.checksum()
        for n in p_dev:
            assert torch.equal(p_dev[n], p_host[n]), n
    assert not torch.equal(r_dev.master["a.weight"].cpu(), base["a.weight"])


@needs_cuda
def test_the_model_loads_straight_onto_the_gpu(tiny_model):
    from es_mpi.model import load_model

    model, _ = load_model(str(tiny_model), "bfloat16", [torch.device("cuda", 0)])
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@needs_cuda
def test_lowrank_on_a_replica_split_across_devices(tiny_model, tmp_path):
    """Layers alternate between the GPU and the CPU: each hook sees its input where the
    previous layer left it. The batched members equal the perturbed weights written into
    an unsplit fp64 copy.

    A device map with "cpu" entries beside a GPU means offload to accelerate (those
    parameters go to `meta` and are streamed in): the split is dispatched with the CPU as
    the main device instead, so CPU layers keep their weights and compute there."""
    import math

    from accelerate import dispatch_model
    from tiny_model import make_tiny_model
    from transformers import AutoModelForCausalLM

    from es_mpi import lowrank
    from es_mpi.es import LowRankNoise
    from es_mpi.noise import lowrank_factors

    path = make_tiny_model(tmp_path / "four", layers=4)
    split = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": "cpu",
             "lm_head": 0, **{f"model.layers.{i}": (0 if i % 2 else "cpu") for i in range(4)}}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = dispatch_model(model, device_map=split, main_device="cpu")
    assert {p.device.type for p in model.parameters()} == {"cuda", "cpu"}
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    torch.manual_seed(0)
    prompts = torch.randint(3, model.config.vocab_size, (2, 7))
    seeds, signs, sigma, rank = [11, 29], [1, -1], 0.05, 2
    matrices = lowrank.perturbed_matrices(model)
    master = {n: p.data for n, p in model.named_parameters() if n in matrices}
    ids = prompts.repeat(len(seeds), 1).to("cuda")
    with torch.no_grad(), lowrank.population(matrices, master, LowRankNoise(rank), seeds, signs,
                                             sigma, rows=ids.shape[0]):
        batched = model(input_ids=ids).logits.double().cpu()
    for k, (seed, sign) in enumerate(zip(seeds, signs, strict=True)):
        member = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
        params = dict(member.named_parameters())
        with torch.no_grad():
            for name, w in params.items():
                if w.dim() == 2:
                    a, b = lowrank_factors(seed, name, w.shape, rank, "cpu")
                    w.add_((a.double() @ b.double().T) * (sign * sigma / math.sqrt(rank)))
            want = member(input_ids=prompts).logits
            base = ref(input_ids=prompts).logits
        assert (want - base).abs().max() > 1e-3
        torch.testing.assert_close(batched[2 * k:2 * k + 2], want, rtol=1e-4, atol=1e-4)
