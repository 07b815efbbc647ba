"""Seeds and Gaussian noise: every number here derives from integers, never from state.

Member i of generation t gets the noise seed `derive_seed(run_seed, t, i)`; with
antithetic pairs, members 2j and 2j+1 share the seed of pair j and take signs +1 / -1.
Each tensor's noise uses its own seed, derived from the member seed and the tensor's
name, so equal-shaped tensors never share noise (the paper's scripts reuse one seed).

`FullNoise` (an independent standard normal per tensor) and `LowRankNoise` (thin factors
A B^T / sqrt(r) per matrix) define a member's noise and add a generation's update made of
it; es_mpi.es applies them to the weights.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

SEED_MASK = 2**63 - 1  # seeds are stored as int64 in the run file


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from integers and strings (BLAKE2b; stable across platforms)."""
    h = hashlib.blake2b(digest_size=8, person=b"es-mpi-seed")
    for part in parts:
        data = part.encode() if isinstance(part, str) else int(part).to_bytes(8, "little",
                                                                              signed=True)
        h.update(len(data).to_bytes(4, "little"))
        h.update(data)
    return int.from_bytes(h.digest(), "little") & SEED_MASK


def member_seeds(run_seed: int, generation: int, population: int,
                 antithetic: bool) -> tuple[np.ndarray, np.ndarray]:
    """Noise seeds and signs for one generation: (seeds_n int64, signs_n int8)."""
    members = np.arange(population)
    noise_index = members // 2 if antithetic else members
    seeds_n = np.array([derive_seed(run_seed, generation, int(j)) for j in noise_index],
                       dtype=np.int64)
    signs_n = np.where(antithetic & (members % 2 == 1), -1, 1).astype(np.int8)
    return seeds_n, signs_n


NOISE_CHUNK = 1 << 22  # elements per noise chunk (16 MiB of fp32)


def chunks(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A contiguous tensor's elements as consecutive 1-D views of NOISE_CHUNK."""
    return t.view(-1).split(NOISE_CHUNK)


def chunk_noise(seed: int, name: str, k: int, out: torch.Tensor) -> torch.Tensor:
    """Fill `out` (fp32, 1-D) with chunk k of a tensor's noise.

    Each chunk has its own seed, so noise is made (and used) a chunk at a time: the
    perturbation and the update never need more than a chunk of extra memory.
    """
    gen = torch.Generator(device=out.device)
    gen.manual_seed(derive_seed(seed, name, k))
    return torch.randn(out.shape, generator=gen, out=out)


def tensor_noise(seed: int, name: str, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Standard normal fp32 noise for one tensor of one member, made on `device`."""
    eps = torch.empty(shape, dtype=torch.float32, device=device)
    for k, part in enumerate(chunks(eps)):
        chunk_noise(seed, name, k, part)
    return eps


def lowrank_factors(seed: int, name: str, shape: torch.Size, rank: int,
                    device: torch.device, out: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin fp32 factors (A, B) of one member's perturbation of a matrix (out x in).

    The perturbation is A @ B.T / sqrt(rank), A: (out, rank), B: (in, rank); each of its
    entries has unit variance, like full-mode noise. Both factors come from one draw, made
    on the CPU whatever `device` is (they are small): a GPU's generator depends on the GPU
    model, the CPU's does not, so lowrank noise is the same on every machine.

    `out`: a contiguous fp32 CPU tensor of (out + in, rank) to draw into (pinned memory, a
    member's slice of a stacked buffer), the same numbers; A and B are then views of it.
    For a CUDA `device` the draw goes to pinned memory and is copied without blocking
    (torch's pinned allocator keeps that memory until the copy has run).
    """
    out_features, in_features = shape
    gen = torch.Generator(device="cpu")
    gen.manual_seed(derive_seed(seed, name))
    size = (out_features + in_features, rank)
    cuda = torch.device(device).type == "cuda"
    if out is None:
        out = torch.empty(size, dtype=torch.float32, pin_memory=cuda)
    elif out.shape != size or out.dtype != torch.float32 or not out.is_contiguous() \
            or out.device.type != "cpu":
        raise ValueError(f"lowrank_factors: out must be a contiguous fp32 CPU tensor of "
                         f"{size}, not {tuple(out.shape)} {out.dtype} on {out.device}")
    ab = torch.randn(size, generator=gen, dtype=torch.float32, out=out)
    if torch.device(device).type != "cpu":
        ab = ab.to(device, non_blocking=True)
    return ab[:out_features], ab[out_features:]


# -- the two kinds of member noise, and the update each makes --------------------------

class FullNoise:
    """Member noise eps_i: an independent standard normal per tensor (es_mpi.noise)."""

    name = "full"
    needs_work = True  # add_update_ sums the noise in two fp32 chunks of work space

    def add_update_(self, theta: torch.Tensor, name: str, terms: list[tuple[int, float]],
                    alpha: float, work: torch.Tensor) -> None:
        """theta += alpha * sum_j c_j eps_j(name), a noise chunk at a time, in term order."""
        acc_buf, eps_buf = work[:NOISE_CHUNK], work[NOISE_CHUNK:]
        for k, part in enumerate(chunks(theta)):
            acc, eps = acc_buf[:part.numel()], eps_buf[:part.numel()]
            acc.zero_()
            for seed, c in terms:
                acc.add_(chunk_noise(seed, name, k, eps), alpha=c)
            part.add_(acc, alpha=alpha)


class LowRankNoise:
    """Member noise of a matrix: A_i @ B_i.T / sqrt(r) (EGGROLL), thin factors from the seed.

    A generation draws each member's factors once: `keep_draws()` (the evaluator, at the
    start of a generation's evaluation) makes `draws` keep the CPU draws of the members
    this rank evaluates, and `add_update_` takes them from there, drawing only those of
    the members other ranks evaluated; it drops each matrix's draws as it adds them.
    Memory: the kept draws are this rank's members' factors, 4 * r * (rows + cols) bytes
    per matrix per member (a stacked group keeps an antithetic partner's copy too), held
    from its evaluation to the end of its update at most one generation: at r = 1 about
    10 MB per member for a 7B Llama (32 layers of 4 x 4096^2 + 3 x 11008 x 4096, plus
    embeddings), 330 MB for 32 members on one rank. The draws are the same numbers
    either way (same seed, same generator), so the weights are bit-identical.
    """

    name = "lowrank"
    needs_work = False  # add_update_ adds its product in place, no work space

    def __init__(self, rank: int):
        self.rank = rank
        # matrix name -> seed -> its (rows + cols, r) draw on the host, until the update
        self._kept: dict[str, dict[int, torch.Tensor]] | None = None

    def keep_draws(self) -> None:
        """Keep the draws `draws` makes from now on for the update; drops any kept before
        (an abandoned generation's)."""
        self._kept = {}

    def kept(self, name: str) -> dict[int, torch.Tensor]:
        """The draws kept for matrix `name`, by seed (empty when none)."""
        return {} if self._kept is None else self._kept.get(name, {})

    def factors(self, seed: int, name: str, theta: torch.Tensor,
                device: torch.device | str | None = None):
        """Raw (A, B) of a member, on `device` (default theta's); its perturbation of theta
        is A B^T / sqrt(r). They are drawn on the CPU whatever the device."""
        return lowrank_factors(seed, name, theta.shape, self.rank,
                               theta.device if device is None else device)

    def draws(self, seeds: list[int], name: str, shape: torch.Size,
              pin: bool = False) -> torch.Tensor:
        """(len(seeds), rows + cols, r) fp32 on the host: each seed's raw factors of the
        matrix (A on top of B), one draw per distinct seed (a repeated seed, an antithetic
        pair, is copied), taken from the kept draws where there, kept where keeping.
        `pin`: in pinned memory (for a copy to a GPU that does not block)."""
        rows, cols = shape
        out = torch.empty((len(seeds), rows + cols, self.rank), dtype=torch.float32,
                          pin_memory=pin)
        kept = None if self._kept is None else self._kept.setdefault(name, {})
        first: dict[int, int] = {}
        for k, seed in enumerate(seeds):
            if seed in first:
                out[k].copy_(out[first[seed]])
                continue
            first[seed] = k
            have = None if kept is None else kept.get(seed)
            if have is not None:
                out[k].copy_(have)
                continue
            lowrank_factors(seed, name, shape, self.rank, "cpu", out=out[k])
            if kept is not None:
                kept[seed] = out[k]
        return out

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.rank)

    def add_update_(self, theta: torch.Tensor, name: str, terms: list[tuple[int, float]],
                    alpha: float, work: torch.Tensor | None = None) -> None:
        """theta += alpha * sum_j c_j A_j B_j^T / sqrt(r): one (out x Kr) @ (Kr x in)
        product added into theta by the GEMM itself (addmm_: one pass over theta and no
        work space, see needs_work). The factors come from the kept draws where this
        rank evaluated the member, else they are drawn here; the kept draws of `name`
        are dropped after."""
        kept = {} if self._kept is None else self._kept.pop(name, {})
        if self._kept is not None and not self._kept:
            self._kept = None  # every matrix updated: nothing is kept past the update
        rows, cols = theta.shape
        r, cuda = self.rank, theta.device.type == "cuda"
        # fresh buffers, like the concatenations they replace (same layout, same bits);
        # pinned where the product runs on a GPU, and alive until the product has run
        a_host = torch.empty((rows, len(terms) * r), dtype=torch.float32, pin_memory=cuda)
        b_host = torch.empty((cols, len(terms) * r), dtype=torch.float32, pin_memory=cuda)
        for j, (seed, _) in enumerate(terms):
            ab = kept.get(seed)
            if ab is None:
                a, b = lowrank_factors(seed, name, theta.shape, r, "cpu")
            else:
                a, b = ab[:rows], ab[rows:]
            a_host[:, j * r:(j + 1) * r] = a
            b_host[:, j * r:(j + 1) * r] = b
        coef = torch.tensor([c * self.scale for _, c in terms], dtype=torch.float32,
                            device=theta.device)
        a = a_host.to(theta.device, non_blocking=cuda) * coef.repeat_interleave(r)
        b = b_host.to(theta.device, non_blocking=cuda)
        theta.addmm_(a, b.T, alpha=alpha)
