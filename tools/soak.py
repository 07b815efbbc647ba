"""Soak test: a long CPU run stopped and resumed again and again, against one never stopped.

    python tools/soak.py [--generations 200] [--every 25] [--model DIR] [--workdir DIR]

Runs one ES config twice on a tiny model (or --model): once uninterrupted on 2 ranks, and
once in legs of about --every generations. The legs alternate the world size (2, 1, 2, ...;
1 rank runs without mpiexec) and, in turn, how they end:

    kill     SIGKILL of one rank at a random moment (up to --jitter s) after the leg's
             target is committed (a dead node: exit != 0); on 2 ranks rank 0, then rank 1
    signal   SIGUSR1, likewise (a Slurm warning: exit 75)
    target   the leg's --generations is reached (a clean end, exit 0; always the last leg)

and the next leg continues with `es-mpi resume`. At the end every logged row and the final
weights (the checkpoint delta, bit for bit) are compared with the uninterrupted run. Prints
the figures; exits 0 if identical, 1 otherwise. Needs mpiexec and es-mpi on PATH (or next
to this Python).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CONFIG = ["--population", "4", "--sigma", "0.05", "--lr", "0.05", "--max-new-tokens", "6",
          "--seed", "7", "--checkpoint-every", "10"]
ENDINGS = ("kill", "signal", "target")
END_WITHIN = 60.0  # seconds a leg may take to end after its signal or kill


def tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if not path:
        sys.exit(f"soak: {name} not found")
    return path


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def command(args: list, ranks: int) -> list[str]:
    cmd = [tool("es-mpi"), *map(str, args)]
    return [tool("mpiexec"), "-n", str(ranks), *cmd] if ranks > 1 else cmd


def complete(path: Path) -> int:
    try:
        with h5py.File(path, "r", locking=False) as f:
            return int(f.attrs["complete_generations"])
    except (OSError, KeyError):
        return 0


def rank_pids(launcher: int, ranks: int) -> dict[int, int]:
    """{rank: pid} of the MPI processes under `launcher` (PMI_RANK in their environment)."""
    if ranks == 1:
        return {0: launcher}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(stat.parent.name))
        found, todo = {}, [launcher]
        while todo:
            for pid in children.get(todo.pop(), []):
                todo.append(pid)
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                for item in environ:
                    if item.startswith(b"PMI_RANK="):
                        found[int(item[9:])] = pid
        if len(found) == ranks:
            return found
        time.sleep(0.1)
    raise RuntimeError("soak: cannot find the ranks' processes")


def leg(run: Path, first: list, ranks: int, ending: str, target: int, total: int,
        victim: int, delay: float, log: Path) -> dict:
    """One leg: start (train or resume), end it as `ending` once `target` is committed."""
    goal = target if ending == "target" else total
    args = [*first, "--generations", goal]
    t0 = time.monotonic()
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(command(args, ranks))}\n")
        out.flush()
        proc = subprocess.Popen(command(args, ranks), stdout=out, stderr=subprocess.STDOUT,
                                env=env(), start_new_session=True)
        end_seconds = None
        try:
            if ending != "target":
                while complete(run) < target and proc.poll() is None:
                    time.sleep(0.02)
                time.sleep(delay)  # anywhere in the next generation: evaluating or writing
                if proc.poll() is None:
                    pid = proc.pid if ending == "signal" else rank_pids(proc.pid, ranks)[victim]
                    os.kill(pid, signal.SIGUSR1 if ending == "signal" else signal.SIGKILL)
                    sent = time.monotonic()
                    proc.wait(timeout=END_WITHIN)
                    end_seconds = time.monotonic() - sent
                else:
                    ending = "target"  # it got there before the signal
            proc.wait(timeout=3600)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError(f"soak: a leg did not end within {END_WITHIN} s of its "
                               f"{ending}: a rank hangs (see {log})") from None
    expected = {"target": (0,), "signal": (75,)}.get(ending)
    if expected and proc.returncode not in expected:
        raise RuntimeError(f"soak: leg ended with status {proc.returncode} (see {log})")
    if ending == "kill" and proc.returncode == 0:
        raise RuntimeError(f"soak: a killed leg exited 0 (see {log})")
    return {"ranks": ranks, "ending": ending, "victim": victim if ending == "kill" else None,
            "status": proc.returncode, "done": complete(run), "seconds": time.monotonic() - t0,
            "end_seconds": end_seconds}


def compare(run: Path, reference: Path, generations: int) -> list[str]:
    """What differs between two run files (empty: identical rows and final weights)."""
    problems = []
    with h5py.File(run, "r") as a, h5py.File(reference, "r") as b:
        for f in (a, b):
            if int(f.attrs["complete_generations"]) != generations:
                problems.append(f"{f.filename}: {f.attrs['complete_generations']} generations")
        for key in ("seeds", "signs", "rewards", "tokens", "prompt_ids", "checksum"):
            if not np.array_equal(a["generations"][key][:generations],
                                  b["generations"][key][:generations]):
                problems.append(f"rows differ: {key}")
        ca, cb = a[f"checkpoints/{generations:08d}"], b[f"checkpoints/{generations:08d}"]
        names = sorted(k for k in ca if isinstance(ca[k], h5py.Dataset))
        if names != sorted(k for k in cb if isinstance(cb[k], h5py.Dataset)):
            problems.append("the final checkpoints hold different tensors")
        else:
            problems += [f"final weights differ: {n}" for n in names
                         if not np.array_equal(ca[n][...], cb[n][...])]
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generations", type=int, default=200, help="total generations")
    parser.add_argument("--every", type=int, default=25, help="generations per leg")
    parser.add_argument("--model", help="model directory [default: a tiny random Llama]")
    parser.add_argument("--workdir", help="where the run files go [default: a temp dir]")
    parser.add_argument("--jitter", type=float, default=0.3,
                        help="kill or signal up to this many seconds after the leg's target")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random moments")
    opts = parser.parse_args()
    work = Path(opts.workdir or tempfile.mkdtemp(prefix="es-mpi-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    if opts.model:
        model = opts.model
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_model import make_tiny_model

        model = str(make_tiny_model(work / "tiny"))
    total, every = opts.generations, opts.every
    reference, run, log = work / "reference.h5", work / "soak.h5", work / "soak.log"
    for path in (reference, run):
        path.unlink(missing_ok=True)
    train = ["train", "--model", model, *CONFIG]

    t0 = time.monotonic()
    done_ref = subprocess.run(command([*train, "--run", reference, "--generations", total], 2),
                              capture_output=True, text=True, env=env())
    ref_seconds = time.monotonic() - t0
    if done_ref.returncode != 0:
        print(done_ref.stdout + done_ref.stderr)
        return 1

    legs = []
    rng = random.Random(opts.seed)
    t0 = time.monotonic()
    while complete(run) < total:
        k = len(legs)
        ranks = 2 if k % 2 == 0 else 1
        target = min(total, complete(run) + every)
        ending = ENDINGS[k % len(ENDINGS)] if target < total else "target"
        victim = (k // (2 * len(ENDINGS))) % ranks  # 2-rank kills: rank 0, then rank 1
        first = [*train, "--run", run] if k == 0 else ["resume", run]
        delay = rng.uniform(0, opts.jitter)
        legs.append(leg(run, first, ranks, ending, target, total, victim, delay, log))
        print(f"leg {k + 1}: {ranks} rank(s), ended by {legs[-1]['ending']}"
              f"{'' if legs[-1]['victim'] is None else f' of rank {victim}'}, status "
              f"{legs[-1]['status']}, {legs[-1]['done']} generations complete, "
              f"{legs[-1]['seconds']:.1f} s", flush=True)
    soak_seconds = time.monotonic() - t0

    problems = compare(run, reference, total)
    with h5py.File(run, "r") as f:
        world = sorted({int(w) for w in f["generations/world_size"][:total]})
        checksum = int(f["generations/checksum"][total - 1])
    ends = {e: sum(1 for x in legs if x["ending"] == e) for e in ENDINGS}
    kill_ends = [x["end_seconds"] for x in legs if x["ending"] == "kill"]
    stop_ends = [x["end_seconds"] for x in legs if x["ending"] == "signal"]
    print(f"soak: {total} generations (population 4, {'tiny model' if not opts.model else model})"
          f" in {len(legs)} legs: {ends['target']} by target, {ends['signal']} by SIGUSR1, "
          f"{ends['kill']} by SIGKILL of a rank; {len(legs) - 1} resumes; world sizes {world}")
    print(f"wall time: uninterrupted run {ref_seconds:.1f} s, soak {soak_seconds:.1f} s")
    if kill_ends:
        print(f"job ended {max(kill_ends):.1f} s at most after a SIGKILL")
    if stop_ends:
        print(f"job stopped {max(stop_ends):.1f} s at most after a SIGUSR1")
    print(f"run file {run.stat().st_size / 2**20:.2f} MiB; final weights checksum {checksum:016x}")
    print(f"identical to the uninterrupted run: {'no' if problems else 'yes'}")
    for problem in problems:
        print(f"  {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
