"""The one typed run configuration: defaults, TOML loading, validation.

A `Config` is validated once (in `__post_init__`), stored as JSON in the run file,
and overridden field by field from the command line. Fields marked `resumable` may
differ when a run is continued (they do not change the trajectory of the weights);
every other field must match the run file exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from es_mpi.errors import EsError

MAX_SEED = 2**63 - 1
MAX_COUNT = 2**31 - 1  # sizes and counts: beyond this an int is a typo, not a setting
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # replica dtypes (es_mpi.devices.DTYPES)


def _field(default, help: str, resumable: bool = False, **kw):
    return field(default=default, metadata={"help": help, "resumable": resumable, **kw})


@dataclass
class Config:
    model: str = _field("", "Hugging Face model directory (config.json + weights).",
                        resumable=True, required=True)
    task: str = _field("conciseness", "Reward task: a name (conciseness, ...), module:Class, "
                       "or jsonl:PATH with --reward.")
    task_data: str = _field("", "JSON/JSONL file of examples for the task (default: built-in).")
    reward: str = _field("", "module:function scoring a jsonl:PATH task: fn(completion, "
                         "example) -> float.")
    reward_timeout: float = _field(
        0.0, "Seconds one batch of rewards may take (0 = no limit); past it the run stops.",
        resumable=True)
    run: str = _field("run.h5", "HDF5 run file to create (or continue).", resumable=True)
    population: int = _field(8, "Population size N (perturbations per generation), >= 2.")
    sigma: float = _field(1e-3, "Noise scale: member i evaluates theta + sigma * eps_i.")
    lr: float = _field(5e-4, "Learning rate alpha in theta += alpha/N * sum_i z_i eps_i.")
    generations: int = _field(
        10, "Total number of generations the run should reach.", resumable=True
    )
    seed: int = _field(0, "Run seed; every member seed derives from (seed, generation, member).")
    mode: str = _field(
        "full", "Population evaluation: full (perturb every parameter in place, one generate "
        "per member) or lowrank (rank-r perturbations inside one batched generate). lowrank "
        "trains the weight matrices of Linear, Conv1D and Embedding layers (scaled "
        "embeddings included; tied weights once); norms and biases stay frozen, and a model "
        "with any other weight of 2+ dimensions is refused.", choices=("full", "lowrank"))
    rank: int = _field(1, "Rank r of each member's perturbation of a matrix (lowrank mode).")
    member_batch: int = _field(
        0, "Members evaluated together in one batched generate (lowrank mode); these fixed "
        "groups are dealt to ranks, so results do not depend on the number of ranks. 0 = "
        "auto: as many as one generate call holds in memory (all N where they fit), "
        "decided when the run starts and recorded. With several ranks, N / ranks spreads "
        "the groups over every rank.")
    antithetic: bool = _field(False, "Evaluate mirrored pairs (eps, -eps); needs an even N.")
    shaping: str = _field(
        "zscore", "Reward shaping over the population.", choices=("zscore", "rank")
    )
    weight_decay: float = _field(0.0, "Decay rate lambda: theta -= lr * lambda * (theta - anchor).")
    decay_to: str = _field(
        "zero", "Anchor of weight decay: zero or the initial weights.", choices=("zero", "init")
    )
    max_new_tokens: int = _field(64, "Tokens generated per prompt (greedy decoding).")
    batch_size: int = _field(
        0, "Training prompts scored per generation (0 = all of the task's training prompts)."
    )
    train_limit: int = _field(
        0, "Use only the task's first K training examples (0 = all); the paper's Countdown "
        "script trains on the first 200 of its data file.")
    prompt_format: str = _field(
        "auto", "How a prompt is given to the model: chat (through the tokenizer's chat "
        "template), raw (the prompt text as is, as the paper's scripts do), or auto (chat "
        "where the tokenizer has a template, else raw).", choices=("auto", "chat", "raw"))
    dtype: str = _field(
        "auto",
        "Replica dtype (auto: bfloat16 on CUDA, float32 on CPU). Updates are always fp32. "
        "float16 replicas are watched for overflow: a generate whose logits are not finite "
        "stops the run with one line.",
        choices=("auto", *DTYPE_NAMES),
    )
    credit: str = _field(
        "realized", "What the full-mode update credits a member with on a 16-bit replica: "
        "realized (the perturbation the replica really received, rounded(master + sigma * "
        "eps) - rounded(master): weights that did not move get no credit) or intended "
        "(sigma * eps, as the paper's scripts do). fp32 replicas and lowrank mode are "
        "unaffected.", choices=("realized", "intended"))
    eval_every: int = _field(
        0, "Score the held-out examples every K generations, at the start and the end "
        "(0 = never).", resumable=True)
    eval_limit: int = _field(0, "Held-out examples per evaluation (0 = all).", resumable=True)
    eval_batch_size: int = _field(16, "Prompts per generate call in held-out evaluation.",
                                  resumable=True)
    eval_kl: bool = _field(
        False, "Held-out evaluations also measure the per-token KL of the weights to the base "
        "model along their greedy completions (es_mpi.kl); this keeps a second copy of the "
        "model (its weights in the replica dtype) on every rank for the run, so it is off "
        "unless asked for (the demo presets ask).", resumable=True)
    tensorboard: str = _field(
        "", "Also write per-generation scalars and held-out evaluations as TensorBoard "
        "event files into this directory, step = generation (needs the tensorboard "
        "package; the run file stays the record).", resumable=True)
    checkpoint_every: int = _field(
        10, "Write a checkpoint delta every K generations (and at the end).", resumable=True
    )
    keep_checkpoints: int = _field(2, "Checkpoints kept in the run file (oldest dropped).",
                                   resumable=True)
    checksum_every: int = _field(
        1, "Compare weight checksums across ranks every K generations.", resumable=True
    )
    gpus_per_rank: int = _field(1, "GPUs per rank; a replica is split across them.",
                                resumable=True)
    share_gpus: bool = _field(
        False, "Let several ranks compute on one GPU. Off, es-mpi refuses a job whose "
        "launcher put two ranks on one GPU (checked by GPU UUID at start-up); on, ranks "
        "beyond a node's GPUs wrap around onto them (tests, small models).", resumable=True)
    generate_batch: int = _field(
        0, "Rows (members x prompts) per generate call, in training and held-out "
        "evaluation: larger batches are cut into micro-batches of at most this many rows, "
        "which bounds the KV cache. 0 = auto: as many as fit in the device's free memory "
        "(on the CPU, 80% of the available host memory shared by the node's ranks), "
        "decided once when the run starts and recorded in the run file. Results do not "
        "depend on it on the CPU; on a GPU, kernels may round differently for another "
        "batch shape.", resumable=True)
    master: str = _field(
        "device", "Where the fp32 master copy of the weights lives: device (with the "
        "replica) or host (CPU memory, for models whose master does not fit on the GPU; "
        "the arithmetic still runs on the device, so results are identical).",
        choices=("device", "host"), resumable=True)

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> EsError:
            return EsError(f"config: {name} = {getattr(self, name)!r}: {why}")

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("int",) and (isinstance(value, bool) or not isinstance(value, int)):
                raise bad(f.name, "expected an integer")
            if f.type == "int" and f.name != "seed" and value > MAX_COUNT:
                raise bad(f.name, f"must be at most {MAX_COUNT}")
            if f.type == "float":
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise bad(f.name, "expected a number")
                setattr(self, f.name, float(value))
                if not math.isfinite(float(value)):
                    raise bad(f.name, "must be finite")
            if f.type == "bool" and not isinstance(value, bool):
                raise bad(f.name, "expected true or false")
            if f.type == "str" and not isinstance(value, str):
                raise bad(f.name, "expected a string")
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise bad(f.name, f"choose one of {', '.join(choices)}")
        if self.population < 2:
            raise bad("population", "need at least 2 members")
        if self.antithetic and self.population % 2:
            raise bad("population", "antithetic pairs need an even population (try "
                      f"{self.population + 1})")
        if not 0 < self.sigma <= 1:
            raise bad("sigma", "must be in (0, 1]; the paper uses ~1e-3")
        if not 0 < self.lr <= 10:
            raise bad("lr", "must be in (0, 10]; the paper uses ~5e-4")
        if self.weight_decay < 0 or self.lr * self.weight_decay >= 1:
            raise bad("weight_decay", "need 0 <= weight_decay and lr * weight_decay < 1")
        if self.generations < 1:
            raise bad("generations", "must be >= 1")
        if not 0 <= self.seed <= MAX_SEED:
            raise bad("seed", f"must be in [0, {MAX_SEED}]")
        for name in ("rank", "max_new_tokens", "checkpoint_every",
                     "keep_checkpoints", "checksum_every", "gpus_per_rank"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        if not 0 <= self.reward_timeout <= 1e6:
            raise bad("reward_timeout", "must be in [0, 1e6] seconds (0 = no limit)")
        if self.eval_every < 0 or self.eval_limit < 0:
            raise bad("eval_every" if self.eval_every < 0 else "eval_limit", "must be >= 0")
        if self.eval_batch_size < 1:
            raise bad("eval_batch_size", "must be >= 1")
        if self.member_batch < 0:
            raise bad("member_batch", "must be >= 0 (0 = auto, as many as memory allows)")
        if self.generate_batch < 0:
            raise bad("generate_batch", "must be >= 0 (0 = auto, from free device memory)")
        if self.batch_size < 0:
            raise bad("batch_size", "must be >= 0 (0 = all training prompts)")
        if self.train_limit < 0:
            raise bad("train_limit", "must be >= 0 (0 = all training examples)")
        if not self.task:
            raise bad("task", "must name a task")

    # -- (de)serialization ------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        normalized = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise EsError(f"{source}: unknown key {key!r}; valid keys: "
                              f"{', '.join(sorted(known))}")
            normalized[name] = value
        return cls(**normalized)

    @classmethod
    def from_json(cls, text: str) -> Config:
        values = json.loads(text)
        # run files from before `credit` existed credited the intended noise
        values.setdefault("credit", "intended")
        return cls.from_dict(values, source="run file config")

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def trajectory_differences(self, other: Config) -> list[str]:
        """Fields that differ and would change the weights' trajectory."""
        return [
            f.name for f in dataclasses.fields(self)
            if not f.metadata["resumable"] and getattr(self, f.name) != getattr(other, f.name)
        ]


# Config's fields by name: the one source of every command's settings flags (es_mpi.cli's
# config_options builds them from here) and of es-mpi plan's Settings
FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Config)}


def field_help(name: str) -> str:
    return FIELDS[name].metadata["help"]


def field_choices(name: str) -> tuple[str, ...] | None:
    return FIELDS[name].metadata.get("choices")


def field_default(name: str) -> Any:
    return FIELDS[name].default


def check_settings(values: dict[str, Any]) -> Config:
    """Validate some of Config's fields by Config's own rules (`__post_init__`), every
    other field at its default, and return that Config.

    The one check behind the settings of every command (train, resume, eval, bench) and
    behind es-mpi plan's Settings: a bad value gives the same EsError ("config: sigma =
    2.0: must be in (0, 1]; ...") whichever command it came through."""
    return Config.from_dict(dict(values))


PATH_KEYS = ("model", "task_data", "run", "tensorboard")  # settings that name a file or dir


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file; keys are Config field names (dashes allowed). A relative
    path in it (PATH_KEYS) is relative to the file's own directory, so a config means
    the same files from wherever it is used (`--config runs/a.toml`, a job script)."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            values = tomllib.load(fh)
    except FileNotFoundError:
        raise EsError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise EsError(f"config file {path} is not valid TOML: {exc}") from None
    known = {f.name for f in dataclasses.fields(Config)}
    for key in values:
        if key.replace("-", "_") not in known:
            raise EsError(f"config file {path}: unknown key {key!r}; valid keys: "
                          f"{', '.join(sorted(known))}")
    values = {k.replace("-", "_"): v for k, v in values.items()}
    for key in PATH_KEYS:
        value = values.get(key)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            values[key] = str(path.resolve().parent / value)
    return values
