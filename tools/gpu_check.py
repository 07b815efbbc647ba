#!/usr/bin/env python3
"""One-shot GPU acceptance run: no network, no model files, one or more GPUs.

    python tools/gpu_check.py --out DIR            on a GPU machine (under 8 min on an H200)
    python tools/gpu_check.py --dry-run --out DIR  the same code path on the CPU, tiny models

It builds random-weight models from the shipped configs of the paper's sizes
(es_mpi/configs), then runs, each step timed and recorded even when one fails:
  1. the CUDA tests (tests/test_gpu.py);
  2. determinism: in both modes, 2 ranks sharing the GPU against 1 rank stopped and
     resumed (bit-identical rewards and checksums), and 1 rank with micro-batches of
     1 row and with the fp32 master in host memory, compared with the same;
  3. `es-mpi bench` (inference, lowrank, full, paper) in bf16 per model size, with the
     host RSS while loading;
  4. peak GPU memory of each ES mode against `es-mpi plan`'s estimate.
Everything goes to DIR/gpu_check.json, and a short table to DIR/gpu_check.md (also
printed). Exit status 1 if a must-hold check failed (determinism, CUDA tests).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# the shape a dry run gives every size: the same architecture, shrunk
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 371,
        "max_position_embeddings": 512}
RUN = ["--population", "4", "--sigma", "0.05", "--lr", "0.05", "--max-new-tokens", "8",
       "--antithetic", "--checkpoint-every", "3", "--checksum-every", "1", "-q"]
MODES = {"full": [], "lowrank": ["--mode", "lowrank", "--member-batch", "2"]}


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(PYTHONPATH=f"{ROOT}{os.pathsep}{e.get('PYTHONPATH', '')}", PYTHONUNBUFFERED="1",
             HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def es_mpi(args: list, np: int | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "es_mpi.cli", *map(str, args)]
    if np is not None:
        mpiexec = shutil.which("mpiexec") or shutil.which("mpiexec",
                                                          path=str(Path(sys.executable).parent))
        if mpiexec is None:
            raise RuntimeError("mpiexec not found (pip install mpich)")
        cmd = [mpiexec, "-n", str(np), *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=timeout,
                          cwd=ROOT, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
        raise RuntimeError(f"es-mpi {' '.join(map(str, args[:1]))} failed: {' / '.join(tail)}")
    return proc


def build_model(name: str, out: Path, dry_run: bool, small_vocab: bool = False) -> Path:
    """A random-weight model from a shipped config (shrunk in a dry run), with the tests'
    byte-level tokenizer. small_vocab: the tokenizer's vocabulary, so that completions
    decode to text and rewards vary (for the determinism checks)."""
    import torch
    from tiny_model import make_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    from es_mpi import plan

    values = json.loads(plan.resolve(name)[1].read_text())
    if dry_run:
        values.update(TINY)
    tokenizer = make_tokenizer(out)
    if small_vocab:
        values["vocab_size"] = len(tokenizer)
    values.update(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    config = AutoConfig.for_model(**values)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def read_run(path: Path) -> tuple[list, list]:
    import h5py

    with h5py.File(path, "r") as f:
        done = int(f.attrs["complete_generations"])
        return (f["generations/rewards"][:done].tolist(), f["generations/checksum"][:done].tolist())


def determinism(model: Path, work: Path) -> dict:
    """Per mode: 2 ranks sharing the GPU, 1 rank stopped after 1 generation and resumed,
    1 rank with micro-batches of 1 row, 1 rank with the master in host memory."""
    out = {}
    for mode, flags in MODES.items():
        common = ["--model", model, *RUN, *flags]
        runs = {name: work / f"{mode}-{name}.h5" for name in ("two", "one", "micro", "host")}
        es_mpi(["train", "--run", runs["two"], "--generations", 3, *common], np=2)
        es_mpi(["train", "--run", runs["one"], "--generations", 1, *common])
        es_mpi(["resume", runs["one"], "--generations", 3, "-q"])
        es_mpi(["train", "--run", runs["micro"], "--generations", 3, "--generate-batch", 1,
                *common])
        es_mpi(["train", "--run", runs["host"], "--generations", 3, "--master", "host",
                *common])
        ref = read_run(runs["two"])
        varied = len({r for row in ref[0] for r in row}) > 1
        same = {name: read_run(path) == ref for name, path in runs.items() if name != "two"}
        out[mode] = {"rewards_vary": varied, "one_rank_resumed_equals_two_ranks": same["one"],
                     "micro_batch_1_equals": same["micro"], "master_host_equals": same["host"],
                     "checksums": ref[1]}
    return out


def bench(model: Path, work: Path, dry_run: bool) -> dict:
    report = work / f"bench-{model.name}.json"
    settings = (["--population", 4, "--prompts", 2, "--max-new-tokens", 4, "--repeat", 1]
                if dry_run else ["--population", 8, "--prompts", 4, "--max-new-tokens", 64,
                                 "--repeat", 3])
    proc = es_mpi(["bench", "--model", model, "--dtype", "bfloat16", "--threads", 1,
                   *settings, "--json", report], timeout=900)
    result = json.loads(report.read_text())
    result["table"] = proc.stdout.split("wrote")[0].strip()
    return result


def plan_against_peaks(model: Path, bench_report: dict) -> dict:
    """es-mpi plan's estimate for each ES mode's bench settings against the peak measured
    (torch's allocations on a GPU, RSS above the imports on the CPU)."""
    from es_mpi import plan

    out = {}
    s = bench_report["settings"]
    shape = plan.shape_of(str(model))
    for mode in ("lowrank", "full"):
        r = bench_report["modes"].get(mode)
        if r is None:
            continue
        settings = plan.Settings(
            mode=mode, dtype="bfloat16", master=s.get("master", "device"),
            population=s["population"], member_batch=r.get("member_batch") or 1,
            rank=s["rank"],
            antithetic=s["antithetic"], prompts=s["prompts"],
            prompt_tokens=r.get("prompt_tokens", 32), max_new_tokens=s["max_new_tokens"],
            generate_batch=r.get("generate_batch", 0),
            device="cuda" if "peak_cuda_bytes" in r else "cpu")
        device = plan.plan(shape, settings).to_dict()["device"]
        # torch's allocator counts neither the CUDA context nor its own caching slack
        planned = device["total"] - device.get("cuda_context", 0) - device.get(
            "allocator_slack", 0)
        measured = r.get("peak_cuda_bytes", r["peak_rss_bytes"] - r["base_rss_bytes"])
        out[mode] = {"planned_bytes": planned, "measured_peak_bytes": measured,
                     "planned_over_measured": planned / measured, "plan": device,
                     "measured_reserved_bytes": r.get("peak_cuda_reserved_bytes")}
    return out


def step(results: dict, name: str, fn, *args):
    t = time.perf_counter()
    print(f"gpu_check: {name} ...", flush=True)
    try:
        results[name] = {"ok": True, "result": fn(*args)}
    except Exception as exc:  # noqa: BLE001 -- record and go on: one failed step must not hide the others
        results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc()[-4000:]}
    results[name]["seconds"] = round(time.perf_counter() - t, 1)
    print(f"gpu_check: {name}: {'ok' if results[name]['ok'] else results[name]['error']} "
          f"({results[name]['seconds']} s)", flush=True)
    if SAVE is not None:  # after every step: a run cut short still leaves its results
        SAVE()
    return results[name].get("result")


SAVE = None


def cuda_tests() -> dict:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "tests/test_gpu.py"], capture_output=True, text=True, env=env(),
                          cwd=ROOT, timeout=600, check=False)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    if proc.returncode not in (0, 5):
        raise RuntimeError(f"CUDA tests failed: {summary}\n{proc.stdout[-3000:]}")
    return {"summary": summary}


def machine() -> dict:
    import platform

    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cuda": torch.version.cuda,
            "gpus": torch.cuda.device_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return info


def table(results: dict) -> str:
    lines = ["| check | result | s |", "|---|---|---|"]
    for name, r in results["steps"].items():
        if not r["ok"]:
            lines.append(f"| {name} | FAILED: {r['error'][:160]} | {r['seconds']} |")
            continue
        res = r["result"]
        if res is None:
            lines.append(f"| {name} | skipped: {r.get('skipped', '')} | {r['seconds']} |")
            continue
        if name == "determinism":
            text = "; ".join(f"{m}: " + ", ".join(f"{k}={v}" for k, v in d.items()
                                                   if k != "checksums")
                             for m, d in res.items())
        elif name.startswith("plan "):
            text = "; ".join(f"{m}: planned {d['planned_bytes'] / 2**30:.2f} GiB, peak "
                             f"{d['measured_peak_bytes'] / 2**30:.2f} GiB "
                             f"(x{d['planned_over_measured']:.2f})" for m, d in res.items())
        elif name.startswith("bench "):
            text = "; ".join(
                f"{m}: {d['seconds']:.2f} s ({d.get('ratio_to_inference', 0):.2f}x inference)"
                for m, d in res["modes"].items())
            load = res["modes"].get("inference", {})
            if load:
                added = load["load_peak_rss_bytes"] - load["base_rss_bytes"]
                text += f"; load: host RSS +{added / load['model_bytes']:.2f} x model bytes"
        elif isinstance(res, dict) and "summary" in res:
            text = res["summary"]
        else:
            text = "ok"
        lines.append(f"| {name} | {text} | {r['seconds']} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="the same steps on the CPU with tiny models (for CI)")
    ap.add_argument("--out", default="gpu_check_out", help="directory for the results")
    ap.add_argument("--sizes", default="qwen2.5-0.5b,qwen2.5-1.5b,qwen2.5-7b",
                    help="shipped configs to bench, smallest first")
    ap.add_argument("--budget", type=float, default=420,
                    help="seconds; a size is benched only while this many have not passed")
    opts = ap.parse_args()
    import torch

    if not opts.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    start = time.perf_counter()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="es-mpi-gpu-check-"))
    sizes = [s for s in opts.sizes.split(",") if s]
    if opts.dry_run:
        sizes = sizes[:1]
    results: dict = {"dry_run": opts.dry_run, "machine": machine(), "steps": {}}
    steps = results["steps"]

    def save() -> None:
        results["seconds"] = round(time.perf_counter() - start, 1)
        (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
        (out / "gpu_check.md").write_text(table(results) + "\n")

    global SAVE
    SAVE = save
    step(steps, "cuda tests", cuda_tests)
    small = step(steps, "build determinism model", build_model, sizes[0],
                 work / "models" / "det", opts.dry_run, True)
    if small is not None:
        step(steps, "determinism", determinism, small, work)
    for size in sizes:
        if time.perf_counter() - start > opts.budget:
            steps[f"bench {size}"] = {"ok": True, "result": None, "seconds": 0,
                                      "skipped": "time budget"}
            continue
        model = step(steps, f"build {size}", build_model, size, work / "models" / size,
                     opts.dry_run)
        if model is None:
            continue
        report = step(steps, f"bench {size}", bench, model, work, opts.dry_run)
        if report is not None:
            step(steps, f"plan {size}", plan_against_peaks, model, report)
        shutil.rmtree(model, ignore_errors=True)
    save()
    print(table(results))
    shutil.rmtree(work, ignore_errors=True)
    det = steps.get("determinism", {})
    must = [steps.get("cuda tests", {}).get("ok", False), det.get("ok", False)]
    if det.get("ok"):
        must += [d["rewards_vary"] and d["one_rank_resumed_equals_two_ranks"]
                 and d["master_host_equals"] for d in det["result"].values()]
    print(f"gpu_check: {'passed' if all(must) else 'FAILED'} in {results['seconds']} s")
    return 0 if all(must) else 1


if __name__ == "__main__":
    sys.exit(main())
