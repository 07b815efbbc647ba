"""`es-mpi bench`: one ES generation in each mode against pure batched inference.

Every mode runs in a fresh single process (one rank, no MPI) on the same model, prompts
and population, so each one's peak memory is its own; the modes run one after another
in one bench run, so their ratios are comparable. All modes generate exactly
`max_new_tokens` per sequence (EOS ignored), so they do the same amount of decoding.

  inference  the population's N x P sequences (unperturbed) in one batched generate
  lowrank    one ES generation, --mode lowrank, all N members in one batch
  full       one ES generation, --mode full (fp32 master, one generate per member)
  paper      the paper-style loop: per member, add noise in place, generate, regenerate
             the noise to subtract it; then regenerate every member's noise to update

Memory: the peak RSS while the generation runs (model loading excluded, reported apart),
and "models held": (peak - peak of pure inference + model bytes) / model bytes, the
copies of the weights a mode holds beyond what inference itself needs (activations,
KV cache and libraries are the same in every mode).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("inference", "lowrank", "full", "paper")
PHASES = ("perturb", "generate", "score", "restore", "gather", "update", "checksum", "io")


def run_mode(mode: str, opts: dict) -> dict:
    """Measure one mode in this process; returns a JSON-able dict."""
    import torch

    from es_mpi import model as hf
    from es_mpi import runfile
    from es_mpi.config import Config
    from es_mpi.dist import Dist, return_freed_memory
    from es_mpi.loop import run_generation
    from es_mpi.memory import peak_rss_bytes, reset_peak_rss, rss_bytes
    from es_mpi.record import write_checkpoint, write_generation
    from es_mpi.session import (
        check_task,
        decide_generate_batch,
        examples_fingerprint,
        open_session,
        prompt_ids_for,
    )

    torch.set_num_threads(opts["threads"])
    return_freed_memory()  # as every es-mpi command does (set_threads)
    base_rss = rss_bytes()
    tmp = Path(tempfile.mkdtemp(prefix="es-mpi-bench-"))
    cfg = Config(model=opts["model"], task=opts["task"], task_data=opts["task_data"],
                 population=opts["population"], batch_size=opts["prompts"],
                 max_new_tokens=opts["max_new_tokens"], sigma=opts["sigma"], lr=opts["lr"],
                 rank=opts["rank"], member_batch=opts["population"],
                 antithetic=opts["antithetic"] and mode in ("lowrank", "full"),
                 mode="lowrank" if mode == "lowrank" else "full", dtype=opts["dtype"],
                 generate_batch=opts.get("generate_batch", 0),
                 master=opts.get("master", "device"), generations=1000,
                 checkpoint_every=1000, run=str(tmp / "bench.h5"))
    task, train = check_task(cfg)
    dist = Dist.serial()
    cuda = torch.cuda.is_available()
    if mode in ("lowrank", "full"):
        s = open_session(cfg, dist, task, train)
        decide_generate_batch(s)
        model, tokenizer, device = s.model, s.tokenizer, s.device
        s.ignore_eos = True
        cfg = s.cfg  # generate_batch resolved
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer = hf.load_model(cfg.model, cfg.dtype, [device])
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    prompt_ids = prompt_ids_for(cfg, 0, len(train))
    examples = [train[j] for j in prompt_ids]
    batch = hf.encode_prompts(tokenizer, [task.prompt(e, tokenizer) for e in examples], device,
                              task.templated(tokenizer))
    for rows in (1, cfg.population):  # warm-up at both batch shapes the modes use
        hf.generate(model, tokenizer, {k: v.repeat(rows, 1) for k, v in batch.items()}, 2)

    load_peak = peak_rss_bytes()
    reset_peak_rss()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    load_peak_cuda = 0
    if cuda:
        sync()
        load_peak_cuda = torch.cuda.max_memory_allocated(device)
        torch.cuda.empty_cache()  # the generation's reserved peak, not the load's
        torch.cuda.reset_peak_memory_stats(device)
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    if mode == "inference":
        big = {k: v.repeat(cfg.population, 1) for k, v in batch.items()}
        _, tokens = hf.generate_rows(model, tokenizer, big, cfg.max_new_tokens,
                                     cfg.generate_batch, ignore_eos=True)
        sync()
        n_tokens = sum(tokens)
        phases["generate"] = time.perf_counter() - t0
    elif mode == "paper":
        n_tokens, phases = _paper_generation(model, tokenizer, batch, cfg, sync)
    else:
        writer = runfile.RunWriter.create(cfg.run, cfg, cfg.model, s.fingerprint,
                                          examples_fingerprint(train), len(prompt_ids))
        row, _ = run_generation(s, 0)
        write_generation(s, writer, 0, row, t0)
        sync()
        n_tokens = int(row["tokens"].sum())
        for phase in PHASES:
            if f"time_{phase}" in row:
                phases[phase] = float(row[f"time_{phase}"])
        phases["restore"] = row["time_eval"] - sum(phases.get(p, 0.0)
                                                   for p in ("perturb", "generate", "score"))
    seconds = time.perf_counter() - t0
    result = {"mode": mode, "seconds": seconds, "tokens": n_tokens,
              "tokens_per_s": n_tokens / seconds, "phases": phases,
              "model_bytes": model_bytes, "base_rss_bytes": base_rss,
              "load_peak_rss_bytes": load_peak, "peak_rss_bytes": peak_rss_bytes(),
              "generate_batch": cfg.generate_batch,
              "prompt_tokens": int(batch["input_ids"].shape[1]),
              "device": str(device),
              "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
              "threads": torch.get_num_threads()}
    if cuda:
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
        result["peak_cuda_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        result["load_peak_cuda_bytes"] = load_peak_cuda
    if mode in ("lowrank", "full"):
        result["peak_mem_eval"] = int(row["peak_mem_eval"])
        result["peak_mem_update"] = int(row["peak_mem_update"])
        reset_peak_rss()
        t = time.perf_counter()
        write_checkpoint(s, writer, 1, 0)
        result["checkpoint_seconds"] = time.perf_counter() - t
        result["checkpoint_peak_rss_bytes"] = peak_rss_bytes()
        result["comm_bytes_per_rank_formula"] = comm_bytes(cfg.population, 1)
        writer.close()
    return result


def comm_bytes(population: int, world: int) -> dict[str, int]:
    """Bytes one rank sends and receives per generation: O(N) scalars, no model term.

    Rows of (member, seed, reward, tokens, seconds, rank, status) for the population, and
    four int64 (checksum, stop signal, peak memory of two phases) per rank; each rank
    sends its share, receives all.
    """
    from es_mpi.evaluators import ROW_DTYPE

    mine = -(-population // world)
    return {"sent": mine * ROW_DTYPE.itemsize + 32,
            "received": population * ROW_DTYPE.itemsize + 32 * world}


def _paper_generation(model, tokenizer, batch, cfg, sync) -> tuple[int, dict[str, float]]:
    """A faithful re-implementation of the paper scripts' loop (the baseline).

    One generator per member seeded once, noise drawn parameter after parameter; the
    weights are perturbed in place and restored by subtracting regenerated noise (no fp32
    master); the update regenerates every member's noise once more.
    """
    import numpy as np
    import torch

    from es_mpi import model as hf
    from es_mpi.shaping import shape

    params = [p for _, p in model.named_parameters()]
    seeds = list(range(1, cfg.population + 1))
    phases = dict.fromkeys(("perturb", "generate", "restore", "update"), 0.0)

    def add_noise(seed: int, alpha_of) -> None:
        gen = torch.Generator(device=params[0].device)
        gen.manual_seed(seed)
        for p in params:
            noise = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
            p.data.add_(noise, alpha=alpha_of)

    rewards = []
    n_tokens = 0
    with torch.no_grad():
        for seed in seeds:
            t = time.perf_counter()
            add_noise(seed, cfg.sigma)
            sync()
            phases["perturb"] += time.perf_counter() - t
            t = time.perf_counter()
            texts, tokens = hf.generate(model, tokenizer, batch, cfg.max_new_tokens,
                                        ignore_eos=True)
            sync()
            phases["generate"] += time.perf_counter() - t
            n_tokens += sum(tokens)
            rewards.append(-float(np.mean([len(x) for x in texts])))
            t = time.perf_counter()
            add_noise(seed, -cfg.sigma)
            sync()
            phases["restore"] += time.perf_counter() - t
        t = time.perf_counter()
        z_n = shape(np.array(rewards), "zscore")
        for seed, z in zip(seeds, z_n, strict=True):
            add_noise(seed, cfg.lr * float(z) / cfg.population)
        sync()
        phases["update"] = time.perf_counter() - t
    return n_tokens, phases


def _worker(mode: str, opts: dict) -> dict:
    cmd = [sys.executable, "-m", "es_mpi.bench", mode, json.dumps(opts)]
    env = {**os.environ, "OMP_NUM_THREADS": str(opts["threads"])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        from es_mpi.errors import EsError

        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EsError(f"bench mode {mode} failed: {tail}")
    return json.loads(lines[-1])


def bench(opts: dict, modes: tuple[str, ...], echo=print) -> dict:
    """Run each mode in its own process; add ratios to pure inference; return the report."""
    results = {}
    for mode in modes:
        echo(f"bench: {mode} ...")
        results[mode] = _worker(mode, opts)
    ref = results.get("inference")
    for r in results.values():
        # peak during the generation (after loading), whole and above the imports' RSS
        r["peak_rss_over_model"] = r["peak_rss_bytes"] / r["model_bytes"]
        r["added_rss_over_model"] = (r["peak_rss_bytes"] - r["base_rss_bytes"]) / r["model_bytes"]
        r["load_added_rss_over_model"] = ((r["load_peak_rss_bytes"] - r["base_rss_bytes"])
                                          / r["model_bytes"])
        if ref:
            r["ratio_to_inference"] = r["seconds"] / ref["seconds"]
        generating = r["phases"].get("generate", 0.0) + r["phases"].get("score", 0.0)
        r["overhead_fraction"] = 1.0 - generating / r["seconds"]
        # the memory that bounds a rank: the GPU's where there is one, else the RSS
        r["peak_bytes"] = r.get("peak_cuda_bytes", r["peak_rss_bytes"])
        r["peak_over_model"] = r["peak_bytes"] / r["model_bytes"]
    if ref:  # memory beyond what pure inference of the same sequences needs, in models
        for r in results.values():
            r["model_copies"] = (r["peak_bytes"] - ref["peak_bytes"]
                                 + r["model_bytes"]) / r["model_bytes"]
    if "paper" in results:
        for r in results.values():
            r["speedup_over_paper"] = results["paper"]["seconds"] / r["seconds"]
    return {"settings": opts, "machine": machine(), "modes": results,
            "comm_bytes_per_rank": {str(k): comm_bytes(opts["population"], k)
                                    for k in (1, 2, 8, 64)}}


def machine() -> dict:
    import platform

    import torch

    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in fh
                               if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def table(report: dict) -> str:
    """The results as a markdown table."""
    where = "GPU" if any("peak_cuda_bytes" in r for r in report["modes"].values()) else "RSS"
    head = ("| mode | s / generation | tokens/s | x inference | x faster than paper | "
            f"overhead | peak {where} | {where} / model | models held |")
    lines = [head, "|" + "---|" * 9]
    for mode, r in report["modes"].items():
        lines.append(
            f"| {mode} | {r['seconds']:.1f} | {r['tokens_per_s']:.0f} | "
            f"{r.get('ratio_to_inference', float('nan')):.2f} | "
            f"{r.get('speedup_over_paper', float('nan')):.2f} | "
            f"{100 * r['overhead_fraction']:.1f}% | {r['peak_bytes'] / 2**20:.0f} MiB | "
            f"{r['peak_over_model']:.2f} | {r.get('model_copies', float('nan')):.2f} |")
    lines.append("")
    lines.append("| mode | " + " | ".join(PHASES) + " |")
    lines.append("|" + "---|" * (len(PHASES) + 1))
    for mode, r in report["modes"].items():
        cells = [f"{r['phases'][p]:.2f}" if p in r["phases"] else "" for p in PHASES]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(run_mode(sys.argv[1], json.loads(sys.argv[2]))))
