"""Seeds and Gaussian noise: every number here derives from integers, never from state.

Member i of generation t gets the noise seed `derive_seed(run_seed, t, i)`; with
antithetic pairs, members 2j and 2j+1 share the seed of pair j and take signs +1 / -1.
Each tensor's noise uses its own seed, derived from the member seed and the tensor's
name, so equal-shaped tensors never share noise (the paper's scripts reuse one seed).
"""

from __future__ import annotations

import hashlib

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


def tensor_noise(seed: int, name: str, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Standard normal fp32 noise for one tensor of one member, made on `device`."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, name))
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
