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
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from es_mpi import hardware, lowrank, memory, progress, runfile
from es_mpi import model as hf
from es_mpi.basefile import BaseWeights
from es_mpi.config import Config
from es_mpi.dist import Dist, select_devices
from es_mpi.errors import EsError
from es_mpi.es import FullNoise, LowRankNoise, Replica, checksum, host_copy
from es_mpi.evaluate import EvalResult, eval_examples, evaluate
from es_mpi.noise import derive_seed, member_seeds
from es_mpi.rewards import score
from es_mpi.shaping import shape
from es_mpi.stop import StopFlag, Stopped
from tasks import Task, get_task

ROW_DTYPE = np.dtype([("member", "i8"), ("seed", "i8"), ("reward", "f8"), ("tokens", "i8"),
                      ("seconds", "f8"), ("rank", "i4"), ("status", "i4")])
OK, REWARD_ERROR, SKIPPED = 0, 1, 2  # row status: SKIPPED = not evaluated (stop requested)


def member_groups(cfg: Config) -> list[list[int]]:
    """The population cut into fixed groups, the unit dealt to ranks.

    lowrank: `member_batch` members share one batched generate. full: antithetic pairs
    stay together (the mirror costs no noise), else single members. The groups do not
    depend on the number of ranks, so neither do the batches nor the rewards.
    """
    pair = 2 if cfg.antithetic else 1
    size = cfg.member_batch if cfg.mode == "lowrank" else pair
    n = cfg.population
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def groups_of(rank: int, world: int, groups: list[list[int]]) -> list[list[int]]:
    """Round-robin dealing: group g is evaluated by rank g % world."""
    return groups[rank::world]


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
    devices: list[torch.device]
    fingerprint: str
    machine: dict = field(default_factory=dict)  # es_mpi.hardware.describe of this rank
    matrices: dict | None = None   # lowrank: parameter name -> modules to hook
    base: Mapping[str, torch.Tensor] | None = None  # theta_0 (rank 0: checkpoints; decay_to=init)
    phase: dict[str, float] = field(default_factory=dict)  # this generation's split of eval
    peaks: dict[str, int] = field(default_factory=dict)    # this generation's peak memory
    ignore_eos: bool = False   # benchmarks: every member generates max_new_tokens
    error: str | None = None   # this rank's reward failure in the current generation
    stop: StopFlag = field(default_factory=StopFlag)

    @property
    def anchor(self):
        return self.base if self.cfg.decay_to == "init" else None

    @property
    def device(self) -> torch.device:
        """Where the batch goes: the replica's first device."""
        return self.devices[0]

    def sync(self) -> None:
        memory.sync(self.devices)

    def generate(self, batch: dict, select=None) -> tuple[list[str], list[int]]:
        """Greedy completions of the batch's rows, in micro-batches of generate_batch."""
        return hf.generate_rows(self.model, self.tokenizer, batch, self.cfg.max_new_tokens,
                                self.cfg.generate_batch, self.ignore_eos, select)


def check_task(cfg: Config) -> tuple[Task, list]:
    task = get_task(cfg.task, data=cfg.task_data or None, reward=cfg.reward or None)
    task.prompt_format = cfg.prompt_format
    train = task.train_examples()
    if not train:
        raise EsError(f"task {cfg.task} has no training examples")
    if cfg.train_limit:
        if cfg.train_limit > len(train):
            raise EsError(f"train_limit {cfg.train_limit} exceeds the {len(train)} training "
                          f"examples of task {cfg.task}; use at most {len(train)} (0 = all)")
        train = train[:cfg.train_limit]
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


def open_session(cfg: Config, dist: Dist, task: Task, train: list,
                 dtype: str | None = None) -> Session:
    """Load the model on this rank's device(s) and build the fp32 master (heavy).

    `task, train` come from check_task, run before as a cheap pre-check. `dtype`: the
    replica dtype a run file recorded, which cfg.dtype "auto" would resolve otherwise
    on this machine (a bf16 GPU run exported on a CPU node stays bf16).
    """
    devices = select_devices(dist, cfg.gpus_per_rank)
    cfg_dtype = dtype if cfg.dtype == "auto" and dtype else cfg.dtype
    model, tokenizer = hf.load_model(cfg.model, cfg_dtype, devices)
    host = cfg.master == "host"
    params = hf.trainable_parameters(model)
    fingerprint = f"{checksum(params):016x}"
    matrices = None
    if cfg.mode == "lowrank":
        matrices = lowrank.perturbed_matrices(model)
        if not matrices:
            raise EsError(f"model {cfg.model} has no Linear, Conv1D or Embedding weights for "
                          "lowrank mode; use --mode full")
        params = {n: params[n] for n in matrices}
        replica = Replica(params, LowRankNoise(cfg.rank), share_master=True,
                          master_on_host=host)
    else:
        replica = Replica(params, FullNoise(), master_on_host=host)
    base = None
    if cfg.decay_to == "init":  # the decay anchor, needed by every rank every generation
        base = {n: host_copy(p.detach()) if host else p.detach().to(torch.float32, copy=True)
                for n, p in params.items()}
    elif dist.is_root:  # for checkpoint deltas: read from the model files when written
        base = BaseWeights(cfg.model, params)
    s = Session(cfg=cfg, dist=dist, task=task, train=train, model=model,
                tokenizer=tokenizer, replica=replica, devices=devices,
                fingerprint=fingerprint, matrices=matrices, base=base,
                machine=hardware.describe(devices, next(model.parameters()).dtype))
    return s


def group_rows(cfg: Config, train: list) -> int:
    """Rows of the largest generate a generation makes: a group's members x prompts."""
    members = max(map(len, member_groups(cfg))) if cfg.mode == "lowrank" else 1
    return members * n_prompts(cfg, train)


def rows_that_fit(s: Session) -> int:
    """This rank's answer for generate_batch 0 (auto): the rows of one generate call whose
    KV cache and activations fit in 90% of the free GPU memory (es_mpi.plan), or 0 (no
    limit) on the CPU."""
    cfg = s.cfg
    if s.device.type != "cuda":
        return 0
    from es_mpi import plan

    rows = max(group_rows(cfg, s.train), cfg.eval_batch_size)
    prompt_tokens = max(len(s.tokenizer(s.task.prompt(e, s.tokenizer))["input_ids"])
                        for e in s.train)
    s.sync()
    free = min(torch.cuda.mem_get_info(d)[0] for d in s.devices)
    fits = plan.rows_that_fit(s.model.config, next(s.model.parameters()).dtype,
                              prompt_tokens, cfg.max_new_tokens, int(free * 0.9))
    return min(rows, fits)


def decide_generate_batch(s: Session) -> None:
    """Collective, after every rank has its replica: settle generate_batch 0 (auto) to the
    smallest limit any rank needs, so that every rank cuts its batches alike."""
    if s.cfg.generate_batch:
        return
    limits = [int(v) for v in s.dist.allgather_ints([rows_that_fit(s)])[:, 0] if v > 0]
    s.cfg = s.cfg.replace(generate_batch=min(limits) if limits else 0)


# -- one generation --------------------------------------------------------------------

def evaluate_members(s: Session, groups: list[list[int]], seeds_n: np.ndarray,
                     signs_n: np.ndarray, examples: list, batch: dict) -> np.ndarray:
    """Score this rank's groups of members on the batch of prompts: rows in member order.

    Stops early (rows SKIPPED) when a stop is requested, and at a reward error.
    """
    members = [i for g in groups for i in g]
    rows = np.zeros(len(members), dtype=ROW_DTYPE)
    rows["member"], rows["seed"], rows["rank"] = members, seeds_n[members], s.dist.rank
    s.phase = {"perturb": 0.0, "generate": 0.0, "score": 0.0}
    evaluate_group = _evaluate_lowrank if s.cfg.mode == "lowrank" else _evaluate_full
    k = 0
    try:
        for group in groups:
            if s.stop.requested:  # abandon the generation: every rank sees SKIPPED rows
                rows["status"][k:] = SKIPPED
                return rows
            t0 = time.perf_counter()
            texts_m, tokens_m = evaluate_group(s, group, seeds_n, signs_n, batch)
            t1 = time.perf_counter()
            for i, texts, tokens in zip(group, texts_m, tokens_m, strict=True):
                rewards, s.error = score(s.task, texts, examples, s.cfg.reward_timeout,
                                         f"member {i}, rank {s.dist.rank}")
                if s.error:
                    rows[k]["status"] = REWARD_ERROR
                    return rows
                rows[k]["reward"] = float(np.mean(rewards))
                rows[k]["tokens"] = sum(tokens)
                k += 1
            t2 = time.perf_counter()
            rows["seconds"][k - len(group):k] = (t2 - t0) / len(group)
            s.phase["score"] += t2 - t1
    finally:
        s.replica.restore()
    return rows


def _evaluate_full(s: Session, group: list[int], seeds_n, signs_n, batch):
    """Full mode: per member, write theta + sigma * sign * eps into the weights, generate."""
    texts_m, tokens_m = [], []
    for i in group:
        t0 = time.perf_counter()
        s.replica.perturb(int(seeds_n[i]), int(signs_n[i]), s.cfg.sigma)
        s.sync()
        t1 = time.perf_counter()
        texts, tokens = s.generate(batch)
        s.phase["perturb"] += t1 - t0
        s.phase["generate"] += time.perf_counter() - t1
        texts_m.append(texts)
        tokens_m.append(tokens)
    return texts_m, tokens_m


def _evaluate_lowrank(s: Session, group: list[int], seeds_n, signs_n, batch):
    """Lowrank mode: the group's members x prompts in one generate on unmodified weights."""
    m = len(group)
    p = batch["input_ids"].shape[0]
    big = {k: v.repeat(m, 1) for k, v in batch.items()}  # member-major rows
    t0 = time.perf_counter()
    with lowrank.population(s.matrices, s.replica.master, s.replica.noise,
                            [int(seeds_n[i]) for i in group], [int(signs_n[i]) for i in group],
                            s.cfg.sigma, rows=m * p) as rows:
        s.sync()
        t1 = time.perf_counter()
        texts, tokens = s.generate(big, rows.select)
    s.phase["perturb"] += t1 - t0
    s.phase["generate"] += time.perf_counter() - t1
    return ([texts[k * p:(k + 1) * p] for k in range(m)],
            [tokens[k * p:(k + 1) * p] for k in range(m)])


def run_generation(s: Session, t: int) -> tuple[dict, int]:
    """Evaluate, gather, shape and update: (the generation's run-file row, stop signal).

    Raises Stopped (on every rank) if the generation was abandoned for a stop signal.
    """
    cfg, dist = s.cfg, s.dist
    n = cfg.population
    t_start = time.perf_counter()
    moved = dist.bytes_moved
    memory.reset_peak(s.devices)
    seeds_n, signs_n = member_seeds(cfg.seed, t, n, cfg.antithetic)
    prompt_ids = prompt_ids_for(cfg, t, len(s.train))
    examples = [s.train[j] for j in prompt_ids]
    batch = hf.encode_prompts(s.tokenizer, [s.task.prompt(e, s.tokenizer) for e in examples],
                              s.device, s.task.templated(s.tokenizer))

    s.error = None
    groups = member_groups(cfg)
    local = evaluate_members(s, groups_of(dist.rank, dist.size, groups), seeds_n, signs_n,
                             examples, batch)
    s.sync()
    t_eval = time.perf_counter()
    peak_eval = memory.peak_bytes(s.devices)
    memory.reset_peak(s.devices)

    counts = [sum(map(len, groups_of(r, dist.size, groups))) for r in range(dist.size)]
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
    s.sync()
    t_update = time.perf_counter()

    # the second collective: weight checksums when due, and any rank's stop signal
    check_due = (t + 1) % cfg.checksum_every == 0
    check = 0
    if dist.is_root or check_due:
        check = s.replica.checksum()
    peak_update = memory.peak_bytes(s.devices)
    status = dist.allgather_ints([check if check_due else 0, s.stop.signum, peak_eval,
                                  peak_update])
    stop = next((int(sig) for sig in status[:, 1] if sig), 0)
    if check_due:
        bad = [r for r, c in enumerate(status[:, 0]) if c != status[0, 0]]
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
        "world_size": dist.size, "time_eval": t_eval - t_start,
        "time_perturb": s.phase["perturb"], "time_generate": s.phase["generate"],
        "time_score": s.phase["score"], "time_gather": t_gather - t_eval,
        "time_update": t_update - t_gather, "time_checksum": t_check - t_update,
        "time_io": 0.0, "time_total": 0.0, "timestamp": 0.0,
        "comm_bytes": dist.bytes_moved - moved,
        "peak_mem_eval": int(status[:, 2].max()), "peak_mem_update": int(status[:, 3].max()),
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
    writer.write_checkpoint(generation, check, s.replica.master, base_rows(s.base),
                            s.cfg.keep_checkpoints)


def base_rows(base: Mapping[str, torch.Tensor]):
    """rows(name, r0, r1) of theta_0, each tensor seen as (first axis, rest)."""
    if isinstance(base, BaseWeights):
        return base.rows

    def rows(name: str, r0: int, r1: int) -> torch.Tensor:
        return runfile.as_rows(base[name])[r0:r1].to("cpu", torch.float32)
    return rows


def held_out(s: Session, writer: runfile.RunWriter | None, generation: int) -> EvalResult:
    """Evaluate the current weights on the held-out split; rank 0 records it (uncommitted)."""
    result = evaluate(s, eval_examples(s.task, s.cfg.eval_limit), s.cfg.eval_batch_size)
    if writer is not None:
        writer.append_eval({"generation": generation, "mean_reward": result.mean_reward,
                            "accuracy": result.accuracy, "n_examples": result.n,
                            "seconds": result.seconds}, result.completions)
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
    show = progress.current(s.dist.is_root)  # rank 0's lines (--quiet/--verbose)
    if every and fresh:
        result = held_out(s, writer, 0)
        if writer is not None:
            writer.f.flush()
        show.info(f"gen 0: held-out {result.summary()}")
    for t in range(start, s.cfg.generations):
        t_start = time.perf_counter()
        with show.running(t, s.cfg.generations):  # a live status line on a terminal
            row, stop = run_generation(s, t)
            done = t + 1
            result = None
            if not stop and every and (done % every == 0 or done == s.cfg.generations):
                result = held_out(s, writer, done)
            if s.dist.is_root:
                write_generation(s, writer, t, row, t_start)
        if s.dist.is_root:
            show.generation(t, s.cfg.generations, row,
                            None if result is None else result.summary())
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
    then = info.machine
    other = not hardware.same_arithmetic(then, s.machine)
    rows = runfile.read_generations(path, start, upto, ("seeds", "signs", "rewards", "checksum"))
    for k in range(upto - start):
        z_n = shape(rows["rewards"][k], s.cfg.shaping)
        s.replica.update(rows["seeds"][k], rows["signs"][k], z_n, s.cfg.lr,
                         s.cfg.weight_decay, s.anchor)
    if upto > start and s.replica.checksum() != int(rows["checksum"][-1]):
        if other:
            raise EsError(
                f"run file {path}: generations {start}..{upto - 1} were computed on "
                f"{hardware.label(then)}, and replaying them here on "
                f"{hardware.label(s.machine)} gives other weights (noise and kernels "
                f"differ between machines); replay on the original kind of machine, or "
                f"use a checkpoint ({', '.join(map(str, info.checkpoints)) or 'none yet'}), "
                "which any machine restores exactly")
        raise EsError(f"run file {path}: replaying generations {start}..{upto - 1} does not "
                      f"reproduce the recorded weights checksum of generation {upto - 1}; "
                      "different library versions than the original run, or a damaged file?")
