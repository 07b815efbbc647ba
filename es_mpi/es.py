"""The ES core on tensors: perturb, restore, update, checksum. No MPI, no transformers.

`Replica` pairs the model's own parameters (any dtype, any device) with an fp32 master
copy of them. A member is evaluated by writing `master + sign * sigma * eps` into the
parameters and restored by copying the master back, so nothing drifts. The update is
accumulated in fp32, tensor by tensor, from noise regenerated from the seeds: no
whole-model noise vector ever exists.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import torch

from es_mpi.noise import SEED_MASK, tensor_noise


def noise_coefficients(seeds_n: np.ndarray, signs_n: np.ndarray,
                       z_n: np.ndarray) -> list[tuple[int, float]]:
    """Collapse members that share a noise seed: [(seed, sum of sign * z)], in member order.

    With antithetic pairs this halves the noise to regenerate: z+ eps + z- (-eps).
    """
    coef: dict[int, float] = {}
    for seed, sign, z in zip(seeds_n.tolist(), signs_n.tolist(), z_n.tolist(), strict=True):
        coef[seed] = coef.get(seed, 0.0) + sign * z
    return list(coef.items())


@torch.no_grad()
def es_update_(master: Mapping[str, torch.Tensor], seeds_n: np.ndarray, signs_n: np.ndarray,
               z_n: np.ndarray, lr: float, weight_decay: float = 0.0,
               anchor: Mapping[str, torch.Tensor] | None = None) -> None:
    """theta += lr/N * sum_i z_i * sign_i * eps_i  (- lr * wd * (theta - anchor)), in place.

    The same inputs give bit-identical results on every rank: members are summed in
    member order and every tensor's noise is regenerated from its seed.
    """
    n = len(z_n)
    terms = [(s, c) for s, c in noise_coefficients(seeds_n, signs_n, z_n) if c != 0.0]
    for name, theta in master.items():
        if weight_decay:
            if anchor is None:
                theta.mul_(1.0 - lr * weight_decay)
            else:
                theta.sub_(theta - anchor[name].to(theta.device, torch.float32),
                           alpha=lr * weight_decay)
        if not terms:
            continue
        acc = torch.zeros_like(theta)
        for seed, c in terms:
            acc.add_(tensor_noise(seed, name, theta.shape, theta.device), alpha=c)
        theta.add_(acc, alpha=lr / n)


def checksum(tensors: Mapping[str, torch.Tensor]) -> int:
    """A 63-bit fingerprint of tensors' exact bits (integer sums, so order-free and exact)."""
    h = hashlib.blake2b(digest_size=8, person=b"es-mpi-check")
    int_view = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}
    for name, t in tensors.items():
        bits = t.detach().contiguous().view(int_view[t.element_size()]).reshape(-1)
        total = 0
        for chunk in bits.split(1 << 24):
            total += int(chunk.sum(dtype=torch.int64))
        h.update(name.encode())
        h.update(total.to_bytes(16, "little", signed=True))
        h.update(str(tuple(t.shape)).encode())
    return int.from_bytes(h.digest(), "little") & SEED_MASK


class Replica:
    """A model's trainable parameters plus their fp32 master copy."""

    def __init__(self, params: Mapping[str, torch.nn.Parameter]):
        self.params = dict(params)
        with torch.no_grad():
            self.master = {n: p.detach().to(torch.float32, copy=True)
                           for n, p in self.params.items()}

    @torch.no_grad()
    def perturb(self, seed: int, sign: int, sigma: float) -> None:
        """Write master + sign * sigma * eps(seed) into the parameters."""
        for name, p in self.params.items():
            theta = self.master[name]
            eps = tensor_noise(seed, name, theta.shape, theta.device)
            if p.dtype == torch.float32:
                torch.add(theta, eps, alpha=sign * sigma, out=p.data)
            else:
                p.data.copy_(theta.add(eps, alpha=sign * sigma))

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the master back into the parameters (exact: no subtraction)."""
        for name, p in self.params.items():
            p.data.copy_(self.master[name])

    @torch.no_grad()
    def load_master(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Replace the master (e.g. from a checkpoint) and sync the parameters."""
        for name, theta in self.master.items():
            theta.copy_(tensors[name])
        self.restore()

    def update(self, seeds_n, signs_n, z_n, lr, weight_decay=0.0, anchor=None) -> None:
        es_update_(self.master, seeds_n, signs_n, z_n, lr, weight_decay, anchor)
        self.restore()

    def checksum(self) -> int:
        return checksum(self.master)
