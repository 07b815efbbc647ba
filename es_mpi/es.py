"""The ES core on tensors: perturb, restore, update, checksum. No MPI, no transformers.

`Replica` pairs the model's trained parameters (any dtype, any device) with an fp32
master copy of them. In full mode a member is evaluated by writing `master + sign *
sigma * eps` into the parameters and restored by copying the master back, so nothing
drifts. In lowrank mode the parameters are never perturbed (es_mpi.lowrank adds the
perturbation inside the forward pass), so fp32 parameters serve as their own master.
The update is accumulated in fp32, tensor by tensor, from noise regenerated from the
seeds: no whole-model noise vector ever exists.

A 16-bit replica rounds `master + sigma * eps` to its dtype, and where sigma * eps is
below half a step of a weight, that weight does not move: the member is evaluated
unperturbed there. With credit "realized" (the default) the full-mode update credits each
member with what its replica really received, rounded(master + sign * sigma * eps) -
rounded(master), recomputed in the update with the very operations of `perturb`, so a
weight that never moved gets no credit (docs/gpu.md).
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


def _work(tensors: Mapping[str, torch.Tensor],
          chunks_per_device: int = 2) -> dict[torch.device, torch.Tensor]:
    """fp32 work space, noise chunks per device (reused: no fresh allocations): two for
    the update of fp32 replicas, three for the realized update of 16-bit ones."""
    return {d: torch.empty(chunks_per_device * NOISE_CHUNK, dtype=torch.float32, device=d)
            for d in {t.device for t in tensors.values()}}


def _half_work(tensors: Mapping[str, torch.Tensor], dtypes: Mapping[str, torch.dtype]
               ) -> dict[tuple[torch.device, torch.dtype], torch.Tensor]:
    """One noise chunk per (device, 16-bit dtype): a member's rounded weights."""
    keys = {(t.device, dtypes[n]) for n, t in tensors.items() if n in dtypes}
    return {(d, dt): torch.empty(NOISE_CHUNK, dtype=dt, device=d) for d, dt in keys}


def member_coefficients(seeds_n: np.ndarray, signs_n: np.ndarray,
                        z_n: np.ndarray) -> list[tuple[int, int, float]]:
    """[(seed, sign, sum of z)] over members with the same seed and sign, in member order,
    nonzero only: the realized update's terms (a mirrored member's rounded perturbation is
    not the negation of its partner's, so signs stay apart)."""
    coef: dict[tuple[int, int], float] = {}
    for seed, sign, z in zip(seeds_n.tolist(), signs_n.tolist(), z_n.tolist(), strict=True):
        coef[seed, sign] = coef.get((seed, sign), 0.0) + z
    return [(seed, sign, c) for (seed, sign), c in coef.items() if c != 0.0]


def _member_chunk_(th: torch.Tensor, seed: int, sign: int, sigma: float, name: str, k: int,
                   buf: torch.Tensor, rounded: torch.Tensor | None = None) -> torch.Tensor:
    """Chunk k of a member's perturbed weights, master + sign * sigma * eps, in fp32 in
    `buf`, and (where `rounded` is given) rounded to `rounded`'s dtype there. Replica.
    perturb and the realized update both make a member's weights with this one function,
    so they are the same bits."""
    torch.add(th, chunk_noise(seed, name, k, buf), alpha=sign * sigma, out=buf)
    if rounded is not None:
        rounded.copy_(buf)
    return buf


def _decay_(part: torch.Tensor, anchor: torch.Tensor | None, lr: float,
            weight_decay: float) -> None:
    if anchor is None:
        part.mul_(1.0 - lr * weight_decay)
    else:
        part.sub_(part - anchor.to(part.device, torch.float32), alpha=lr * weight_decay)


def _realized_update_(theta: torch.Tensor, name: str, dtype: torch.dtype,
                      terms: list[tuple[int, int, float]], alpha: float, sigma: float,
                      lr: float, weight_decay: float, anchor: torch.Tensor | None,
                      work: torch.Tensor, half: torch.Tensor) -> None:
    """theta += alpha/sigma * sum_j c_j (rounded(theta + s_j sigma eps_j) - rounded(theta)),
    with the decay applied in between, chunk by chunk: the realized perturbations are taken
    from theta as the members saw it, before the decay moves it."""
    acc_buf, buf, base_buf = work[:NOISE_CHUNK], work[NOISE_CHUNK:2 * NOISE_CHUNK], \
        work[2 * NOISE_CHUNK:]
    anchors = chunks(anchor) if anchor is not None else None
    for k, part in enumerate(chunks(theta)):
        acc, tmp, base = (b[:part.numel()] for b in (acc_buf, buf, base_buf))
        low = half[:part.numel()]
        if terms:
            low.copy_(part)
            base.copy_(low)              # rounded(theta): the replica at rest
            acc.zero_()
            for seed, sign, c in terms:
                _member_chunk_(part, seed, sign, sigma, name, k, tmp, low)
                tmp.copy_(low).sub_(base)
                acc.add_(tmp, alpha=c)
        if weight_decay:
            _decay_(part, anchors[k] if anchors is not None else None, lr, weight_decay)
        if terms:
            part.add_(acc, alpha=alpha / sigma)


@torch.no_grad()
def es_update_(master: Mapping[str, torch.Tensor], seeds_n: np.ndarray, signs_n: np.ndarray,
               z_n: np.ndarray, lr: float, weight_decay: float = 0.0,
               anchor: Mapping[str, torch.Tensor] | None = None,
               noise: FullNoise | LowRankNoise | None = None,
               work: dict[torch.device, torch.Tensor] | None = None,
               sums: dict[str, int] | None = None,
               realized: Mapping[str, torch.dtype] | None = None, sigma: float = 0.0,
               half: dict[tuple[torch.device, torch.dtype], torch.Tensor] | None = None
               ) -> None:
    """theta += lr/N * sum_i z_i * sign_i * eps_i  (- lr * wd * (theta - anchor)), in place.

    The same inputs give bit-identical results on every rank: members are summed in
    member order and every tensor's noise is regenerated from its seed. `sums`: also
    fill it with each updated tensor's bit sum (`bit_sum`), read while the tensor
    is still in cache. `realized`: tensors (name -> their replica's 16-bit dtype) whose
    members are credited with their rounded perturbation at `sigma` instead
    (_realized_update_; `work` then holds three fp32 chunks and `half` one of the dtype).
    """
    noise = noise or FullNoise()
    n = len(z_n)
    terms = [(s, c) for s, c in noise_coefficients(seeds_n, signs_n, z_n) if c != 0.0]
    if terms and work is None and noise.needs_work:
        work = _work(master, 3 if realized else 2)
    if realized and half is None:
        half = _half_work(master, realized)
    members = member_coefficients(seeds_n, signs_n, z_n) if realized else []
    for name, theta in master.items():
        if realized and name in realized:
            _realized_update_(theta, name, realized[name], members, lr / n, sigma, lr,
                              weight_decay, None if anchor is None else anchor[name],
                              work[theta.device], half[theta.device, realized[name]])
        else:
            if weight_decay:
                _decay_(theta, None if anchor is None else anchor[name], lr, weight_decay)
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
    `sigma`, `credit`: full mode's noise scale, and what its update credits a member of a
    16-bit replica with ("realized": the rounded perturbation; "intended": sigma * eps).
    """

    def __init__(self, params: Mapping[str, torch.nn.Parameter],
                 noise: FullNoise | LowRankNoise | None = None, share_master: bool = False,
                 master_on_host: bool = False, sigma: float = 0.0, credit: str = "intended"):
        self.params = dict(params)
        self.noise = noise or FullNoise()
        self.sigma = sigma
        # 16-bit tensors whose update credits the realized perturbation (full mode only)
        self.realized = {n: p.dtype for n, p in self.params.items()
                         if p.dtype != torch.float32} \
            if credit == "realized" and isinstance(self.noise, FullNoise) else {}
        if self.realized and not sigma > 0:
            raise ValueError("the realized credit needs the noise scale sigma")
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
        self._half: dict | None = None
        self._staging: dict[torch.device, torch.Tensor] = {}

    def _work_space(self) -> dict[torch.device, torch.Tensor]:
        """The reused fp32 work space: two noise chunks per device, three with the
        realized credit (its update keeps the rounded master beside the sum)."""
        if self._work is None:
            self._work = _work(self.params, 3 if self.realized else 2)
        return self._work

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
        plus_held = self._perturbed == (seed, 1)
        for name, p in self.params.items():
            theta = self._staged(name)
            work = self._work_space()[theta.device]
            for k, (th, pc) in enumerate(zip(chunks(theta), chunks(p.data), strict=True)):
                buf = work[:th.numel()]
                if p.dtype == torch.float32 and sign < 0:
                    if not plus_held:
                        torch.add(th, chunk_noise(seed, name, k, buf), alpha=sigma, out=pc)
                    torch.sub(pc, th, out=buf)
                    torch.sub(th, buf, out=pc)
                elif p.dtype == torch.float32:
                    torch.add(th, chunk_noise(seed, name, k, buf), alpha=sign * sigma, out=pc)
                else:  # rounded to the replica's dtype, as the realized update sees it
                    _member_chunk_(th, seed, sign, sigma, name, k, buf, pc)
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
        if self.realized and self._half is None:
            self._half = _half_work(self.params, self.realized)
        credit = {"realized": self.realized, "sigma": self.sigma, "half": self._half}
        if not self.on_host:
            work = self._work_space() if self.realized else None  # else es_update_'s own
            es_update_(self.master, seeds_n, signs_n, z_n, lr, weight_decay, anchor,
                       self.noise, work, sums, **credit)
        else:  # tensor by tensor on its device, then back to the host master
            work = self._work_space() if self.noise.needs_work else None
            for name, host in self.master.items():
                theta = self._staged(name)
                es_update_({name: theta}, seeds_n, signs_n, z_n, lr, weight_decay, anchor,
                           self.noise, work, sums, **credit)
                host.copy_(theta)
        self.restore()
        return None if sums is None else checksum(self.master, sums)

    def checksum(self) -> int:
        return checksum(self.master)

    @torch.no_grad()
    def rounding_loss(self, seed: int) -> dict[str, float]:
        """What the 16-bit parameters lose of one member's perturbation at sigma (noise of
        `seed`, the real weights): {"unmoved": the fraction of their entries that round
        back to the unperturbed value, "noise_cosine": cosine of the perturbation they
        receive to the one intended}. Empty where every parameter is fp32."""
        low = {n: p for n, p in self.params.items() if p.dtype != torch.float32}
        if not low or not self.sigma > 0:
            return {}
        moved = dot = real_sq = want_sq = 0.0
        total = 0
        for name, p in low.items():
            theta = self._staged(name)
            for k, th in enumerate(chunks(theta)):
                rounded = torch.empty(th.shape, dtype=p.dtype, device=th.device)
                _member_chunk_(th, seed, 1, self.sigma, name, k, torch.empty_like(th), rounded)
                real = rounded.float() - th.to(p.dtype).float()
                eps = chunk_noise(seed, name, k, torch.empty_like(th)).mul_(self.sigma)
                moved += float((real != 0).sum())
                dot += float((real.double() * eps.double()).sum())
                real_sq += float(real.double().square().sum())
                want_sq += float(eps.double().square().sum())
                total += th.numel()
        cosine = dot / max(1e-300, (real_sq * want_sq) ** 0.5)
        return {"unmoved": 1.0 - moved / total, "noise_cosine": cosine}
