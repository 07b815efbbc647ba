"""The ES core on tensors: perturb, restore, update, checksum. No MPI, no transformers.

`Replica` pairs the model's trained parameters (any dtype, any device) with an fp32
master copy of them. In full mode a member is evaluated by writing `master + sign *
sigma * eps` into the parameters and restored by copying the master back, so nothing
drifts. In lowrank mode the parameters are never perturbed (es_mpi.lowrank adds the
perturbation inside the forward pass), so fp32 parameters serve as their own master.
The update is accumulated in fp32, tensor by tensor, from noise regenerated from the
seeds: no whole-model noise vector ever exists.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import torch

from es_mpi.noise import NOISE_CHUNK, SEED_MASK, FullNoise, LowRankNoise, chunk_noise, chunks


def noise_coefficients(seeds_n: np.ndarray, signs_n: np.ndarray,
                       z_n: np.ndarray) -> list[tuple[int, float]]:
    """Collapse members that share a noise seed: [(seed, sum of sign * z)], in member order.

    With antithetic pairs this halves the noise to regenerate: z+ eps + z- (-eps).
    """
    coef: dict[int, float] = {}
    for seed, sign, z in zip(seeds_n.tolist(), signs_n.tolist(), z_n.tolist(), strict=True):
        coef[seed] = coef.get(seed, 0.0) + sign * z
    return list(coef.items())


def _work(tensors: Mapping[str, torch.Tensor]) -> dict[torch.device, torch.Tensor]:
    """fp32 work space, two noise chunks per device (reused: no fresh allocations)."""
    return {d: torch.empty(2 * NOISE_CHUNK, dtype=torch.float32, device=d)
            for d in {t.device for t in tensors.values()}}


@torch.no_grad()
def es_update_(master: Mapping[str, torch.Tensor], seeds_n: np.ndarray, signs_n: np.ndarray,
               z_n: np.ndarray, lr: float, weight_decay: float = 0.0,
               anchor: Mapping[str, torch.Tensor] | None = None,
               noise: FullNoise | LowRankNoise | None = None,
               work: dict[torch.device, torch.Tensor] | None = None,
               sums: dict[str, int] | None = None) -> None:
    """theta += lr/N * sum_i z_i * sign_i * eps_i  (- lr * wd * (theta - anchor)), in place.

    The same inputs give bit-identical results on every rank: members are summed in
    member order and every tensor's noise is regenerated from its seed. `sums`: also
    fill it with each updated tensor's bit sum (`bit_sum`), read while the tensor
    is still in cache.
    """
    noise = noise or FullNoise()
    n = len(z_n)
    terms = [(s, c) for s, c in noise_coefficients(seeds_n, signs_n, z_n) if c != 0.0]
    if terms and work is None and noise.needs_work:
        work = _work(master)
    for name, theta in master.items():
        if weight_decay:
            if anchor is None:
                theta.mul_(1.0 - lr * weight_decay)
            else:
                theta.sub_(theta - anchor[name].to(theta.device, torch.float32),
                           alpha=lr * weight_decay)
        if terms:
            noise.add_update_(theta, name, terms, lr / n,
                              work[theta.device] if work is not None else None)
        if sums is not None:
            sums[name] = bit_sum(theta)


_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def bit_sum(t: torch.Tensor) -> int:
    """The exact sum of a tensor's elements read as integers of their width."""
    bits = t.detach().contiguous().view(_INT_VIEW[t.element_size()]).reshape(-1)
    total = 0
    for chunk in bits.split(1 << 22):
        if chunk.device.type == "cpu":  # numpy's widening sum: ~9x torch's on a CPU
            total += int(np.add.reduce(chunk.numpy(), dtype=np.int64))
        else:
            total += int(chunk.sum(dtype=torch.int64))
    return total


def checksum(tensors: Mapping[str, torch.Tensor], sums: Mapping[str, int] | None = None) -> int:
    """A 63-bit fingerprint of tensors' exact bits (integer sums, so order-free and exact).
    `sums`: their bit sums where already taken (es_update_), the same numbers."""
    h = hashlib.blake2b(digest_size=8, person=b"es-mpi-check")
    for name, t in tensors.items():
        total = sums[name] if sums is not None and name in sums else bit_sum(t)
        h.update(name.encode())
        h.update(total.to_bytes(16, "little", signed=True))
        h.update(str(tuple(t.shape)).encode())
    return int.from_bytes(h.digest(), "little") & SEED_MASK


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """An fp32 copy of `t` in host memory (pinned where there is CUDA, for fast copies)."""
    out = torch.empty(t.shape, dtype=torch.float32, device="cpu",
                      pin_memory=torch.cuda.is_available())
    out.copy_(t)
    return out


class Replica:
    """A model's trained parameters plus their fp32 master copy.

    `share_master`: fp32 parameters are their own master (lowrank mode, where the
    parameters are never perturbed in place), saving a copy of the model.
    `master_on_host`: the master lives in host memory; each tensor is staged on its
    parameter's device for the arithmetic (perturb, update), which therefore runs on the
    same device as with a device master and gives the same bits.
    """

    def __init__(self, params: Mapping[str, torch.nn.Parameter],
                 noise: FullNoise | LowRankNoise | None = None, share_master: bool = False,
                 master_on_host: bool = False):
        self.params = dict(params)
        self.noise = noise or FullNoise()
        self._perturbed: tuple[int, int] | None = None  # (seed, sign) held by the params
        self.on_host = master_on_host
        with torch.no_grad():
            if self.on_host:
                self.master = {n: host_copy(p.detach()) for n, p in self.params.items()}
            else:
                self.master = {
                    n: p.data if share_master and p.dtype == torch.float32
                    else p.detach().to(torch.float32, copy=True)
                    for n, p in self.params.items()}
        self._work: dict[torch.device, torch.Tensor] | None = None
        self._staging: dict[torch.device, torch.Tensor] = {}

    def _staged(self, name: str) -> torch.Tensor:
        """The master of `name` where the arithmetic runs: itself, or (host master) a
        copy in a reused fp32 buffer on its parameter's device."""
        theta = self.master[name]
        if not self.on_host:
            return theta
        device = self.params[name].device
        buf = self._staging.get(device)
        if buf is None:  # one buffer per device, the size of its largest tensor
            largest = max(t.numel() for n, t in self.master.items()
                          if self.params[n].device == device)
            buf = self._staging[device] = torch.empty(largest, dtype=torch.float32,
                                                      device=device)
        out = buf[:theta.numel()].view(theta.shape)
        out.copy_(theta, non_blocking=True)
        return out

    def _shares(self, name: str) -> bool:
        # `p.data` is a new tensor object on each access: compare storage, not identity
        return self.master[name].data_ptr() == self.params[name].data_ptr()

    @torch.no_grad()
    def perturb(self, seed: int, sign: int, sigma: float) -> None:
        """Write master + sign * sigma * eps(seed) into the parameters (full mode).

        The mirror of an fp32 member is defined as theta - (theta+ - theta), where
        theta+ = fl(theta + sigma * eps): from the parameters holding theta+ it costs
        no noise at all, which halves the noise of antithetic pairs. Every rank uses
        the same definition, so results do not depend on where a member is evaluated.
        """
        if self._work is None:
            self._work = _work(self.params)
        plus_held = self._perturbed == (seed, 1)
        for name, p in self.params.items():
            theta = self._staged(name)
            work = self._work[theta.device]
            for k, (th, pc) in enumerate(zip(chunks(theta), chunks(p.data), strict=True)):
                buf = work[:th.numel()]
                if p.dtype == torch.float32 and sign < 0:
                    if not plus_held:
                        torch.add(th, chunk_noise(seed, name, k, buf), alpha=sigma, out=pc)
                    torch.sub(pc, th, out=buf)
                    torch.sub(th, buf, out=pc)
                elif p.dtype == torch.float32:
                    torch.add(th, chunk_noise(seed, name, k, buf), alpha=sign * sigma, out=pc)
                else:
                    pc.copy_(th.add(chunk_noise(seed, name, k, buf), alpha=sign * sigma))
        self._perturbed = (seed, sign)

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the master back into the parameters (exact: no subtraction)."""
        for name, p in self.params.items():
            if not self._shares(name):
                p.data.copy_(self.master[name])
        self._perturbed = None

    def update(self, seeds_n, signs_n, z_n, lr, weight_decay=0.0, anchor=None,
               with_checksum: bool = False) -> int | None:
        """The ES update of the master, copied into the parameters; `with_checksum`: return
        the new weights' checksum (taken tensor by tensor as each is updated, the same
        number as `checksum()` after the update, one pass over memory fewer)."""
        sums: dict[str, int] | None = {} if with_checksum else None
        if not self.on_host:
            es_update_(self.master, seeds_n, signs_n, z_n, lr, weight_decay, anchor,
                       self.noise, sums=sums)
        else:  # tensor by tensor on its device, then back to the host master
            if self._work is None and self.noise.needs_work:
                self._work = _work(self.params)
            for name, host in self.master.items():
                theta = self._staged(name)
                es_update_({name: theta}, seeds_n, signs_n, z_n, lr, weight_decay, anchor,
                           self.noise, self._work, sums)
                host.copy_(theta)
        self.restore()
        return None if sums is None else checksum(self.master, sums)

    def checksum(self) -> int:
        return checksum(self.master)
