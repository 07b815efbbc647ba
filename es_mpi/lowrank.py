"""Lowrank mode (EGGROLL): a whole population in one batched forward pass.

Member i perturbs each matrix W (out x in) by sigma * A_i B_i^T / sqrt(r). Instead of
writing that into W, a forward hook adds it to the module's output for the rows of
member i:

    Linear     y = x W^T + b     ->  y + sigma/sqrt(r) * (x B_i) A_i^T
    Embedding  e = W[ids]        ->  e + sigma/sqrt(r) * A_i[ids] B_i^T

The batch is member-major (member 0's prompts, then member 1's, ...). Each hook does two
thin GEMMs against all members' factors side by side, masked so a row keeps only its own
member's columns. The
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
    return {name: found[name] for name in names.values() if name in found}


def _row_scales(coef: torch.Tensor, rank: int, batch: int) -> torch.Tensor:
    """(batch, 1, M*r): row k (member k // P) keeps its own member's r columns, scaled
    by sign*sigma/sqrt(r), and zeroes every other member's."""
    members = coef.shape[0]
    own = torch.zeros(members, members * rank, dtype=coef.dtype, device=coef.device)
    for m in range(members):
        own[m, m * rank:(m + 1) * rank] = coef[m]
    return own.repeat_interleave(batch // members, dim=0).unsqueeze(1)


def _hook(a: torch.Tensor, b: torch.Tensor, coef: torch.Tensor, rank: int, embedding: bool):
    """a: (out, M*r), b: (in, M*r), every member's factors side by side.

    One GEMM against all members' factors, masked to each row's own member, then one
    GEMM back: M*r*(in + out) extra multiply-adds per row, a few percent of the layer.
    """
    cache: dict[int, torch.Tensor] = {}

    def hook(module, inputs, output):
        batch = output.shape[0]
        if batch not in cache:
            cache[batch] = _row_scales(coef, rank, batch)
        if embedding:   # e = W[ids]: the rows of A picked by the ids, against B
            low, back = torch.nn.functional.embedding(inputs[0], a), b
        else:
            low, back = inputs[0] @ b, a
        low *= cache[batch]
        # in place: the module's output is a fresh tensor that nothing else holds yet
        output.view(-1, output.shape[-1]).addmm_(low.view(-1, low.shape[-1]), back.T)
        return output
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
            a = torch.cat([a for a, _ in pairs], dim=1).to(weight.device, weight.dtype)
            b = torch.cat([b for _, b in pairs], dim=1).to(weight.device, weight.dtype)
            coef = torch.tensor([sign * sigma * noise.scale for sign in signs],
                                dtype=weight.dtype, device=weight.device)
            for module in modules:
                hook = _hook(a, b, coef, noise.rank, isinstance(module, torch.nn.Embedding))
                handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
