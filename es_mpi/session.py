"""A rank's session: the task, its prompts, and the replica loaded on this rank's devices.

`check_task` is the cheap check made before any model loads; `open_session` loads the
model and builds the fp32 master (heavy); `decide_batches` settles the automatic batch
sizes (member_batch, generate_batch) once every rank has its replica.
The generation loop itself is es_mpi.loop; rebuilding weights from a run file is
es_mpi.replay.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from es_mpi import devices as dev
from es_mpi import lowrank, memory, progress
from es_mpi import model as hf
from es_mpi.basefile import BaseWeights
from es_mpi.config import Config
from es_mpi.dist import Dist
from es_mpi.errors import EsError
from es_mpi.es import FullNoise, LowRankNoise, Replica, checksum, host_copy
from es_mpi.evaluators import member_groups
from es_mpi.noise import derive_seed
from es_mpi.stop import StopFlag
from tasks import Task, get_task


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
    machine: dict = field(default_factory=dict)  # es_mpi.devices.describe of this rank
    matrices: dict | None = None   # lowrank: parameter name -> modules to hook
    base: Mapping[str, torch.Tensor] | None = None  # theta_0 (rank 0: checkpoints; decay_to=init)
    ignore_eos: bool = False   # benchmarks: every member generates max_new_tokens
    stop: StopFlag = field(default_factory=StopFlag)
    kl_base: torch.nn.Module | None = None  # the base model for held-out KL (kl_base_model)

    @property
    def anchor(self):
        return self.base if self.cfg.decay_to == "init" else None

    @property
    def device(self) -> torch.device:
        """Where the batch goes: the replica's first device."""
        return self.devices[0]

    def sync(self) -> None:
        memory.sync(self.devices)

    def generate(self, batch: dict, select=None, unit: int = 1) -> tuple[list[str], list[int]]:
        """Greedy completions of the batch's rows, in micro-batches of generate_batch
        (blocks of `unit` rows kept whole where they fit)."""
        return hf.generate_rows(self.model, self.tokenizer, batch, self.cfg.max_new_tokens,
                                self.cfg.generate_batch, self.ignore_eos, select, unit)


def kl_base_model(s: Session, path: str | None = None) -> torch.nn.Module:
    """The base model (theta_0, from `path` or the run's model directory) that held-out
    KL is measured against, loaded on this rank's devices in the replica's dtype at first
    use and kept: one more copy of the model's weights per rank (not of the fp32 master).

    It cannot be cached as log-probabilities: the KL is taken along the current weights'
    own completions, which change as the weights do, so the base must score new tokens at
    every evaluation.
    """
    if s.kl_base is None:
        name = dev.dtype_name(next(s.model.parameters()).dtype)
        base = hf.load_model(path or s.cfg.model, name, s.devices)[0]
        vocab, base_vocab = (m.get_output_embeddings().weight.shape[0] for m in (s.model, base))
        if vocab != base_vocab:
            raise EsError(f"base model {path or s.cfg.model} has {base_vocab} output tokens and "
                          f"the evaluated model {vocab}: KL needs the same vocabulary")
        s.kl_base = base
    return s.kl_base


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
                 dtype: str | None = None, loaded: tuple | None = None) -> Session:
    """Load the model on this rank's device(s) and build the fp32 master (heavy).

    `task, train` come from check_task, run before as a cheap pre-check. `dtype`: the
    replica dtype a run file recorded, which cfg.dtype "auto" would resolve otherwise
    on this machine (a bf16 GPU run exported on a CPU node stays bf16). `loaded`: a
    (model, tokenizer) of cfg.model already loaded (the benchmark's modes share one).
    """
    devices = dev.bind(dist, cfg.gpus_per_rank, cfg.share_gpus)
    dev.pin_arithmetic()
    cfg_dtype = dtype if cfg.dtype == "auto" and dtype else cfg.dtype
    model, tokenizer = loaded or hf.load_model(cfg.model, cfg_dtype, devices)
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
    if host and devices[0].type == "cuda":
        _check_pinned_master(cfg, dist, params)
    if cfg.mode == "lowrank":
        replica = Replica(params, LowRankNoise(cfg.rank), share_master=True,
                          master_on_host=host)
    else:
        replica = Replica(params, FullNoise(), master_on_host=host, sigma=cfg.sigma,
                          credit=cfg.credit)
    base = None
    if cfg.decay_to == "init":  # the decay anchor, needed by every rank every generation
        base = {n: host_copy(p.detach()) if host else p.detach().to(torch.float32, copy=True)
                for n, p in params.items()}
    elif dist.is_root:  # for checkpoint deltas: read from the model files when written
        base = BaseWeights(cfg.model, params)
    s = Session(cfg=cfg, dist=dist, task=task, train=train, model=model,
                tokenizer=tokenizer, replica=replica, devices=devices,
                fingerprint=fingerprint, matrices=matrices, base=base,
                machine=dev.describe(devices, next(model.parameters()).dtype))
    return s


def _check_pinned_master(cfg: Config, dist: Dist, params: Mapping[str, torch.Tensor]) -> None:
    """--master host pins the fp32 master in host memory (page-locked: the OS can neither
    swap nor reclaim it): say how much, and refuse before pinning more than the node has."""
    per_rank = 4 * sum(p.numel() for p in params.values())  # the trained tensors, fp32
    if cfg.decay_to == "init":
        per_rank *= 2  # the decay anchor sits beside the master
    node = per_rank * dist.local_size
    available = memory.host_available_bytes()
    if node > 0.9 * available:
        raise EsError(f"--master host pins {per_rank / 2**30:.1f} GiB of host memory per rank, "
                      f"{node / 2**30:.1f} GiB for the {dist.local_size} rank(s) of this node, "
                      f"but {available / 2**30:.1f} GiB is available; run fewer ranks per "
                      "node, use --mode lowrank (its master is the matrices only) or "
                      "--master device")
    progress.current(dist.is_root).info(
        f"es-mpi: --master host: {per_rank / 2**30:.1f} GiB of pinned host memory per rank "
        f"({node / 2**30:.1f} GiB for this node's {dist.local_size} rank(s))")


def group_rows(cfg: Config, train: list) -> int:
    """Rows of the largest generate a generation makes: a group's members x prompts."""
    members = max(map(len, member_groups(cfg))) if cfg.mode == "lowrank" else 1
    return members * n_prompts(cfg, train)


def longest_prompt(s: Session) -> int:
    """Tokens of the longest prompt a generate call of the run may get: the training
    examples, and the held-out ones where the run evaluates them (often longer)."""
    examples = list(s.train)
    if s.cfg.eval_every:
        held = s.task.eval_examples()
        examples += held[:s.cfg.eval_limit] if s.cfg.eval_limit else held
    return max(len(s.tokenizer(s.task.prompt(e, s.tokenizer))["input_ids"])
               for e in examples)


def rows_that_fit(s: Session) -> int:
    """The rows of one generate call whose KV cache and activations fit in this rank's
    memory (es_mpi.sizing) as it is once everything resident has loaded (replica, master,
    the KL base model): es_mpi.devices.generation_budget."""
    from es_mpi import sizing

    s.sync()
    budget = dev.generation_budget(s.devices, s.dist.local_size)
    return sizing.rows_that_fit(s.model.config, next(s.model.parameters()).dtype,
                              longest_prompt(s), s.cfg.max_new_tokens, budget, s.device.type)


def decide_batches(s: Session) -> None:
    """Collective, after every rank has its replica: settle the automatic batch sizes from
    the smallest memory any rank has, so that every rank cuts its batches alike.

    member_batch 0 (lowrank): as many members as one generate call holds, all N where
    they fit, so that a rank evaluates its members in as few calls as memory allows.
    generate_batch 0: the rows of the largest call a generation makes, at most what fits.
    Both are recorded in the run file, and a resume keeps them.
    """
    cfg = s.cfg
    auto_members = cfg.mode == "lowrank" and cfg.member_batch == 0
    if not (auto_members or cfg.generate_batch == 0):
        return
    if cfg.eval_kl and cfg.eval_every:  # resident for the whole run: load it before sizing
        s.dist.collective(lambda: kl_base_model(s))
    fits = int(s.dist.allgather_ints([rows_that_fit(s)])[:, 0].min())
    if auto_members:
        from es_mpi.sizing import members_per_call

        cfg = cfg.replace(member_batch=members_per_call(
            cfg.generate_batch or fits, n_prompts(cfg, s.train), cfg.population))
    if cfg.generate_batch == 0:
        largest = max(group_rows(cfg, s.train), cfg.eval_batch_size)
        cfg = cfg.replace(generate_batch=min(largest, fits))
    s.cfg = cfg
