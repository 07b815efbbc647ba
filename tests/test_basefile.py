"""theta_0 read back from the model's safetensors files equals the loaded parameters."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from es_mpi import model as hf
from es_mpi.basefile import BaseWeights


def test_base_weights_come_from_the_files_bit_exact(tiny_model):
    for dtype in ("float32", "bfloat16"):
        model, _ = hf.load_model(str(tiny_model), dtype, [torch.device("cpu")])
        params = dict(model.named_parameters())
        base = BaseWeights(str(tiny_model), params)
        assert base.held_bytes == 0  # nothing copied into memory
        assert list(base) == list(params)
        for name, p in params.items():
            assert base[name].dtype == torch.float32
            assert torch.equal(base[name], p.detach().float()), name


def test_a_tensor_the_files_do_not_reproduce_is_held_in_memory(tiny_model, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    weights = load_file(copy / "model.safetensors")
    name = "model.norm.weight"
    weights[name] = weights[name] + 1.0   # the file no longer matches the loaded model
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    model, _ = hf.load_model(str(copy), "float32", [torch.device("cpu")])
    params = dict(model.named_parameters())
    with torch.no_grad():
        params[name].sub_(1.0)           # the model as it was before the file changed
    base = BaseWeights(str(copy), params)
    assert base.held_bytes == params[name].numel() * 4
    assert torch.equal(base[name], params[name])


def test_rows_are_partial_reads_of_the_file(tiny_model):
    model, _ = hf.load_model(str(tiny_model), "float32", [torch.device("cpu")])
    params = dict(model.named_parameters())
    base = BaseWeights(str(tiny_model), params)
    for name, p in params.items():
        flat = p.detach().reshape(p.shape[0], -1)
        assert torch.equal(base.rows(name, 1, 3), flat[1:3]), name
        assert torch.equal(base.rows(name, 0, 10**6), flat), name
