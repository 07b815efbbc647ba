#!/usr/bin/env python3
"""What a 16-bit replica rounds away of full mode's perturbation, on a model's real weights.

    python tools/bf16_rounding.py MODEL_DIR [--dtype bfloat16] [--sigmas 0.001,0.003,0.01]

For each sigma: the share of weights that round back to their unperturbed value under one
member's noise, and the cosine of the perturbation the replica receives to the intended
sigma * eps: the same measurement `es-mpi train` makes at start-up (Replica.rounding_loss)
and records in the run file. Prints a Markdown table.
"""

from __future__ import annotations

import argparse

import torch

from es_mpi import model as hf
from es_mpi.es import Replica
from es_mpi.noise import derive_seed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--sigmas", default="0.001,0.003,0.01")
    ap.add_argument("--seed", type=int, default=0)
    opts = ap.parse_args()
    model, _ = hf.load_model(opts.model, opts.dtype, [torch.device("cpu")])
    params = hf.trainable_parameters(model)
    print(f"{opts.model}, {opts.dtype}, {sum(p.numel() for p in params.values()):,} weights\n")
    print("| sigma | weights that do not move | cosine(realized, intended noise) |")
    print("|---|---|---|")
    for sigma in map(float, opts.sigmas.split(",")):
        loss = Replica(params, sigma=sigma, credit="realized").rounding_loss(
            derive_seed(opts.seed, "rounding"))
        print(f"| {sigma:g} | {loss['unmoved']:.1%} | {loss['noise_cosine']:.3f} |")


if __name__ == "__main__":
    main()
