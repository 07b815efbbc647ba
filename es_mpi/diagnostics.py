"""Per-generation diagnostics of the population, computed from the gathered rewards and
the shaped scores alone (no weights touched, no random numbers drawn).

    pair_disagree     antithetic: share of mirrored pairs (eps, -eps) whose two rewards
                      differ; a pair with equal rewards adds nothing to the update
    pair_gap          antithetic: mean |r+ - r-| over the pairs
    distinct_rewards  number of distinct reward values / N: 1/N when every member scored
                      the same (z-scores all 0, no update), 1 when no two scored alike
    update_coef_norm  (lr / N) * ||c||_2, where c_s = sum of sign_i * z_i over the members
                      i that share noise draw s (a mirrored pair shares one draw). The
                      update's noise part is (lr / N) * sum_s c_s eps_s with eps_s unit
                      normal per weight (full: eps itself; lowrank: A B^T / sqrt(r) of unit
                      normal factors), so this is the expected RMS per weight of that part,
                      and sqrt(D) times it the expected L2 norm over D weights. It is not
                      the measured norm of theta_after - theta_before (that would need a
                      copy of the weights), and leaves out weight decay.
"""

from __future__ import annotations

import numpy as np

from es_mpi.es import noise_coefficients


def generation_diagnostics(rewards_n: np.ndarray, seeds_n: np.ndarray, signs_n: np.ndarray,
                           z_n: np.ndarray, lr: float, antithetic: bool) -> dict[str, float]:
    n = len(rewards_n)
    pair_disagree = pair_gap = float("nan")
    if antithetic:
        plus = {int(s): r for s, g, r in zip(seeds_n, signs_n, rewards_n, strict=True) if g > 0}
        minus = {int(s): r for s, g, r in zip(seeds_n, signs_n, rewards_n, strict=True) if g < 0}
        gaps_p = np.array([abs(plus[s] - minus[s]) for s in plus if s in minus])
        if len(gaps_p):
            pair_disagree = float(np.mean(gaps_p != 0))
            pair_gap = float(gaps_p.mean())
    coefs = np.array([c for _, c in noise_coefficients(seeds_n, signs_n, z_n)])
    return {"pair_disagree": pair_disagree, "pair_gap": pair_gap,
            "distinct_rewards": len(np.unique(rewards_n)) / n,
            "update_coef_norm": lr / n * float(np.sqrt(np.sum(coefs ** 2)))}
