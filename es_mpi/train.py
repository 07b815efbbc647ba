"""The generation loop, and rebuilding weights from a run file (resume, export).

One generation t, on every rank (DESIGN.md section 1):
    seeds_n, signs_n = member_seeds(seed, t)            derived, never random state
    rewards of my members = task(model(theta + sigma * sign * eps))    full mode
    rows = allgather(member, seed, reward, ...)         the only collective
    z_n = shape(rewards_n)
    theta += lr/N * sum_i z_i sign_i eps_i              same on every rank, member order
Rank 0 then appends the generation to the run file and commits it.
"""

from __future__ import annotations

import hashlib
import json
import signal
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from es_mpi import model as hf
from es_mpi import runfile
from es_mpi.config import Config
from es_mpi.dist import Dist, select_devices
from es_mpi.errors import EsError
from es_mpi.es import Replica, checksum
from es_mpi.evaluate import EvalResult, eval_examples, evaluate
from es_mpi.noise import derive_seed, member_seeds
from es_mpi.rewards import score
from es_mpi.shaping import shape
from es_mpi.stop import StopFlag, Stopped
from tasks import Task, get_task

ROW_DTYPE = np.dtype([("member", "i8"), ("seed", "i8"), ("reward", "f8"), ("tokens", "i8"),
                      ("seconds", "f8"), ("rank", "i4"), ("status", "i4")])
OK, REWARD_ERROR, SKIPPED = 0, 1, 2  # row status: SKIPPED = not evaluated (stop requested)


def members_of(rank: int, world: int, population: int) -> list[int]:
    """Round-robin dealing: member i is evaluated by rank i % world."""
    return list(range(rank, population, world))


def prompt_ids_for(cfg: Config, generation: int, n_train: int) -> np.ndarray:
    """The training examples of a generation: all, or a seeded sample of batch_size."""
    if cfg.batch_size == 0:
        return np.arange(n_train, dtype=np.int64)
    rng = np.random.default_rng(derive_seed(cfg.seed, generation, "prompts"))
    return np.sort(rng.choice(n_train, size=cfg.batch_size, replace=False)).astype(np.int64)


@dataclass
class Session:
    """Everything one rank holds during a run."""

    cfg: Config
    dist: Dist
    task: Task
    train: list
    model: torch.nn.Module
    tokenizer: object
    replica: Replica
    device: torch.device
    fingerprint: str
    base: dict[str, torch.Tensor] | None = None   # theta_0 (rank 0: checkpoints; decay_to=init)
    seconds: list[float] = field(default_factory=list)
    error: str | None = None   # this rank's reward failure in the current generation
    stop: StopFlag = field(default_factory=StopFlag)

    @property
    def anchor(self):
        return self.base if self.cfg.decay_to == "init" else None


def check_task(cfg: Config) -> tuple[Task, list]:
    task = get_task(cfg.task, data=cfg.task_data or None, reward=cfg.reward or None)
    train = task.train_examples()
    if not train:
        raise EsError(f"task {cfg.task} has no training examples")
    if cfg.eval_every and not task.eval_examples():
        raise EsError(f"--eval-every {cfg.eval_every}: task {cfg.task} has no held-out examples")
    if cfg.batch_size > len(train):
        raise EsError(f"batch_size {cfg.batch_size} exceeds the {len(train)} training examples "
                      f"of task {cfg.task}; use at most {len(train)} (0 = all)")
    return task, train


def examples_fingerprint(examples: list) -> str:
    """Hex digest of the training examples, so a resumed run scores the same prompts."""
    text = json.dumps(examples, sort_keys=True, default=str).encode()
    return hashlib.blake2b(text, digest_size=8).hexdigest()


def n_prompts(cfg: Config, train: list) -> int:
    return cfg.batch_size or len(train)


def open_session(cfg: Config, dist: Dist, task: Task, train: list) -> Session:
    """Load the model on this rank's device(s) and build the fp32 master (heavy).

    `task, train` come from check_task, run before as a cheap pre-check.
    """
    devices = select_devices(dist, cfg.gpus_per_rank)
    model, tokenizer = hf.load_model(cfg.model, cfg.dtype, devices)
    params = hf.trainable_parameters(model)
    fingerprint = f"{checksum(params):016x}"
    base = None
    if dist.is_root or cfg.decay_to == "init":
        keep_on = "cpu" if cfg.decay_to == "zero" else None
        base = {n: p.detach().to(keep_on or p.device, copy=True) for n, p in params.items()}
    return Session(cfg=cfg, dist=dist, task=task, train=train, model=model,
                   tokenizer=tokenizer, replica=Replica(params), device=devices[0],
                   fingerprint=fingerprint, base=base)


# -- one generation --------------------------------------------------------------------

def evaluate_members(s: Session, members: list[int], seeds_n: np.ndarray, signs_n: np.ndarray,
                     examples: list, batch: dict) -> np.ndarray:
    """Full mode: perturb in place, generate greedily for the batch, score, restore."""
    rows = np.zeros(len(members), dtype=ROW_DTYPE)
    rows["member"], rows["seed"], rows["rank"] = members, seeds_n[members], s.dist.rank
    for k, i in enumerate(members):
        if s.stop.requested:  # abandon the generation: every rank sees SKIPPED rows
            rows["status"][k:] = SKIPPED
            return rows
        t0 = time.perf_counter()
        s.replica.perturb(int(seeds_n[i]), int(signs_n[i]), s.cfg.sigma)
        try:
            texts, tokens = hf.generate(s.model, s.tokenizer, batch, s.cfg.max_new_tokens)
        finally:
            s.replica.restore()
        rewards, s.error = score(s.task, texts, examples, s.cfg.reward_timeout,
                                 f"member {i}, rank {s.dist.rank}")
        if s.error:
            rows[k]["status"] = REWARD_ERROR
            return rows
        rows[k]["reward"] = float(np.mean(rewards))
        rows[k]["tokens"] = sum(tokens)
        rows[k]["seconds"] = time.perf_counter() - t0
    return rows


def run_generation(s: Session, t: int) -> tuple[dict, int]:
    """Evaluate, gather, shape and update: (the generation's run-file row, stop signal).

    Raises Stopped (on every rank) if the generation was abandoned for a stop signal.
    """
    cfg, dist = s.cfg, s.dist
    n = cfg.population
    t_start = time.perf_counter()
    seeds_n, signs_n = member_seeds(cfg.seed, t, n, cfg.antithetic)
    prompt_ids = prompt_ids_for(cfg, t, len(s.train))
    examples = [s.train[j] for j in prompt_ids]
    batch = hf.encode_prompts(s.tokenizer, [s.task.prompt(e, s.tokenizer) for e in examples],
                              s.device, s.task.templated(s.tokenizer))

    s.error = None
    mine = members_of(dist.rank, dist.size, n)
    local = evaluate_members(s, mine, seeds_n, signs_n, examples, batch)
    t_eval = time.perf_counter()

    counts = [len(members_of(r, dist.size, n)) for r in range(dist.size)]
    rows = dist.allgather_rows(local, counts)
    rows = rows[np.argsort(rows["member"], kind="stable")]
    if (rows["status"] == REWARD_ERROR).any():
        dist.agree(s.error)  # every rank raises the failing rank's message
    if (rows["status"] == SKIPPED).any():
        raise Stopped(_agreed_signal(dist, s.stop.signum), t)
    if not np.array_equal(rows["member"], np.arange(n)) or not np.array_equal(rows["seed"],
                                                                                seeds_n):
        raise RuntimeError(f"generation {t}: gathered rows do not match the member seeds")
    t_gather = time.perf_counter()

    rewards_n = rows["reward"].astype(np.float64)
    z_n = shape(rewards_n, cfg.shaping)
    s.replica.update(seeds_n, signs_n, z_n, cfg.lr, cfg.weight_decay, s.anchor)
    t_update = time.perf_counter()

    # the second collective: weight checksums when due, and any rank's stop signal
    check_due = (t + 1) % cfg.checksum_every == 0
    check = 0
    if dist.is_root or check_due:
        check = s.replica.checksum()
    status = dist.allgather((check if check_due else 0, s.stop.signum))
    stop = next((sig for _, sig in status if sig), 0)
    if check_due:
        bad = [r for r, (c, _) in enumerate(status) if c != status[0][0]]
        if bad:
            raise EsError(f"replicas diverged after generation {t}: weight checksum of rank(s) "
                          f"{', '.join(map(str, bad))} differs from rank 0; stop and resume "
                          "from the run file (hardware fault or nondeterministic kernel?)")
    t_check = time.perf_counter()

    return {
        "seeds": seeds_n, "signs": signs_n, "rewards": rewards_n, "tokens": rows["tokens"],
        "eval_seconds": rows["seconds"], "eval_rank": rows["rank"], "prompt_ids": prompt_ids,
        "reward_mean": rewards_n.mean(), "reward_std": rewards_n.std(),
        "reward_min": rewards_n.min(), "reward_max": rewards_n.max(), "checksum": check,
        "world_size": dist.size, "time_eval": t_eval - t_start, "time_gather": t_gather - t_eval,
        "time_update": t_update - t_gather, "time_checksum": t_check - t_update,
        "time_io": 0.0, "time_total": 0.0, "timestamp": 0.0,
    }, stop


def _agreed_signal(dist: Dist, signum: int) -> int:
    """The stop signal some rank got (collective; every rank calls it together)."""
    return next((sig for sig in dist.allgather(signum) if sig), signal.SIGTERM)


def write_generation(s: Session, writer: runfile.RunWriter, t: int, row: dict,
                     t_start: float) -> None:
    """Rank 0: append the row, checkpoint if due, then commit (the generation now counts)."""
    t_io = time.perf_counter()
    row["timestamp"] = time.time()
    writer.append_generation(t, row)
    done = t + 1
    if done % s.cfg.checkpoint_every == 0 or done == s.cfg.generations:
        write_checkpoint(s, writer, done, int(row["checksum"]))
    row["time_io"] = time.perf_counter() - t_io
    row["time_total"] = time.perf_counter() - t_start
    writer.set_field(t, "time_io", row["time_io"])
    writer.set_field(t, "time_total", row["time_total"])
    writer.commit(t)


def write_checkpoint(s: Session, writer: runfile.RunWriter, generation: int, check: int) -> None:
    params = s.replica.master
    writer.write_checkpoint(generation, check,
                            ((n, params[n], s.base[n]) for n in params), s.cfg.keep_checkpoints)


def format_seconds(sec: float) -> str:
    sec = round(sec)
    if sec < 60:
        return f"{sec}s"
    if sec < 3600:
        return f"{sec // 60}m{sec % 60:02d}s"
    return f"{sec // 3600}h{sec % 3600 // 60:02d}m"


def progress_line(s: Session, t: int, row: dict) -> str:
    s.seconds.append(row["time_total"])
    left = s.cfg.generations - (t + 1)
    eta = format_seconds(left * float(np.mean(s.seconds[-10:])))
    width = len(str(s.cfg.generations))
    return (f"gen {t + 1:>{width}}/{s.cfg.generations}  reward mean {row['reward_mean']:.4g} "
            f"min {row['reward_min']:.4g} max {row['reward_max']:.4g}  "
            f"{row['time_total']:.1f}s  ETA {eta}")


def held_out(s: Session, writer: runfile.RunWriter | None, generation: int) -> EvalResult:
    """Evaluate the current weights on the held-out split; rank 0 records it (uncommitted)."""
    result = evaluate(s, eval_examples(s.task, s.cfg.eval_limit), s.cfg.eval_batch_size)
    if writer is not None:
        writer.append_eval({"generation": generation, "mean_reward": result.mean_reward,
                            "accuracy": result.accuracy, "n_examples": result.n,
                            "seconds": result.seconds})
    return result


def train_loop(s: Session, writer: runfile.RunWriter | None, start: int, fresh: bool) -> None:
    """Generations start..G-1. On a stop signal: checkpoint, then Stopped on every rank.

    `fresh`: a new run, whose base model is scored on the held-out split first.
    """
    try:
        _generations(s, writer, start, fresh)
    except Stopped as stopped:
        if writer is not None and stopped.complete > 0:
            if stopped.complete not in runfile.checkpoint_list(writer.f):
                write_checkpoint(s, writer, stopped.complete, s.replica.checksum())
            writer.f.flush()
        raise


def _generations(s: Session, writer: runfile.RunWriter | None, start: int,
                 fresh: bool) -> None:
    every = s.cfg.eval_every
    if every and fresh:
        result = held_out(s, writer, 0)
        if writer is not None:
            writer.f.flush()
        s.dist.print0(f"gen 0: held-out {result.summary()}")
    for t in range(start, s.cfg.generations):
        t_start = time.perf_counter()
        row, stop = run_generation(s, t)
        done = t + 1
        result = None
        if not stop and every and (done % every == 0 or done == s.cfg.generations):
            result = held_out(s, writer, done)
        if s.dist.is_root:
            write_generation(s, writer, t, row, t_start)
            line = progress_line(s, t, row)
            if result is not None:
                line += f"  | held-out {result.summary()}"
            s.dist.print0(line)
        if stop:
            raise Stopped(stop, done)


# -- rebuilding weights from a run file --------------------------------------------------

def rebuild(s: Session, path: str, info: runfile.RunInfo, upto: int) -> None:
    """Set the replica to theta_upto: latest checkpoint <= upto, then replay the rest.

    Replay reuses the logged seeds and rewards (no evaluation) and the same update code,
    so the weights are bit-identical to the run that wrote the file.
    """
    if s.fingerprint != info.model_fingerprint:
        raise EsError(f"model {s.cfg.model} (weights fingerprint {s.fingerprint}) is not the "
                      f"base model of run file {path} ({info.model_path}, fingerprint "
                      f"{info.model_fingerprint}); pass the original model directory with --model")
    if info.task_fingerprint and info.task_fingerprint != examples_fingerprint(s.train):
        raise EsError(f"task {s.cfg.task}: the training examples differ from those run file "
                      f"{path} was made with (task data or task code changed?); use the "
                      "original examples")
    usable = [c for c in info.checkpoints if c <= upto]
    start = 0
    if usable:
        start = usable[-1]
        master = s.replica.master  # holds theta_0 here; becomes theta_start in place
        runfile.apply_checkpoint_(path, start, master)
        s.replica.restore()
        want = runfile.checkpoint_checksum(path, start)
        if s.replica.checksum() != want:
            raise EsError(f"run file {path}: checkpoint {start} does not reproduce its "
                          "recorded checksum; the file is damaged")
    rows = runfile.read_generations(path, start, upto, ("seeds", "signs", "rewards", "checksum"))
    for k in range(upto - start):
        z_n = shape(rows["rewards"][k], s.cfg.shaping)
        s.replica.update(rows["seeds"][k], rows["signs"][k], z_n, s.cfg.lr,
                         s.cfg.weight_decay, s.anchor)
    if upto > start and s.replica.checksum() != int(rows["checksum"][-1]):
        raise EsError(f"run file {path}: replaying generations {start}..{upto - 1} does not "
                      f"reproduce the recorded weights checksum of generation {upto - 1}; "
                      "different hardware or library versions than the original run?")
