"""Scaling, measured and modelled: strong and weak scaling of `es-mpi train` over ranks,
an allgather microbenchmark, and a cost model of the per-generation communication.

    measure(model, ...)        real `mpiexec -n k es-mpi train` runs, 1 and 2 ranks
                               interleaved; seconds per generation from the run files
    allgather_latency(...)     the two collectives of a generation (es_mpi.dist) timed
                               alone under `mpiexec -n k python -m es_mpi.tooling.scaling allgather`
    comm_model(N, P, a, b)     bytes per rank (comm_bytes) and the latency of
                               the two allgathers, recursive doubling:
                                   T = alpha * ceil(log2 P) + beta * M * (P - 1) / P
                               M = the bytes gathered (the whole receive buffer)
    table(report)              markdown

Importable without MPI: only the `allgather` child (run under mpiexec) touches es_mpi.dist.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

INTS_PER_RANK = 4   # the second allgather: checksum, stop signal, two peak-memory figures
# Assumed network constants for the modelled columns (typical MPI figures, not measured
# here): small-message latency alpha in seconds, inverse bandwidth beta in s/byte.
NETWORKS = {
    "InfiniBand (assumed: alpha 1.5 us, 100 Gb/s)": (1.5e-6, 1 / 12.5e9),
    "Ethernet, TCP (assumed: alpha 30 us, 10 Gb/s)": (30e-6, 1 / 1.25e9),
}
RUN_FIELDS = ("time_total", "time_io", "time_eval", "time_gather", "time_update",
              "time_checksum", "eval_seconds", "checksum", "comm_bytes", "world_size", "seeds")


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


def _bin(name: str) -> str | None:
    """An executable next to this Python (the venv's), else on PATH."""
    return shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def _mpiexec(mpiexec: str | None) -> str:
    from es_mpi.errors import EsError

    found = mpiexec or _bin("mpiexec")
    if not found:
        raise EsError("mpiexec not found; install es-mpi[mpich] or pass mpiexec=PATH")
    return found


def _busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (steal included: the host's share),
    from /proc/stat; 0.0 where there is none."""
    try:
        with open("/proc/stat") as fh:
            ticks = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (ticks + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)  # ranks included: mpiexec waits on them
    return r.ru_utime + r.ru_stime


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "samples": values}


# -- measured: strong and weak scaling ---------------------------------------------------

def _train(mpiexec: str, k: int, population: int, run: Path, opts: dict) -> dict:
    """One `mpiexec -n k es-mpi train` into a fresh run file; its per-generation figures."""
    from es_mpi import runfile
    from es_mpi.errors import EsError

    es_mpi = _bin("es-mpi")
    if not es_mpi:
        raise EsError("es-mpi is not installed next to this Python")
    cmd = [mpiexec, "-n", str(k), es_mpi, "train", "--quiet", "--model", opts["model"],
           "--task", opts["task"], "--run", str(run), "--population", str(population),
           "--batch-size", str(opts["prompts"]), "--max-new-tokens", str(opts["max_new_tokens"]),
           "--generations", str(opts["generations"]), "--mode", opts["mode"],
           "--checkpoint-every", "1000000"]
    if opts["task_data"]:
        cmd += ["--task-data", str(opts["task_data"])]
    if opts["member_batch"]:
        cmd += ["--member-batch", str(opts["member_batch"])]
    cmd += [str(a) for a in opts["extra_args"]]
    # a shared machine: CPU time that other processes took while this run ran
    busy0, ours0, t0 = _busy_seconds(), _children_seconds(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), check=False)
    wall = time.perf_counter() - t0
    other = max(0.0, (_busy_seconds() - busy0) - (_children_seconds() - ours0))
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr.strip() or proc.stdout.strip()).splitlines()[-5:])
        raise EsError(f"scaling: {' '.join(cmd)} failed (exit {proc.returncode}):\n{tail}")
    g = runfile.read_generations(run, fields=RUN_FIELDS)
    if len(g["time_total"]) != opts["generations"]:
        raise EsError(f"scaling: run file {run} holds {len(g['time_total'])} generations, "
                      f"not {opts['generations']}")
    # Steady state: generation 0 is warm-up (first generate, allocator, caches). time_io is
    # rank 0's run-file write; in the last generation it holds the final checkpoint, a
    # once-a-run cost of rank 0 alone (seconds for the demo model), so it is left out.
    steady = slice(1, None)
    per_gen = (g["time_total"] - g["time_io"])[steady]
    return {"ranks": k, "population": population, "run_file": str(run), "wall_seconds": wall,
            "other_cpu_seconds": other, "other_cores": other / wall,
            "world_size": int(g["world_size"][-1]),
            "seconds": float(np.median(per_gen)),
            "seconds_per_generation": per_gen.tolist(),
            "time_total": g["time_total"].tolist(), "time_io": g["time_io"].tolist(),
            "time_eval": float(np.median(g["time_eval"][steady])),
            "time_gather": float(np.median(g["time_gather"][steady])),
            "time_update": float(np.median(g["time_update"][steady])),
            "time_checksum": float(np.median(g["time_checksum"][steady])),
            "member_seconds": float(np.median(g["eval_seconds"][steady])),
            "comm_bytes": int(g["comm_bytes"][-1]),
            "final_checksum": int(g["checksum"][-1])}


def measure(model: str, *, task: str = "conciseness", task_data: str | None = None,
            population: int = 8, population_per_rank: int | None = None, prompts: int = 2,
            max_new_tokens: int = 16, generations: int = 3, mode: str = "full",
            member_batch: int | None = None, ranks: tuple[int, ...] = (1, 2), repeat: int = 3,
            mpiexec: str | None = None, extra_args: tuple = (), keep_dir: str | None = None,
            echo=None) -> dict:
    """Strong (N = population whatever the ranks) and weak (N = population_per_rank * k)
    scaling of `es-mpi train`, one thread per rank.

    Each repetition runs every configuration once, ranks interleaved (1, 2, 1, 2, ...), so
    drift of a shared machine falls on all of them alike. A run's figure is the median
    over its generations but the first (warm-up) of time_total - time_io; a
    configuration's, the median over repetitions with min and max. lowrank: member_batch
    defaults to population // max(ranks), so every rank has a batch at the most ranks.
    population_per_rank defaults to population: the weak run on 1 rank is then the strong
    one, measured once. Run files go to keep_dir (kept) or a temporary folder (deleted).
    """
    from es_mpi.errors import EsError

    if generations < 3:
        raise EsError("scaling: generations >= 3 (the first is warm-up)")
    launcher = _mpiexec(mpiexec)
    ppr = population_per_rank or population
    notes = []
    if mode == "lowrank" and not member_batch:
        member_batch = max(1, population // max(ranks))
        notes.append(f"--member-batch {member_batch} (population {population} // "
                     f"{max(ranks)} ranks), so each rank evaluates a batch at {max(ranks)} ranks")
    group = (member_batch if mode == "lowrank" else 2 if "--antithetic" in map(str, extra_args)
             else 1)
    for kind, n_of in (("strong", lambda k: population), ("weak", lambda k: ppr * k)):
        uneven = [k for k in ranks if math.ceil(n_of(k) / group) % k]
        if uneven:
            notes.append(f"{kind}: groups of {group} members do not deal evenly to "
                         f"{', '.join(map(str, uneven))} rank(s); the slowest rank sets the pace")
    opts = dict(model=str(model), task=task, task_data=task_data, prompts=prompts,
                max_new_tokens=max_new_tokens, generations=generations, mode=mode,
                member_batch=member_batch if mode == "lowrank" else None,
                extra_args=tuple(extra_args))
    tmp = Path(keep_dir) if keep_dir else Path(tempfile.mkdtemp(prefix="es-mpi-scaling-"))
    tmp.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    try:
        for rep in range(repeat):
            for k in ranks:
                plan = [("strong", population)]
                if ppr * k != population:
                    plan.append(("weak", ppr * k))
                for kind, n in plan:
                    if echo:
                        echo(f"scaling: {mode} {kind} rep {rep + 1}/{repeat}: {k} rank(s), "
                             f"N={n} ...")
                    run = _train(launcher, k, n, tmp / f"{mode}-{kind}-{k}-{rep}.h5", opts)
                    run.update(kind=kind, repeat=rep)
                    runs.append(run)
                    if echo:
                        echo(f"  {run['seconds']:.2f} s/generation")
    finally:
        if not keep_dir:
            shutil.rmtree(tmp, ignore_errors=True)

    def pick(kind: str, k: int) -> list[dict]:
        n = population if kind == "strong" else ppr * k
        return [r for r in runs if r["ranks"] == k and r["population"] == n]

    report = {"settings": dict(opts, population=population, population_per_rank=ppr,
                               ranks=list(ranks), repeat=repeat, threads_per_rank=1),
              "notes": notes, "runs": runs}
    for kind in ("strong", "weak"):
        base = [r["seconds"] for r in pick(kind, 1)] if 1 in ranks else None
        rows = {}
        for k in ranks:
            sel = pick(kind, k)
            secs = [r["seconds"] for r in sel]
            row = {"population": sel[0]["population"], "seconds": _spread(secs),
                   "member_seconds": statistics.median(r["member_seconds"] for r in sel),
                   "time_eval": statistics.median(r["time_eval"] for r in sel),
                   "time_gather": statistics.median(r["time_gather"] for r in sel),
                   "time_update_checksum": statistics.median(
                       r["time_update"] + r["time_checksum"] for r in sel),
                   "comm_bytes": sel[0]["comm_bytes"],
                   "other_cores": max(r["other_cores"] for r in sel)}
            if base:  # paired by repetition: each rep ran 1 and k ranks back to back
                t1 = statistics.median(base)
                paired = [b / s for b, s in zip(base, secs, strict=True)]
                if kind == "strong":
                    row["speedup"] = t1 / row["seconds"]["median"]
                    row["speedup_range"] = [min(paired), max(paired)]
                    row["efficiency"] = row["speedup"] / k
                else:
                    row["ratio"] = row["seconds"]["median"] / t1  # 1.0 = flat
                    row["ratio_range"] = [1 / max(paired), 1 / min(paired)]
            rows[str(k)] = row
        report[kind] = {"population" if kind == "strong" else "population_per_rank":
                        population if kind == "strong" else ppr, "ranks": rows}
    # the determinism contract: N fixed, the same weights whatever the ranks
    report["strong"]["final_checksums"] = sorted({r["final_checksum"] for r in runs
                                                  if r["kind"] == "strong"})
    report["strong"]["identical"] = len(report["strong"]["final_checksums"]) == 1
    return report


# -- measured: the collectives alone -----------------------------------------------------

def allgather_latency(ranks: int = 2, sizes: tuple[int, ...] = (8, 64, 512, 4096),
                      repeat: int = 1000, warmup: int = 100, mpiexec: str | None = None) -> dict:
    """Seconds of the two allgathers of a generation for populations `sizes` on `ranks`
    ranks, timed alone: per iteration the slowest rank's time, median over iterations."""
    from es_mpi.errors import EsError

    cmd = [_mpiexec(mpiexec), "-n", str(ranks), sys.executable, "-m", "es_mpi.tooling.scaling",
           "allgather", "--sizes", ",".join(map(str, sizes)), "--repeat", str(repeat),
           "--warmup", str(warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EsError(f"scaling allgather on {ranks} ranks failed: {tail}")
    return json.loads(lines[-1])


def _allgather_child(sizes: list[int], repeat: int, warmup: int) -> None:
    """Under mpiexec: time Dist.allgather_rows (Allgatherv of the member rows) and
    Dist.allgather_ints (Allgather of 4 int64 per rank), the collectives of the loop."""
    from es_mpi.dist import Dist
    from es_mpi.evaluators import ROW_DTYPE

    dist = Dist()
    p = dist.size
    result = {"ranks": p, "repeat": repeat, "warmup": warmup,
              "row_bytes": ROW_DTYPE.itemsize, "sizes": {}}
    for n in sizes:
        # members dealt round-robin, as groups of one member are in the loop
        counts = [len(range(r, n, p)) for r in range(p)]
        rows = np.zeros(counts[dist.rank], dtype=ROW_DTYPE)
        rows["member"] = np.arange(dist.rank, n, p)
        rows["rank"] = dist.rank
        ints = [dist.rank, 0, n, 1]
        times = np.zeros((repeat, 2))
        for i in range(warmup + repeat):
            dist.barrier()
            t0 = time.perf_counter()
            moved = dist.bytes_moved
            out = dist.allgather_rows(rows, counts)
            t1 = time.perf_counter()
            status = dist.allgather_ints(ints)
            t2 = time.perf_counter()
            if i >= warmup:
                times[i - warmup] = (t1 - t0, t2 - t1)
        # what arrived: every rank's rows in rank order, every rank's ints
        expect = np.concatenate([np.arange(r, n, p) for r in range(p)])
        ok = bool(np.array_equal(out["member"], expect)
                  and np.array_equal(status[:, 0], np.arange(p)))
        slowest = np.max(np.stack(dist.allgather(times)), axis=0)  # per iteration
        both = slowest.sum(axis=1)
        result["sizes"][str(n)] = {
            "rows_seconds": float(np.median(slowest[:, 0])),
            "ints_seconds": float(np.median(slowest[:, 1])),
            "seconds": float(np.median(both)),
            "seconds_p10": float(np.percentile(both, 10)),
            "seconds_p90": float(np.percentile(both, 90)),
            "sent_bytes": int(rows.nbytes + np.asarray(ints, np.int64).nbytes),
            "received_rows_bytes": int(out.nbytes),
            "received_ints_bytes": int(status.nbytes),
            "received_bytes": int(out.nbytes + status.nbytes),
            "dist_bytes_moved": int(dist.bytes_moved - moved),  # es_mpi.dist's own counter
            "received_ok": ok}
    if dist.is_root:
        print(json.dumps(result), flush=True)


# -- modelled ------------------------------------------------------------------------------

def allgather_seconds(gathered_bytes: int, ranks: int, alpha: float, beta: float,
                      algorithm: str = "recursive_doubling") -> float:
    """One allgather of `gathered_bytes` in all (Thakur, Rabenseifner & Gropp 2005):
    recursive doubling (MPICH's choice below 512 KiB gathered on a power-of-two number of
    ranks; Bruck's for other counts costs the same) takes ceil(log2 P) steps, a ring
    P - 1; either way each rank receives (P-1)/P of the gathered bytes."""
    if ranks <= 1:
        return 0.0
    steps = {"recursive_doubling": math.ceil(math.log2(ranks)), "ring": ranks - 1}[algorithm]
    return alpha * steps + beta * gathered_bytes * (ranks - 1) / ranks


def comm_model(population: int, ranks: int, alpha: float, beta: float,
               algorithm: str = "recursive_doubling") -> dict:
    """Bytes one rank sends and receives per generation, and the modelled seconds of the
    generation's two allgathers (the member rows, then 4 int64 per rank)."""
    from es_mpi.evaluators import ROW_DTYPE

    b = comm_bytes(population, ranks)
    rows = population * ROW_DTYPE.itemsize
    ints = INTS_PER_RANK * 8 * ranks
    return {"population": population, "ranks": ranks, "sent": b["sent"],
            "received": b["received"],
            "seconds": (allgather_seconds(rows, ranks, alpha, beta, algorithm)
                        + allgather_seconds(ints, ranks, alpha, beta, algorithm))}


def fit_alpha_beta(allgather: dict) -> tuple[float, float]:
    """alpha, beta of the cost model from a measured allgather_latency: for each size,
    the generation's two allgathers together (2 alpha ceil(log2 P) + beta (rows + ints)
    (P-1)/P), least squares on relative error. One alpha for both collectives: on this
    host the rows' Allgatherv costs more than the ints' Allgather at any size, and the
    per-generation sum is the figure the model is for."""
    p = allgather["ranks"]
    steps = math.ceil(math.log2(p))
    xs, ys = [], []
    for n, m in allgather["sizes"].items():
        gathered = int(n) * allgather["row_bytes"] + INTS_PER_RANK * 8 * p
        xs.append([2 * steps, gathered * (p - 1) / p])
        ys.append(m["seconds"])
    a, y = np.array(xs, float), np.array(ys, float)
    w = 1 / y
    alpha, beta = np.linalg.lstsq(a * w[:, None], y * w, rcond=None)[0]
    if beta < 0:  # no bandwidth term visible at these sizes: latency only
        alpha, beta = float(np.median(y / (2 * steps))), 0.0
    return max(float(alpha), 0.0), float(beta)


def comm_table_rows(allgather: dict, members_per_rank: int,
                    ranks: tuple[int, ...] = tuple(2 ** i for i in range(1, 13))) -> dict:
    """The communication model for P in ranks, N = members_per_rank * P: alpha, beta
    fitted to this host's measurement and the assumed NETWORKS."""
    alpha, beta = fit_alpha_beta(allgather)
    rows = []
    for p in ranks:
        n = members_per_rank * p
        here = comm_model(n, p, alpha, beta)
        row = {"ranks": p, "population": n, "sent": here["sent"],
               "received": here["received"], "modelled_seconds": here["seconds"],
               "networks": {name: comm_model(n, p, a, b)["seconds"]
                            for name, (a, b) in NETWORKS.items()}}
        measured = allgather["sizes"].get(str(n)) if p == allgather["ranks"] else None
        if measured:
            row["measured_seconds"] = measured["seconds"]
            row["measured_received"] = measured["received_bytes"]
        rows.append(row)
    return {"alpha": alpha, "beta": beta, "members_per_rank": members_per_rank,
            "measured_ranks": allgather["ranks"], "rows": rows}


# -- markdown ------------------------------------------------------------------------------

def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f}"


def scaling_table(reports: dict) -> str:
    """Strong and weak scaling, one row per mode and ranks: {mode label: measure()}."""
    lines = ["| mode | scaling | ranks | N | s / generation, median (min-max) | "
             "speedup (paired range) | efficiency | t_k / t_1 (paired range) | "
             "s / member eval | update + checksum s | gather s | other load, cores |",
             "|" + "---|" * 12]
    notes = []
    for label, rep in reports.items():
        notes += [f"{label}: {n}" for n in rep["notes"]]
        for kind in ("strong", "weak"):
            for k, r in rep[kind]["ranks"].items():
                s = r["seconds"]
                sp = (f"{r['speedup']:.2f} ({r['speedup_range'][0]:.2f}-"
                      f"{r['speedup_range'][1]:.2f})" if "speedup" in r else "")
                eff = f"{r['efficiency']:.2f}" if "efficiency" in r else ""
                ratio = (f"{r['ratio']:.2f} ({r['ratio_range'][0]:.2f}-"
                         f"{r['ratio_range'][1]:.2f})" if "ratio" in r else "")
                lines.append(
                    f"| {label} | {kind} | {k} | {r['population']} | {s['median']:.2f} "
                    f"({s['min']:.2f}-{s['max']:.2f}) | {sp} | {eff} | {ratio} | "
                    f"{r['member_seconds']:.2f} | {r['time_update_checksum']:.2f} | "
                    f"{r['time_gather']:.3f} | {r['other_cores']:.2f} |")
        same = "bit-identical" if rep["strong"]["identical"] else "DIFFERENT"
        notes.append(f"{label}: strong-scaling runs end with {same} weights on every rank "
                     "count (final checksums)")
    notes.append("other load: CPU time other processes (and the hypervisor's steal) took "
                 "during a run, over its wall time; the most of any run of the row")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def comm_table(model: dict) -> str:
    """Bytes and latency per generation, measured to model['measured_ranks'] and
    modelled beyond."""
    nets = list(NETWORKS)
    lines = ["| ranks P | N | sent B / rank | received B / rank | measured us | "
             "modelled us, this host (fitted) | " + " | ".join(f"modelled us, {n}" for n in nets)
             + " |", "|" + "---|" * (6 + len(nets))]
    for r in model["rows"]:
        meas = _us(r["measured_seconds"]) if "measured_seconds" in r else ""
        lines.append(f"| {r['ranks']} | {r['population']} | {r['sent']:,} | "
                     f"{r['received']:,} | {meas} | {_us(r['modelled_seconds'])} | "
                     + " | ".join(_us(r["networks"][n]) for n in nets) + " |")
    lines.append("")
    lines.append(f"Fitted on {model['measured_ranks']} ranks of this host (shared memory): "
                 f"alpha = {_us(model['alpha'])} us, beta = {model['beta'] * 1e9:.3f} ns/B; "
                 "the network columns use assumed constants, not measurements.")
    return "\n".join(lines)


def allgather_table(allgather: dict) -> str:
    lines = [f"| N (on {allgather['ranks']} ranks) | rows Allgatherv us | ints Allgather us | "
             "both us, median (p10-p90) | sent B | received B |", "|" + "---|" * 6]
    for n, m in allgather["sizes"].items():
        lines.append(f"| {n} | {_us(m['rows_seconds'])} | {_us(m['ints_seconds'])} | "
                     f"{_us(m['seconds'])} ({_us(m['seconds_p10'])}-{_us(m['seconds_p90'])}) "
                     f"| {m['sent_bytes']:,} | {m['received_bytes']:,} |")
    return "\n".join(lines)


def table(report: dict) -> str:
    """Markdown of a report: {"measured": {label: measure()}, "allgather": ...,
    "model": comm_table_rows()}, any part optional; or one measure() result."""
    if "strong" in report:
        return scaling_table({report["settings"]["mode"]: report})
    parts = []
    if "measured" in report:
        parts.append(scaling_table(report["measured"]))
    if "allgather" in report:
        parts.append(allgather_table(report["allgather"]))
    if "model" in report:
        parts.append(comm_table(report["model"]))
    return "\n\n".join(parts)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m es_mpi.tooling.scaling")
    sub = parser.add_subparsers(dest="command", required=True)
    ag = sub.add_parser("allgather", help="time the loop's collectives (run under mpiexec)")
    ag.add_argument("--sizes", default="8,64,512,4096", help="populations N, comma-separated")
    ag.add_argument("--repeat", type=int, default=1000, help="timed iterations per size")
    ag.add_argument("--warmup", type=int, default=100, help="untimed iterations first")
    args = parser.parse_args(argv)
    _allgather_child([int(s) for s in args.sizes.split(",")], args.repeat, args.warmup)


if __name__ == "__main__":
    main(sys.argv[1:])
