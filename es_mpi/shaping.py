"""Fitness shaping: raw rewards of the whole population -> update weights z_n.

Pure NumPy in float64, so every rank computes bit-identical z from the same rewards.
"""

from __future__ import annotations

import numpy as np


def zscore(rewards_n: np.ndarray) -> np.ndarray:
    """(R - mean) / std over the population (the paper's choice); all zeros if std == 0."""
    rewards_n = np.asarray(rewards_n, dtype=np.float64)
    scale = float(np.abs(rewards_n).max(initial=0.0))
    if scale > 1e150 or 0.0 < scale < 1e-150:
        # the squares in std would overflow (NaN z, NaN weights) or underflow (a spread
        # of rewards read as none); z is scale-free, so rescale only these extremes
        rewards_n = rewards_n / scale
    std = rewards_n.std()
    if std == 0.0:
        return np.zeros_like(rewards_n)
    return (rewards_n - rewards_n.mean()) / std


def centered_rank(rewards_n: np.ndarray) -> np.ndarray:
    """Ranks scaled to [-0.5, 0.5]; tied rewards share their average rank."""
    rewards_n = np.asarray(rewards_n, dtype=np.float64)
    n = rewards_n.size
    order = np.argsort(rewards_n, kind="stable")
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.arange(n, dtype=np.float64)
    _, inverse = np.unique(rewards_n, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    counts = np.bincount(inverse)
    ranks = (sums / counts)[inverse]
    return ranks / (n - 1) - 0.5


SHAPINGS = {"zscore": zscore, "rank": centered_rank}


def shape(rewards_n: np.ndarray, method: str) -> np.ndarray:
    return SHAPINGS[method](rewards_n)
