"""Lowrank mode (EGGROLL): a whole population in one batched forward pass.

Member i perturbs each matrix W (out x in) by sigma * A_i B_i^T / sqrt(r). Instead of
writing that into W, a forward hook adds it to the module's output for the rows of
member i:

    Linear     y = x W^T + b     ->  y + sigma/sqrt(r) * (x B_i) A_i^T
    Embedding  e = W[ids]        ->  e + sigma/sqrt(r) * A_i[ids] B_i^T

The batch is member-major (member 0's prompts, then member 1's, ...), so rows reshape
to (members, rows per member, ...) and two thin batched matmuls do the work. The
weights stay untouched: every member and every prompt share one `generate` call.
Tied weights (an embedding reused as the LM head) are one parameter, so both uses get
the same factors, as the materialized W + sigma A B^T / sqrt(r) would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from es_mpi.es import LowRankNoise


def perturbed_matrices(model: torch.nn.Module) -> dict[str, list[torch.nn.Module]]:
    """Parameter name -> the Linear/Embedding modules whose weight it is, in model order.

    Every other parameter (norms, biases, anything not a Linear or Embedding weight)
    stays frozen in lowrank mode.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    found: dict[str, list[torch.nn.Module]] = {}
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            name = names.get(id(module.weight))
            if name is not None and module.weight.dim() == 2:
                found.setdefault(name, []).append(module)
    order = list(names.values())
    return dict(sorted(found.items(), key=lambda kv: order.index(kv[0])))


def _linear_hook(a: torch.Tensor, b: torch.Tensor):
    """a: (M, out, r) scaled by sign*sigma/sqrt(r); b: (M, in, r)."""
    members = a.shape[0]

    def hook(module, inputs, output):
        x = inputs[0]
        xm = x.reshape(members, -1, x.shape[-1])
        delta = torch.bmm(torch.bmm(xm, b), a.transpose(1, 2))
        return output + delta.reshape(output.shape)
    return hook


def _embedding_hook(a: torch.Tensor, b: torch.Tensor):
    """a: (M, vocab, r) scaled by sign*sigma/sqrt(r); b: (M, hidden, r)."""
    members = a.shape[0]

    def hook(module, inputs, output):
        ids = inputs[0].reshape(members, -1)
        rows = torch.gather(a, 1, ids.unsqueeze(-1).expand(-1, -1, a.shape[-1]))
        delta = torch.bmm(rows, b.transpose(1, 2))
        return output + delta.reshape(output.shape)
    return hook


@contextlib.contextmanager
def population(matrices: dict[str, list[torch.nn.Module]], master: dict[str, torch.Tensor],
               noise: LowRankNoise, seeds: list[int], signs: list[int],
               sigma: float) -> Iterator[None]:
    """Within the block, batch rows [k*P, (k+1)*P) of any forward pass see member k's
    perturbed weights (seeds[k], signs[k]), for P = rows // len(seeds)."""
    handles = []
    try:
        for name, modules in matrices.items():
            theta = master[name]
            weight = modules[0].weight
            pairs = [noise.factors(seed, name, theta) for seed in seeds]
            a = torch.stack([a for a, _ in pairs]).to(weight.device, weight.dtype)
            b = torch.stack([b for _, b in pairs]).to(weight.device, weight.dtype)
            a *= torch.tensor([sign * sigma * noise.scale for sign in signs], dtype=weight.dtype,
                              device=weight.device).view(-1, 1, 1)
            for module in modules:
                make = _embedding_hook if isinstance(module, torch.nn.Embedding) else _linear_hook
                handles.append(module.register_forward_hook(make(a, b)))
        yield
    finally:
        for handle in handles:
            handle.remove()
