#!/usr/bin/env python3
"""One-shot GPU acceptance run: no network, no model files, one or more GPUs.

    python tools/gpu_check.py --out DIR            on a GPU machine: ends by --deadline
    python tools/gpu_check.py --dry-run --out DIR  the same code path on the CPU, tiny models

It builds random-weight models from the shipped configs of the paper's sizes
(es_mpi/tooling/configs), then runs these steps in this order, each timed and recorded even
when one fails:
  1. the CUDA tests (tests/test_gpu.py);
  2. determinism, on a random qwen2.5-0.5b with the tests' small vocabulary: in both
     modes, 2 ranks (with --share-gpus: on one GPU they share it) against 1 rank
     stopped and resumed (bit-identical rewards and checksums), and 1 rank with the
     fp32 master in host memory, compared with the same; 1 rank with micro-batches of
     1 row is compared too, and recorded without being required (on a GPU another
     batch shape may take other kernels);
  3. per model size (--sizes), qwen2.5-7b first, the size where `es-mpi plan`'s GPU
     terms matter, then qwen2.5-0.5b and qwen2.5-1.5b: build the model, `es-mpi bench`
     it in bf16 (with the host RSS while loading), and compare the peak GPU memory of
     each ES mode with `es-mpi plan`'s estimate. 7b: lowrank, full, then inference,
     one bench run each, one generation per mode (their fp32 masters would not fit on
     one 80 GB GPU together, as bench's interleaved rounds would hold them); the
     others: every mode and one interleaved round, in one bench run.
A model is built in a subprocess, in bf16 straight on the GPU, and saved as safetensors
in shards of 2 GB (host memory: about one shard); the work directory (models, run files)
is deleted as each size is done. A dry run shrinks every size to TINY and benches only
the first two sizes (the 7b path, then the small sizes' path).

One deadline (--deadline, seconds from the start, default 540: a run lent 15 minutes of
device time keeps room to start the machine and to run again) bounds everything: each
subprocess (pytest, es-mpi train/resume/bench, the model builds) gets min(its own cap,
the time left - MARGIN), and is killed with its whole process group (mpiexec's ranks,
bench's workers) when that passes; the step is then recorded as timed out. A step is
not started when the time left is under a rough guess of what it needs on a GPU (NEEDS,
SIZE_STEPS; 1 s in a dry run), and is recorded as skipped, with the reason. What runs
in this process besides (reading the machine, plan's estimates) takes seconds, so the
script ends within seconds of the deadline (normally a little before it).

Everything goes to DIR/gpu_check.json and a short table to DIR/gpu_check.md, both
rewritten after every step (a run killed from outside loses only the step running); the
table is printed at the end. Exit status 0 if every must-hold check (CUDA tests,
determinism) ran and held, 1 if one failed or did not run (INCOMPLETE), 2 without a
GPU (and no --dry-run), 130 if interrupted (SIGINT, SIGTERM).
"""

from __future__ import annotations

import time

START = time.monotonic()  # the deadline counts from here, before the heavy imports

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

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
SIZES = "qwen2.5-7b,qwen2.5-0.5b,qwen2.5-1.5b"
DETERMINISM_SIZE = "qwen2.5-0.5b"
# Seconds a step roughly needs on an H100 (guesses until a first run measures them), to
# skip a step that cannot finish in the time left rather than start it and lose that
# time. Per size: its build, then its `es-mpi bench` runs, each (modes, interleaved
# rounds (0: each mode's single run alone), seconds). 7b benches one mode per run, the
# ES modes first, so that a run cut by the deadline loses one mode only, and without
# bench's timed checkpoint write (its fp32 master at 7b is about 30 GB: minutes).
NEEDS = {"cuda tests": 20, "build determinism model": 10, "determinism": 120, "plan": 5}
ALL_MODES = "inference,lowrank,full,paper"
SIZE_STEPS = {
    "qwen2.5-7b": {"build": 45, "bench": [("lowrank", 0, 120), ("full", 0, 120),
                                          ("inference", 0, 40)]},
    "qwen2.5-0.5b": {"build": 10, "bench": [(ALL_MODES, 1, 40)]},
    "qwen2.5-1.5b": {"build": 15, "bench": [(ALL_MODES, 1, 60)]},
}
SIZE_STEPS_DEFAULT = {"build": 45, "bench": [(ALL_MODES, 1, 120)]}
DRY_NEED = 1.0  # a dry run's steps are small
MARGIN = 5.0  # seconds kept back from every subprocess: to kill it, save and exit
CAPS = {"pytest": 600, "train": 300, "bench": 900, "build": 600}


class StepSkipped(Exception):
    """A step not started (no time left for it, or a step it needs did not succeed)."""


class StepTimeout(Exception):
    """A step's subprocess killed at its cap or at the deadline."""


class Interrupted(BaseException):
    """SIGTERM: stop as SIGINT does (the running subprocess group is killed)."""


class Deadline:
    """The one deadline of the run: `seconds` after `start` (time.monotonic)."""

    def __init__(self, seconds: float, start: float = START):
        self.seconds = seconds
        self.end = start + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def timeout(self, cap: float, what: str) -> float:
        """The timeout for a subprocess: min(cap, time left - MARGIN); StepTimeout if
        nothing is left."""
        t = min(cap, self.left() - MARGIN)
        if t <= 0:
            raise StepTimeout(f"{what}: not started, the deadline ({self.seconds:g} s) is "
                              "reached")
        return t


DEADLINE = Deadline(540)


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(PYTHONPATH=f"{ROOT}{os.pathsep}{e.get('PYTHONPATH', '')}", PYTHONUNBUFFERED="1",
             HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def run_bounded(cmd: list, cap: float, what: str) -> subprocess.CompletedProcess:
    """Run `cmd` (output captured) in a process group of its own, for at most
    DEADLINE.timeout(cap); past that the whole group (mpiexec's ranks, bench's workers)
    is killed and StepTimeout raised. The group is killed too if the command ends with
    processes of it left, or if this one is interrupted."""
    timeout = DEADLINE.timeout(cap, what)
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        # a process that left the group may hold the pipes: do not wait for it
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=MARGIN / 2)
        by = "its cap" if timeout >= cap else f"the deadline ({DEADLINE.seconds:g} s)"
        raise StepTimeout(f"{what}: killed after {timeout:.0f} s, at {by}") from None
    finally:
        _kill_group(proc)
        if proc.poll() is None:
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def es_mpi(args: list, np: int | None = None, cap: float = CAPS["train"]
           ) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "es_mpi.cli", *map(str, args)]
    if np is not None:
        mpiexec = shutil.which("mpiexec") or shutil.which("mpiexec",
                                                          path=str(Path(sys.executable).parent))
        if mpiexec is None:
            raise RuntimeError("mpiexec not found (pip install mpich)")
        cmd = [mpiexec, "-n", str(np), *cmd]
    proc = run_bounded(cmd, cap, f"es-mpi {args[0]}")
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
        text = " / ".join(tail)
        if "timed out" in text and args[0] == "bench":  # bench's own --timeout, ours
            raise StepTimeout(f"es-mpi bench: {text}")
        raise RuntimeError(f"es-mpi {args[0]} failed: {text}")
    return proc


def build_model(name: str, out: Path, dry_run: bool, small_vocab: bool = False) -> Path:
    """A random-weight model from a shipped config (shrunk to TINY in a dry run), with the
    tests' byte-level tokenizer, built in bf16 straight on the GPU where there is one and
    saved as safetensors in shards of 2 GB (the host holds about one shard at a time).
    small_vocab: the tokenizer's vocabulary, so that completions decode to text and
    rewards vary (for the determinism checks)."""
    import torch
    from tiny_model import make_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    from es_mpi.tooling import plan

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
    model.save_pretrained(out, max_shard_size="2GB")
    return out


def build(name: str, out: Path, dry_run: bool, small_vocab: bool = False) -> Path:
    """build_model in a subprocess (this script with --build-model), bounded like every
    other step, and whose GPU memory is freed when it exits."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--build-model", name, str(out)]
    cmd += ["--dry-run"] * dry_run + ["--small-vocab"] * small_vocab
    proc = run_bounded(cmd, CAPS["build"], f"build {name}")
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
        raise RuntimeError(f"build {name} failed: {' / '.join(tail)}")
    return out


def read_run(path: Path) -> tuple[list, list]:
    import h5py

    with h5py.File(path, "r") as f:
        done = int(f.attrs["complete_generations"])
        return (f["generations/rewards"][:done].tolist(), f["generations/checksum"][:done].tolist())


def determinism(model: Path, work: Path) -> dict:
    """Per mode: 2 ranks (--share-gpus: on one GPU they share it; a no-op on the CPU),
    1 rank stopped after 1 generation and resumed, 1 rank with micro-batches of 1 row,
    1 rank with the master in host memory."""
    out = {}
    for mode, flags in MODES.items():
        common = ["--model", model, *RUN, *flags]
        runs = {name: work / f"{mode}-{name}.h5" for name in ("two", "one", "micro", "host")}
        es_mpi(["train", "--run", runs["two"], "--generations", 3, "--share-gpus", *common],
               np=2)
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


def bench(model: Path, work: Path, size: str, modes: str, repeat: int, dry_run: bool) -> dict:
    report = work / f"bench-{model.name}-{modes.replace(',', '-')}.json"
    settings = (["--population", 4, "--prompts", 2, "--max-new-tokens", 4] if dry_run
                else ["--population", 8, "--prompts", 4, "--max-new-tokens", 64])
    settings.append("--antithetic")  # pairs, as the CPU figures of docs/speed.md
    # bench bounds its own workers too; its clock starts after its imports, so ours,
    # which kills the whole group, mostly comes first
    limit = DEADLINE.timeout(CAPS["bench"], f"bench {size} {modes}")
    # a 7B checkpoint is ~30 GB of compressed HDF5: minutes that the deadline cannot spare
    ckpt = ["--no-checkpoint"] if size == "qwen2.5-7b" else []
    proc = es_mpi(["bench", "--model", model, "--dtype", "bfloat16", "--threads", 1,
                   "--modes", modes, "--repeat", repeat, *settings, *ckpt, "--json", report,
                   "--timeout", f"{max(limit - 3, 1):.0f}"], cap=CAPS["bench"])
    result = json.loads(report.read_text())
    result["table"] = proc.stdout.split("wrote")[0].strip()
    return result


def merge(reports: list[dict]) -> dict | None:
    """The bench reports of one size as one (the first one's settings, every mode), with
    each mode's time over inference's where that was benched in another run."""
    if not reports:
        return None
    modes = {m: dict(r) for report in reports for m, r in report["modes"].items()}
    ref = modes.get("inference")
    for r in modes.values():
        if ref is not None and "ratio_to_inference" not in r:
            r["ratio_to_inference"] = r["seconds"] / ref["seconds"]
    return {"settings": reports[0]["settings"], "modes": modes}


def plan_against_peaks(model: Path, bench_report: dict) -> dict:
    """es-mpi plan's estimate for each ES mode's bench settings against the peak measured
    (torch's allocations on a GPU, RSS above the imports on the CPU)."""
    from es_mpi.tooling import plan

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
        # torch's allocated bytes count neither the CUDA context nor the caching
        # allocator's reserve: the plan's peak without them (its phases' larger one)
        terms = {k: v for k, v in device.items() if k != "total"}
        terms.update({k: 0 for k in ("cuda_context", "allocator_reserve") if k in terms})
        planned = plan._total(terms)
        measured = r.get("peak_cuda_bytes", r["peak_rss_bytes"] - r["base_rss_bytes"])
        out[mode] = {"planned_bytes": planned, "measured_peak_bytes": measured,
                     "planned_over_measured": planned / measured, "plan": device}
        if "peak_cuda_reserved_bytes" in r:  # the reserve too: all but the CUDA context
            reserved = device["total"] - device.get("cuda_context", 0)
            out[mode].update(planned_reserved_bytes=reserved,
                             measured_reserved_bytes=r["peak_cuda_reserved_bytes"],
                             planned_over_reserved=reserved / r["peak_cuda_reserved_bytes"])
    return out


SAVE = None


def step(results: dict, name: str, need: float, fn, *args):
    """Run fn(*args) as the step `name` if `need` seconds are left before the deadline
    (else record it as skipped), and record its result, failure or timeout; returns the
    result (None if it did not succeed)."""
    left = DEADLINE.left()
    t = time.perf_counter()
    if left - MARGIN < need:
        results[name] = {"ok": False, "status": "skipped", "seconds": 0.0,
                         "reason": f"not started: {max(left, 0):.1f} s left before the "
                                   f"deadline ({DEADLINE.seconds:g} s), under the {need:g} s "
                                   f"it needs and the {MARGIN:g} s kept to stop"}
    else:
        print(f"gpu_check: {name} ...", flush=True)
        try:
            results[name] = {"ok": True, "status": "ok", "result": fn(*args)}
        except StepSkipped as exc:
            results[name] = {"ok": False, "status": "skipped", "reason": str(exc)}
        except StepTimeout as exc:
            results[name] = {"ok": False, "status": "timed out", "reason": str(exc)}
        except (Interrupted, KeyboardInterrupt):
            results[name] = {"ok": False, "status": "interrupted",
                             "seconds": round(time.perf_counter() - t, 1)}
            if SAVE is not None:
                SAVE()
            raise
        except Exception as exc:  # noqa: BLE001 -- record and go on: one failed step must not hide the others
            results[name] = {"ok": False, "status": "failed",
                             "error": f"{type(exc).__name__}: {exc}",
                             "traceback": traceback.format_exc()[-4000:]}
        results[name]["seconds"] = round(time.perf_counter() - t, 1)
    r = results[name]
    print(f"gpu_check: {name}: "
          f"{r['status'] if r['ok'] else r['status'] + ': ' + r.get('reason', r.get('error'))}"
          f" ({r['seconds']} s)", flush=True)
    if SAVE is not None:  # after every step: a run cut short still leaves its results
        SAVE()
    return r.get("result")


def needs_ok(what: str):
    """A step that needs `what` (the result of an earlier step) to have succeeded."""
    def fn(*_):
        raise StepSkipped(f"{what} did not succeed")
    return fn


def cuda_tests() -> dict:
    proc = run_bounded([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        "tests/test_gpu.py"], CAPS["pytest"], "pytest tests/test_gpu.py")
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
        status = r.get("status", "ok" if r["ok"] else "failed")
        if status == "failed":
            lines.append(f"| {name} | FAILED: {r['error'][:160]} | {r['seconds']} |")
            continue
        if status != "ok":
            lines.append(f"| {name} | {status.upper()}: {r.get('reason', '')[:160]} | "
                         f"{r['seconds']} |")
            continue
        res = r["result"]
        if name == "determinism":
            text = "; ".join(f"{m}: " + ", ".join(f"{k}={v}" for k, v in d.items()
                                                   if k != "checksums")
                             for m, d in res.items())
        elif name.startswith("plan "):
            text = "; ".join(
                f"{m}: planned {d['planned_bytes'] / 2**30:.2f} GiB, peak "
                f"{d['measured_peak_bytes'] / 2**30:.2f} GiB (x{d['planned_over_measured']:.2f})"
                + (f", reserved: planned {d['planned_reserved_bytes'] / 2**30:.2f} GiB, peak "
                   f"{d['measured_reserved_bytes'] / 2**30:.2f} GiB "
                   f"(x{d['planned_over_reserved']:.2f})" if "planned_reserved_bytes" in d
                   else "")
                for m, d in res.items())
        elif name.startswith("bench "):
            text = "; ".join(
                f"{m}: {d['seconds']:.2f} s" + (f" ({d['ratio_to_inference']:.2f}x inference)"
                                                if "ratio_to_inference" in d else "")
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


def _interrupt(signum, _frame):
    raise Interrupted(signal.Signals(signum).name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="the same steps on the CPU with tiny models (for CI)")
    ap.add_argument("--out", default="gpu_check_out", help="directory for the results")
    ap.add_argument("--sizes", default=SIZES,
                    help="shipped configs to bench, in this order (a dry run: the first two)")
    ap.add_argument("--deadline", type=float, default=540,
                    help="seconds from the start by which everything has ended (default 540)")
    ap.add_argument("--build-model", nargs=2, metavar=("NAME", "DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--small-vocab", action="store_true", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.build_model:  # the subprocess of build()
        build_model(opts.build_model[0], Path(opts.build_model[1]), opts.dry_run,
                    opts.small_vocab)
        return 0
    if opts.deadline <= 0:
        print(f"gpu_check: --deadline {opts.deadline:g}: must be > 0", file=sys.stderr)
        return 2
    global DEADLINE, SAVE
    DEADLINE = Deadline(opts.deadline)
    signal.signal(signal.SIGTERM, _interrupt)
    import torch

    if not opts.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="es-mpi-gpu-check-"))
    sizes = [s for s in opts.sizes.split(",") if s]
    if opts.dry_run:
        sizes = sizes[:2]
    results: dict = {"dry_run": opts.dry_run, "deadline_s": opts.deadline, "seconds": 0.0,
                     "machine": machine(), "steps": {}}
    steps = results["steps"]

    def save() -> None:
        results["seconds"] = round(time.monotonic() - START, 1)
        (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
        (out / "gpu_check.md").write_text(table(results) + "\n")

    def need(seconds: float) -> float:
        return DRY_NEED if opts.dry_run else seconds

    SAVE = save
    try:
        save()
        step(steps, "cuda tests", need(NEEDS["cuda tests"]), cuda_tests)
        det = work / "det"
        small = step(steps, "build determinism model", need(NEEDS["build determinism model"]),
                     build, DETERMINISM_SIZE, det / "model", opts.dry_run, True)
        step(steps, "determinism", need(NEEDS["determinism"]),
             *((determinism, small, det) if small is not None
               else (needs_ok("build determinism model"),)))
        shutil.rmtree(det, ignore_errors=True)  # its run files hold checkpoints: disk
        for size in sizes:
            plan_of = SIZE_STEPS.get(size, SIZE_STEPS_DEFAULT)
            runs = plan_of["bench"]
            # build only if its first bench can follow
            model = step(steps, f"build {size}", need(plan_of["build"] + runs[0][2]), build,
                         size, work / "models" / size, opts.dry_run)
            reports = []
            for modes, repeat, seconds in runs:
                name = f"bench {size}" if len(runs) == 1 else f"bench {size} {modes}"
                reports.append(step(steps, name, need(seconds),
                                    *((bench, model, work, size, modes, repeat, opts.dry_run)
                                      if model is not None else (needs_ok(f"build {size}"),))))
            merged = merge([r for r in reports if r is not None])
            step(steps, f"plan {size}", need(NEEDS["plan"]),
                 *((plan_against_peaks, model, merged) if merged is not None
                   else (needs_ok(f"a bench of {size}"),)))
            shutil.rmtree(work / "models" / size, ignore_errors=True)
    except (Interrupted, KeyboardInterrupt) as exc:
        results["interrupted"] = str(exc) or type(exc).__name__
        save()
        shutil.rmtree(work, ignore_errors=True)
        print(f"gpu_check: interrupted ({results['interrupted']}); results so far in "
              f"{out / 'gpu_check.json'}", file=sys.stderr)
        return 130
    save()
    print(table(results))
    shutil.rmtree(work, ignore_errors=True)
    det = steps.get("determinism", {})
    must = [steps.get("cuda tests", {}).get("ok", False), det.get("ok", False)]
    if det.get("ok"):
        # micro_batch_1_equals is recorded, not required: on a GPU, other batch shapes
        # may take other kernels
        must += [d["rewards_vary"] and d["one_rank_resumed_equals_two_ranks"]
                 and d["master_host_equals"] for d in det["result"].values()]
    missing = [n for n in ("cuda tests", "determinism")
               if steps.get(n, {}).get("status") in ("skipped", "timed out")]
    verdict = "passed" if all(must) else (
        f"INCOMPLETE ({', '.join(missing)} did not finish)" if missing else "FAILED")
    print(f"gpu_check: {verdict} in {results['seconds']} s (deadline {opts.deadline:g} s)")
    return 0 if all(must) else 1


if __name__ == "__main__":
    sys.exit(main())
