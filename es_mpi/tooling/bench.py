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
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from es_mpi.tooling.scaling import comm_bytes

MODES = ("inference", "lowrank", "full", "paper")
PHASES = ("perturb", "generate", "score", "restore", "gather", "update", "checksum", "io")


class Runner:
    """One mode's ES generation (or pure inference), set up once and run again and again.

    `shared`: (model, tokenizer) already loaded, so that every mode of one process
    decodes with the same weights in the same memory (the interleaved repetitions).
    """

    def __init__(self, mode: str, opts: dict, shared: tuple | None = None):
        import torch

        from es_mpi import devices
        from es_mpi import model as hf
        from es_mpi.config import Config
        from es_mpi.dist import Dist
        from es_mpi.session import check_task, decide_batches, open_session, prompt_ids_for

        self.mode = mode
        self.tmp = tmp = Path(tempfile.mkdtemp(prefix="es-mpi-bench-"))
        cfg = Config(model=opts["model"], task=opts["task"], task_data=opts["task_data"],
                     population=opts["population"], batch_size=opts["prompts"],
                     max_new_tokens=opts["max_new_tokens"], sigma=opts["sigma"],
                     lr=opts["lr"], rank=opts["rank"],
                     member_batch=opts.get("member_batch", 0),
                     antithetic=opts["antithetic"] and mode in ("lowrank", "full"),
                     mode="lowrank" if mode == "lowrank" else "full", dtype=opts["dtype"],
                     generate_batch=opts.get("generate_batch", 0),
                     master=opts.get("master", "device"), generations=1000,
                     checkpoint_every=1000, run=str(tmp / "bench.h5"))
        task, self.train = check_task(cfg)
        self.s = None
        if mode in ("lowrank", "full"):
            self.s = open_session(cfg, Dist.serial(), task, self.train, loaded=shared)
            decide_batches(self.s)
            self.s.ignore_eos = True
            model, tokenizer, device = self.s.model, self.s.tokenizer, self.s.device
            cfg = self.s.cfg  # member_batch and generate_batch decided
        elif shared is not None:
            model, tokenizer = shared
            device = next(model.parameters()).device
        else:  # bound as a rank of its own would be: cuda:0 with its index, or the CPU
            device = devices.bind(Dist.serial(), 1)[0]
            model, tokenizer = hf.load_model(cfg.model, cfg.dtype, [device])
        self.cfg, self.model, self.tokenizer, self.device = cfg, model, tokenizer, device
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        examples = [self.train[j] for j in prompt_ids_for(cfg, 0, len(self.train))]
        self.batch = hf.encode_prompts(tokenizer, [task.prompt(e, tokenizer) for e in examples],
                                       device, task.templated(tokenizer))
        self.writer = None
        self.generation = 0

    def warm_up(self) -> None:
        """Two tokens at both batch shapes the modes use (the first calls allocate)."""
        from es_mpi import model as hf

        for rows in (1, self.cfg.population):
            hf.generate(self.model, self.tokenizer,
                        {k: v.repeat(rows, 1) for k, v in self.batch.items()}, 2)

    def close(self) -> None:
        """Close the run file and remove the temporary directory it lives in."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    def once(self) -> tuple[float, int, dict[str, float], dict | None]:
        """One generation: (seconds, tokens generated, seconds per phase, run-file row)."""
        from es_mpi import model as hf
        from es_mpi import runfile
        from es_mpi.loop import run_generation
        from es_mpi.record import write_generation
        from es_mpi.session import examples_fingerprint

        cfg, row, phases = self.cfg, None, {}
        self.sync()
        t0 = time.perf_counter()
        if self.mode == "inference":
            big = {k: v.repeat(cfg.population, 1) for k, v in self.batch.items()}
            _, tokens = hf.generate_rows(self.model, self.tokenizer, big, cfg.max_new_tokens,
                                         cfg.generate_batch, ignore_eos=True)
            self.sync()
            n_tokens = sum(tokens)
            phases["generate"] = time.perf_counter() - t0
        elif self.mode == "paper":
            n_tokens, phases = _paper_generation(self.model, self.tokenizer, self.batch, cfg,
                                                 self.sync)
        else:
            if self.writer is None:
                self.writer = runfile.RunWriter.create(
                    cfg.run, cfg, cfg.model, self.s.fingerprint,
                    examples_fingerprint(self.train), self.batch["input_ids"].shape[0])
            t = self.generation
            row, _ = run_generation(self.s, t)
            write_generation(self.s, self.writer, t, row, t0)
            self.generation += 1
            self.sync()
            n_tokens = int(row["tokens"].sum())
            for phase in PHASES:
                if f"time_{phase}" in row:
                    phases[phase] = float(row[f"time_{phase}"])
            phases["restore"] = max(0.0, row["time_eval"] - sum(
                phases.get(p, 0.0) for p in ("perturb", "generate", "score")))
        return time.perf_counter() - t0, n_tokens, phases, row


def run_mode(mode: str, opts: dict) -> dict:
    """Measure one mode in this process, alone (its memory is its own): a JSON-able dict."""
    import torch

    from es_mpi.dist import return_freed_memory
    from es_mpi.memory import peak_rss_bytes, reset_peak_rss, rss_bytes
    from es_mpi.record import write_checkpoint

    torch.set_num_threads(opts["threads"])
    return_freed_memory()  # as every es-mpi command does (set_threads)
    base_rss = rss_bytes()
    cuda = torch.cuda.is_available()
    run = Runner(mode, opts)
    model_bytes = sum(p.numel() * p.element_size() for p in run.model.parameters())
    run.warm_up()
    load_peak = peak_rss_bytes()
    reset_peak_rss()
    load_peak_cuda = 0
    if cuda:
        run.sync()
        load_peak_cuda = torch.cuda.max_memory_allocated(run.device)
        torch.cuda.empty_cache()  # the generation's reserved peak, not the load's
        torch.cuda.reset_peak_memory_stats(run.device)
    seconds, n_tokens, phases, row = run.once()
    cfg = run.cfg
    result = {"mode": mode, "seconds": seconds, "tokens": n_tokens,
              "tokens_per_s": n_tokens / seconds, "phases": phases,
              "model_bytes": model_bytes, "base_rss_bytes": base_rss,
              "load_peak_rss_bytes": load_peak, "peak_rss_bytes": peak_rss_bytes(),
              "generate_batch": cfg.generate_batch,
              "member_batch": cfg.member_batch if mode == "lowrank" else None,
              "prompts": int(run.batch["input_ids"].shape[0]),
              "prompt_tokens": int(run.batch["input_ids"].shape[1]),
              "device": str(run.device),
              "dtype": str(next(run.model.parameters()).dtype).removeprefix("torch."),
              "threads": torch.get_num_threads()}
    if cuda:
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(run.device)
        result["peak_cuda_reserved_bytes"] = torch.cuda.max_memory_reserved(run.device)
        result["load_peak_cuda_bytes"] = load_peak_cuda
    if row is not None:
        result["peak_mem_eval"] = int(row["peak_mem_eval"])
        result["peak_mem_update"] = int(row["peak_mem_update"])
        result["comm_bytes_per_rank_formula"] = comm_bytes(cfg.population, 1)
    if row is not None and opts.get("checkpoint", True):
        reset_peak_rss()
        t = time.perf_counter()
        write_checkpoint(run.s, run.writer, 1, 0)
        result["checkpoint_seconds"] = time.perf_counter() - t
        result["checkpoint_peak_rss_bytes"] = peak_rss_bytes()
    run.close()
    return result


def run_repeats(modes: tuple[str, ...], opts: dict, repeat: int) -> dict:
    """Every mode in this one process on one loaded model, `repeat` rounds, interleaved
    (round r runs each mode once, in order, every other round in reverse order, so a
    machine that drifts slower or faster does not favour the modes run first): seconds
    per round and mode, and each round's ratio to the same round's pure inference, so a
    slow spell of the machine hits the modes of a round alike."""
    import torch

    from es_mpi.dist import return_freed_memory

    torch.set_num_threads(opts["threads"])
    return_freed_memory()
    runs: dict[str, Runner] = {}
    shared = None
    for mode in sorted(modes, key=lambda m: m not in ("lowrank", "full")):  # a session loads
        runs[mode] = Runner(mode, opts, shared)
        shared = shared or (runs[mode].model, runs[mode].tokenizer)
    for run in runs.values():
        run.warm_up()
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    phases: dict[str, list[dict]] = {m: [] for m in modes}
    try:
        for r in range(repeat):
            for mode in (modes if r % 2 == 0 else modes[::-1]):
                took, _, split, _ = runs[mode].once()
                seconds[mode].append(took)
                phases[mode].append(split)
    finally:
        for run in runs.values():
            run.close()
    return {"seconds": seconds, "phases": phases}


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


def _worker(mode: str, opts: dict, *extra: str, timeout: float | None = None) -> dict:
    """Run `mode` in a fresh process; `timeout`: seconds it may take (None: no limit),
    past which it is killed and an EsError raised."""
    from es_mpi.errors import EsError

    if timeout is not None and timeout <= 0:
        raise EsError(f"bench mode {mode} timed out: no time left of --timeout")
    cmd = [sys.executable, "-m", "es_mpi.tooling.bench", mode, json.dumps(opts), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(opts["threads"])}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EsError(f"bench mode {mode} timed out: killed after {timeout:.0f} s, the time "
                      "left of --timeout") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EsError(f"bench mode {mode} failed: {tail}")
    return json.loads(lines[-1])


def bench(opts: dict, modes: tuple[str, ...], echo=print, repeat: int = 3,
          timeout: float = 0) -> dict:
    """Each mode alone in its own process (memory, phases), then `repeat` interleaved
    rounds of every mode in one process (times and ratios: medians over the rounds, with
    min and max); returns the report. `timeout`: seconds those processes may take in all
    (0: no limit); the one running when they are spent is killed, and an EsError raised."""
    end = time.monotonic() + timeout if timeout > 0 else None

    def left() -> float | None:
        return None if end is None else end - time.monotonic()

    results = {}
    for mode in modes:
        echo(f"bench: {mode} ...")
        results[mode] = _worker(mode, opts, timeout=left())
    if repeat:
        echo(f"bench: {repeat} interleaved rounds of {', '.join(modes)} in one process ...")
        rounds = _worker(",".join(modes), opts, str(repeat), timeout=left())
        _add_rounds(results, rounds)
    ref = results.get("inference")
    for r in results.values():
        # peak during the generation (after loading), whole and above the imports' RSS
        r["peak_rss_over_model"] = r["peak_rss_bytes"] / r["model_bytes"]
        r["added_rss_over_model"] = (r["peak_rss_bytes"] - r["base_rss_bytes"]) / r["model_bytes"]
        r["load_added_rss_over_model"] = ((r["load_peak_rss_bytes"] - r["base_rss_bytes"])
                                          / r["model_bytes"])
        if ref and "rounds" not in r:
            r["ratio_to_inference"] = r["seconds"] / ref["seconds"]
        r.setdefault("overhead_fraction", _overhead(r["phases"], r["seconds"]))
        # the memory that bounds a rank: the GPU's where there is one, else the RSS
        r["peak_bytes"] = r.get("peak_cuda_bytes", r["peak_rss_bytes"])
        r["peak_over_model"] = r["peak_bytes"] / r["model_bytes"]
    if ref:  # memory beyond what pure inference of the same sequences needs, in models
        for r in results.values():
            r["model_copies"] = (r["peak_bytes"] - ref["peak_bytes"]
                                 + r["model_bytes"]) / r["model_bytes"]
    if "paper" in results:
        for r in results.values():
            if "rounds" not in r:
                r["speedup_over_paper"] = results["paper"]["seconds"] / r["seconds"]
    return {"settings": {**opts, "repeat": repeat}, "machine": machine(), "modes": results,
            "comm_bytes_per_rank": {str(k): comm_bytes(opts["population"], k)
                                    for k in (1, 2, 8, 64)}}


def scaling_report(opts: dict, repeat: int, echo=print) -> dict:
    """Strong and weak scaling at the benchmark's settings (es_mpi.tooling.scaling.measure): real
    1- and 2-rank training runs, one thread per rank, in full and lowrank mode."""
    from es_mpi.tooling import scaling

    common = {"task": opts["task"], "task_data": opts["task_data"] or None,
              "population": opts["population"], "prompts": opts["prompts"],
              "max_new_tokens": opts["max_new_tokens"], "ranks": (1, 2), "repeat": repeat,
              "echo": echo}
    pairs = ("--antithetic",) if opts["antithetic"] else ()
    args = (*pairs, "--sigma", str(opts["sigma"]), "--lr", str(opts["lr"]), "--dtype",
            opts["dtype"])
    return {"full" + (", antithetic" if pairs else ""):
            scaling.measure(opts["model"], mode="full", extra_args=args, **common),
            "lowrank": scaling.measure(opts["model"], mode="lowrank",
                                       extra_args=(*args, "--rank", str(opts["rank"])),
                                       **common)}


def _overhead(phases: dict[str, float], seconds: float) -> float:
    """The share of a generation spent on anything but generating and scoring."""
    return 1.0 - (phases.get("generate", 0.0) + phases.get("score", 0.0)) / seconds


def _add_rounds(results: dict, rounds: dict) -> None:
    """Times from the interleaved rounds: per mode the median seconds, the min and max,
    and the median over rounds of each round's ratio to inference and to the paper loop
    (a round's modes ran back to back, so their ratio is the fairest figure)."""
    import statistics

    seconds = rounds["seconds"]
    for mode, r in results.items():
        times = seconds[mode]
        r["alone_seconds"] = r["seconds"]
        r["rounds"] = times
        r["seconds"] = statistics.median(times)
        r["seconds_min"], r["seconds_max"] = min(times), max(times)
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        overhead = [_overhead(p, t) for p, t in zip(rounds["phases"][mode], times, strict=True)]
        r["overhead_fraction"] = statistics.median(overhead)
        r["phases"] = {k: statistics.median(p.get(k, 0.0) for p in rounds["phases"][mode])
                       for k in r["phases"]}
        for key, ref in (("ratio_to_inference", "inference"), ("speedup_over_paper", "paper")):
            if ref in seconds:
                pairs = [(t / u if key == "ratio_to_inference" else u / t)
                         for t, u in zip(times, seconds[ref], strict=True)]
                r[key] = statistics.median(pairs)
                r[key + "_min"], r[key + "_max"] = min(pairs), max(pairs)


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

    def spread(r: dict, key: str, fmt: str) -> str:
        value = format(r.get(key, float("nan")), fmt)
        if key + "_min" in r:
            value += f" ({format(r[key + '_min'], fmt)}-{format(r[key + '_max'], fmt)})"
        return value

    for mode, r in report["modes"].items():
        lines.append(
            f"| {mode} | {spread(r, 'seconds', '.1f')} | {r['tokens_per_s']:.0f} | "
            f"{spread(r, 'ratio_to_inference', '.2f')} | "
            f"{spread(r, 'speedup_over_paper', '.2f')} | "
            f"{100 * r['overhead_fraction']:.1f}% | {r['peak_bytes'] / 2**20:.0f} MiB | "
            f"{r['peak_over_model']:.2f} | {r.get('model_copies', float('nan')):.2f} |")
    opts, first = report["settings"], next(iter(report["modes"].values()))
    what = (f"\n{opts['population']} members x {first.get('prompts', opts['prompts'])} prompts "
            f"x {opts['max_new_tokens']} new tokens, {first['dtype']}, {first['threads']} "
            f"thread(s) per mode")
    if "lowrank" in report["modes"]:
        what += (f"; lowrank rank {opts['rank']}, "
                 f"{report['modes']['lowrank']['member_batch']} members per generate call")
    lines.append(what + ".")
    repeat = opts.get("repeat", 0)
    if repeat:
        lines.append(f"\nTimes, ratios and phases: median (min-max) of {repeat} interleaved "
                     "rounds in one process; memory: each mode alone in its own process.")
    lines.append("")
    lines.append("| mode | " + " | ".join(PHASES) + " |")
    lines.append("|" + "---|" * (len(PHASES) + 1))
    for mode, r in report["modes"].items():
        cells = [f"{r['phases'][p]:.2f}" if p in r["phases"] else "" for p in PHASES]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    if "scaling" in report:
        from es_mpi.tooling import scaling

        lines += ["", "Scaling (1 and 2 ranks, one thread each; es_mpi.tooling.scaling):", "",
                  scaling.scaling_table(report["scaling"])]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 3:  # modes,... opts repeat: the interleaved rounds
        print(json.dumps(run_repeats(tuple(sys.argv[1].split(",")), json.loads(sys.argv[2]),
                                     int(sys.argv[3]))))
    else:
        print(json.dumps(run_mode(sys.argv[1], json.loads(sys.argv[2]))))
