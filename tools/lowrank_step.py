"""Lowrank mode's cost per decode step, against the same step without perturbation.

    python tools/lowrank_step.py [--model demo/model] [--steps 200] [--threads 2]

Builds one group of generation 0's members (the automatic member batch, as train
decides it) x the task's training prompts, a row block per member, prefills it once,
then times single decode steps on that KV cache (each step's new entry is dropped
again), plain and lowrank in random order, and prints each one's median step time and
the median (and quartiles) of the paired ratios lowrank / plain. Whole `generate`
timings on a shared machine drift by several percent from round to round; neighbouring
steps share the drift, so this resolves changes of about 1%. The factors are drawn
once, outside the timed steps (bench's `perturb` phase), and the plain step runs with
lowrank's forwards taken off the modules; prefill is not included.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "demo/model"))
    parser.add_argument("--steps", type=int, default=200, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = all cores")
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--rank", type=int, default=1)
    args = parser.parse_args(argv)

    import torch

    from es_mpi import lowrank
    from es_mpi.noise import member_seeds
    from es_mpi.tooling.bench import Runner

    if args.threads:
        torch.set_num_threads(args.threads)
    opts = dict(model=args.model, task="conciseness", task_data="",
                population=args.population, prompts=0, max_new_tokens=2, sigma=1e-3,
                lr=5e-4, rank=args.rank, antithetic=True, dtype="auto", member_batch=0)
    run = Runner("lowrank", opts)
    run.warm_up()
    s, cfg = run.s, run.cfg
    n = cfg.member_batch  # one group of generation 0's members, as train evaluates them
    seeds_n, signs_n = member_seeds(cfg.seed, 0, cfg.population, cfg.antithetic)
    seeds, signs = [int(x) for x in seeds_n[:n]], [int(x) for x in signs_n[:n]]
    batch = {k: v.repeat(n, 1) for k, v in run.batch.items()}
    rows = batch["input_ids"].shape[0]

    with torch.no_grad():
        out = s.model(**batch, use_cache=True)
        cache = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(token)], 1)

        modules = [use.module for uses in s.matrices.values() for use in uses]

        def step(perturbed: bool) -> tuple[float, torch.Tensor]:
            # the plain step runs inside the same block with lowrank's forwards taken
            # off the modules, so both see the same factors in the same memory, as the
            # steps of one generate do
            saved = {} if perturbed else {m: m.__dict__.pop("forward") for m in modules}
            try:
                run.sync()
                start = time.perf_counter()
                logits = s.model(input_ids=token, attention_mask=mask, past_key_values=cache,
                                 use_cache=True).logits
                run.sync()
                took = time.perf_counter() - start
            finally:
                for m, forward in saved.items():
                    m.forward = forward
            cache.crop(-1)
            return took, logits

        with lowrank.population(s.matrices, s.replica.master, s.replica.noise, seeds, signs,
                                1e-3, rows):
            plain, hooked = step(False)[1], step(True)[1]
            if torch.equal(plain, hooked):
                sys.exit("lowrank_step: the perturbed step gave the plain step's logits")
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.steps):
                for perturbed in random.sample([False, True], 2):
                    times[perturbed].append(step(perturbed)[0])
    run.close()
    ratios = sorted(a / b for a, b in zip(times[True], times[False], strict=True))

    def quartile(q: float) -> float:
        return ratios[round(q * (len(ratios) - 1))]
    print(f"{s.model.config.model_type}, {rows} rows ({n} members), "
          f"{torch.get_num_threads()} thread(s), {args.steps} steps each")
    print(f"plain step   {statistics.median(times[False]) * 1e3:8.1f} ms (median)")
    print(f"lowrank step {statistics.median(times[True]) * 1e3:8.1f} ms (median)")
    print(f"lowrank / plain: {statistics.median(ratios):.4f} "
          f"(quartiles {quartile(0.25):.4f}-{quartile(0.75):.4f})")


if __name__ == "__main__":
    main(sys.argv[1:])
