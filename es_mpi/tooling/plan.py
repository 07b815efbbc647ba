"""`es-mpi plan`: the memory one rank needs, from the model's config alone (no weights).

The model's shape comes from its config.json: a skeleton built on the meta device gives
every parameter's exact size (tied weights once) and, for lowrank mode, the matrices it
trains (es_mpi.lowrank.perturbed_matrices). The terms follow what the engine allocates:

  weights      the replica, every parameter in the replica dtype
  KL model     --eval-kl: the base model held-out KL compares with, a second copy of the
               weights in the replica dtype, kept from the first held-out evaluation on
  master       fp32 copy of the trained tensors (full: every parameter, a separate copy
               even in fp32; lowrank: the matrices, none in fp32 with the master on the
               device, where the parameters are their own master)
  anchor       --decay-to init: fp32 copy of the trained tensors, beside the master
  staging      --master host: one fp32 buffer on the device, the largest trained tensor
  noise work   the Replica's two fp32 noise chunks per device (es_mpi.noise.NOISE_CHUNK);
               three and one of the replica's dtype for a 16-bit replica's realized credit
  kept draws   lowrank: every member's fp32 factors, r * (rows + cols) per matrix, kept
               from its evaluation to the update (host memory on a GPU rank); the plan
               assumes one rank evaluates all N members, the most a rank can get
  factors      lowrank: a group's factors, member_batch * rank * (rows + cols) per matrix
  KV cache     2 * layers * rows * kv_heads * (prompt + new tokens) * head_dim, replica dtype
  activations  what generate holds beyond the final KV cache, at its peak: the largest of
               the prefill (4 * hidden + 3 * intermediate values per prompt token, the MLP's
               peak, and the attention mask), its logits (rows x vocab in the replica dtype
               plus two fp32 copies; on the CPU in 16 bits, with the prefill's peak, the
               LM head's weight copies that head_copies_per_row measures) and the last
               decode step (the cache's growth: torch.cat makes each layer's keys anew
               every step, and the logits)
  allocator    GPU only: the caching allocator's reserve beyond the evaluation phase's
               allocations, ALLOCATOR_RESERVE of them (assumed, not measured)
  update       transients of the update phase, when the KV cache is gone: a second noise
               work space, or (lowrank) the factors of every distinct seed of one matrix
               side by side, and the checksum's int64 sums of a chunk on a GPU

Generate is sized for its largest call: the training group's rows or, with held-out
evaluation, its batch, whichever is more, with the longer of the two prompt lengths.
A rank's peak is its resident terms plus the larger of the evaluation phase (factors, KV
cache, activations, allocator reserve) and the update phase. The activation coefficients
were measured on the CPU (torch 2.13, transformers 5.25), and tests/test_plan.py checks
each phase's plan against the peaks measured there. On a GPU, the allocator reserve and
the CUDA context are assumptions, not measurements. Not counted: held-out KL's
teacher-forced forward passes (es_mpi.heldout.KL_ROWS rows, their full logits), which
run after generate has freed its KV cache.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from es_mpi.config import check_settings, field_default
from es_mpi.errors import EsError
from es_mpi.noise import NOISE_CHUNK
from es_mpi.sizing import (  # the generate terms, shared with the engine's batch sizing
    ALLOCATOR_RESERVE,
    DTYPE_BYTES,
    FP32,
    Dims,
    allocator_reserve_bytes,
    dims_of,
    generate_bytes,
    members_per_call,
    rows_that_fit,
)

CONFIG_DIR = Path(__file__).parent / "configs"   # shipped configs of the paper's models
# A GPU rank's memory outside torch's allocations: the CUDA context and library
# workspaces. Assumed, not measured (no GPU was available to calibrate it).
CUDA_CONTEXT_BYTES = 2**30
# A --gpus-per-rank suggestion beyond this is no suggestion: the model does not fit
MAX_GPUS_PER_RANK = 64
# A CPU rank's memory beyond its imports that no term names: the libraries' first use
# (code pages of the kernels run, their caches, the tokenizer); measured 23-35 MiB.
CPU_RUNTIME_BYTES = 24 * 2**20

_UNITS = {"b": 1,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_size(text: str, option: str = "--gpu-memory") -> int:
    """Bytes from '80GB' (10^9), '80GiB' or '80G' (2^30), '512MiB', '1.5TB', '4096B'.

    A number without a unit is refused: '80' meant as 80 GB would plan 80 bytes, and
    nothing tells the two apart. `option` names the flag in the error line.
    """
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if m and not m.group(2):
        raise EsError(f"{option} {text.strip()}: give a unit, e.g. {text.strip()}GB or "
                      f"{text.strip()}GiB (GB = 10^9 bytes, GiB = 2^30, B = bytes)")
    unit = m.group(2).lower() if m else None
    if unit not in _UNITS:
        raise EsError(f"{option} {text!r}: not a size; write e.g. 80GB, 80GiB, 141GB "
                      "or 512MiB (GB = 10^9 bytes, GiB and G = 2^30)")
    size = float(m.group(1)) * _UNITS[unit]
    if not 0 < size < 2**62:
        raise EsError(f"{option} {text!r}: must be more than 0 bytes")
    return int(size)


def human(n: float) -> str:
    """Bytes in binary units: '14.2 GiB', '512.0 MiB', '0 B'."""
    n = float(n)
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


# -- the model's shape -------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """A model, as the planner sees it: parameter counts from its skeleton, and Dims."""

    name: str
    source: str
    model_type: str
    params: int                  # every parameter once (tied weights once)
    largest: int                 # elements of the largest parameter
    dims: Dims
    # lowrank: the trained matrices' (first dim, second dim), or why lowrank refuses
    matrices: tuple[tuple[int, int], ...] = ()
    lowrank_error: str = ""

    @property
    def matrix_params(self) -> int:
        return sum(a * b for a, b in self.matrices)


def shipped() -> dict[str, Path]:
    """Shipped configs by name (file stem), e.g. 'Qwen2.5-7B-Instruct'."""
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.json"))}


def _short(name: str) -> str:
    return name.lower().removesuffix("-instruct")


def resolve(model: str) -> tuple[str, Path]:
    """(name, config.json path) of --model: a model directory, a config JSON file, or a
    shipped name (case-insensitive, '-Instruct' optional: qwen2.5-7b). Cheap: no imports."""
    if not model:
        raise EsError("no model given: pass --model DIR, CONFIG.json or a shipped name ("
                      + ", ".join(shipped()) + ")")
    p = Path(model)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise EsError(f"{p} has no config.json; pass a Hugging Face model directory, "
                          "a config JSON file or a shipped name")
        return p.resolve().name, p / "config.json"
    if p.is_file():
        return p.stem, p
    for name, path in shipped().items():
        if _short(model) == _short(name):
            return name, path
    raise EsError(f"model {model!r}: no such directory or file, and not a shipped config; "
                  f"shipped: {', '.join(_short(n) for n in shipped())}")


def shape_of(model: str) -> Shape:
    """The Shape of --model (see resolve), from its config on the meta device (about a
    second for an 8B model; no weights are read)."""
    name, path = resolve(model)
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EsError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(values, dict) or not isinstance(values.get("model_type"), str):
        raise EsError(f"{path} is not a model config (a JSON object with model_type)")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from es_mpi.lowrank import perturbed_matrices

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        config = AutoConfig.from_pretrained(str(path))
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, ImportError,
            RuntimeError, NotImplementedError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EsError(f"cannot build model {name} from {path}: {first}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    params = dict(skeleton.named_parameters())
    matrices: tuple[tuple[int, int], ...] = ()
    refused = ""
    try:
        trained = perturbed_matrices(skeleton)
        matrices = tuple((params[n].shape[0], params[n].shape[1]) for n in trained)
    except EsError as exc:
        refused = str(exc)
    return Shape(name=name, source=str(path), model_type=values["model_type"],
                 params=sum(p.numel() for p in params.values()),
                 largest=max(p.numel() for p in params.values()), dims=dims_of(config),
                 matrices=matrices, lowrank_error=refused)


# -- the plan --------------------------------------------------------------------------------

# Settings' fields that are es-mpi train's (es_mpi.config.Config), with its meaning: their
# defaults, choices and checks are Config's (es-mpi plan's flags for them: es_mpi.cli's
# PLAN_FIELDS). Not among them: prompts (train's batch_size, but 0 there means the task's
# training set, which plan has no task to count) and eval_batch_size (0 here: no held-out
# evaluation).
CONFIG_FIELDS = ("mode", "dtype", "master", "decay_to", "credit", "population",
                 "member_batch", "rank", "antithetic", "max_new_tokens", "generate_batch",
                 "eval_kl")


@dataclass(frozen=True)
class Settings:
    """What the plan depends on, with es-mpi train's meaning (es_mpi.config.Config)."""

    mode: str = field_default("mode")
    dtype: str = field_default("dtype")  # auto: bfloat16 on a GPU rank, float32 on a CPU rank
    master: str = field_default("master")
    decay_to: str = field_default("decay_to")
    credit: str = field_default("credit")  # full mode, 16-bit replica: the update's credit
    population: int = field_default("population")
    member_batch: int = field_default("member_batch")  # 0 = auto: as many as one call holds
    rank: int = field_default("rank")
    antithetic: bool = field_default("antithetic")
    prompts: int = 16
    prompt_tokens: int = 128
    max_new_tokens: int = field_default("max_new_tokens")
    generate_batch: int = field_default("generate_batch")  # 0 = auto: all rows, or what fits
    gpu_memory: int = 80 * 10**9
    device: str = "cuda"         # cuda: a GPU rank; cpu: a CPU rank (everything in RAM)
    # held-out evaluation (es-mpi train --eval-every K > 0): its prompts per generate call
    # (0 = none), their longest prompt (0 = as prompt_tokens), and held-out KL (--eval-kl)
    eval_batch_size: int = 0
    eval_prompt_tokens: int = 0
    eval_kl: bool = field_default("eval_kl")

    def __post_init__(self) -> None:
        # train's fields by train's rules: the same error line as es-mpi train's
        check_settings({name: getattr(self, name) for name in CONFIG_FIELDS})
        if self.device not in ("cuda", "cpu"):
            raise EsError(f"--device {self.device}: choose one of cuda, cpu")
        for name in ("prompts", "prompt_tokens"):
            if getattr(self, name) < 1:
                raise EsError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if self.gpu_memory <= 0:
            raise EsError("--gpu-memory must be more than 0 bytes")
        if self.eval_batch_size < 0:
            raise EsError(f"--eval-batch-size {self.eval_batch_size}: must be >= 0 (0 = no "
                          "held-out evaluation)")
        if self.eval_prompt_tokens < 0:
            raise EsError(f"--eval-prompt-tokens {self.eval_prompt_tokens}: must be >= 0 "
                          "(0 = as --prompt-tokens)")
        if self.eval_kl and not self.eval_batch_size:
            raise EsError("--eval-kl: held-out KL is measured in held-out evaluations; give "
                          "their --eval-batch-size too (es-mpi train's default is 16)")

    @property
    def replica_dtype(self) -> str:
        if self.dtype == "auto":
            return "bfloat16" if self.device == "cuda" else "float32"
        return self.dtype

    @property
    def rows(self) -> int:
        """Rows of the largest generate a generation asks for (a group's members x prompts)."""
        return self.members * self.prompts

    @property
    def call_rows(self) -> int:
        """Rows of the largest generate call, training or held-out, before micro-batches."""
        return max(self.rows, self.eval_batch_size)

    @property
    def generate_tokens(self) -> int:
        """The prompt tokens generate is sized for: the longer of the training prompts and,
        with held-out evaluation, the held-out ones."""
        if not self.eval_batch_size:
            return self.prompt_tokens
        return max(self.prompt_tokens, self.eval_prompt_tokens or self.prompt_tokens)

    @property
    def members(self) -> int:
        """Members per generate (lowrank: the group; auto, before it is decided: all N)."""
        if self.mode != "lowrank":
            return 1
        return min(self.member_batch or self.population, self.population)


TERMS = ("weights", "kl_model", "master", "anchor", "staging", "noise_work", "kept_draws",
         "lowrank_factors", "kv_cache", "activations", "allocator_reserve", "update",
         "cuda_context", "runtime")
# alive during generate only (the allocator's reserve: the evaluation phase's, see
# ALLOCATOR_RESERVE)
EVALUATION = ("lowrank_factors", "kv_cache", "activations", "allocator_reserve")


@dataclass
class Plan:
    """Bytes per rank, term by term, on the device and on the host."""

    model: str
    params: int
    trained_params: int
    settings: Settings
    generate_batch: int          # rows per generate call actually planned
    device: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        """Whether the device total fits in --gpu-memory (None for a CPU rank)."""
        if self.settings.device == "cpu":
            return None
        return self.device["total"] <= self.settings.gpu_memory

    def to_dict(self) -> dict:
        out = {"model": self.model, "params": self.params,
               "trained_params": self.trained_params, "settings": asdict(self.settings),
               "dtype": self.settings.replica_dtype, "rows": self.settings.rows,
               "generate_batch": self.generate_batch, "device": self.device,
               "host": self.host, "gpu_memory": self.settings.gpu_memory,
               "fits": self.fits, "notes": self.notes}
        return out


def _terms(shape: Shape, s: Settings, micro: int) -> tuple[dict[str, int], dict[str, int]]:
    """(device terms, host terms) in bytes, for `micro` rows per generate call."""
    eb = DTYPE_BYTES[s.replica_dtype]
    lowrank = s.mode == "lowrank"
    on_host = s.master == "host"
    cuda = s.device == "cuda"
    # on a CPU rank every term is in the same memory: the device column holds them all
    host_side = on_host and cuda
    trained = shape.matrix_params if lowrank else shape.params
    largest = max((a * b for a, b in shape.matrices), default=0) if lowrank else shape.largest
    dev = dict.fromkeys(TERMS, 0)
    host = dict.fromkeys(TERMS, 0)

    dev["weights"] = shape.params * eb
    if s.eval_kl:  # the base model, loaded at the first held-out evaluation, then kept
        dev["kl_model"] = shape.params * eb
    master = trained * FP32
    if lowrank and s.replica_dtype == "float32" and not on_host:
        master = 0  # the fp32 parameters are their own master
    (host if host_side else dev)["master"] = master
    if s.decay_to == "init":
        (host if host_side else dev)["anchor"] = trained * FP32
    if on_host:
        dev["staging"] = largest * FP32
    # noise work space: fp32 chunks per device (es_mpi.es._work), two, or three and one
    # chunk of the replica's dtype for the realized credit of a 16-bit replica. A GPU
    # holds all of it; on the CPU only the pages written are resident: a tensor's worth
    # at most per chunk, the first from the first perturbation, the others once an
    # update wrote them (the Replica's: kept, and so resident from then on).
    chunk = NOISE_CHUNK if cuda else min(NOISE_CHUNK, largest)
    work = 2 * chunk * FP32
    realized = not lowrank and eb < FP32 and s.credit == "realized"
    if realized:  # the Replica's work space serves the update too
        dev["noise_work"] = 3 * chunk * FP32 + chunk * eb
    elif not lowrank:  # lowrank's update needs no work space
        dev["noise_work"] = work if cuda else chunk * FP32

    # lowrank: each member's fp32 draws of every matrix, kept from its evaluation to its
    # update (es_mpi.noise.LowRankNoise.keep_draws), in host memory (pinned for a GPU):
    # a rank's members, all N where one rank evaluates them (the plan's case, the most);
    # an antithetic pair keeps both copies
    pairs = sum(a + b for a, b in shape.matrices)
    if lowrank:
        (host if cuda else dev)["kept_draws"] = s.population * s.rank * pairs * FP32

    # evaluation phase: one group's generate
    if lowrank:
        cols = s.members * s.rank
        largest_pair = max((a + b for a, b in shape.matrices), default=0) * cols
        dev["lowrank_factors"] = (pairs * cols * eb
                                  + largest_pair * eb)  # and one matrix's draws in eb
    gen = generate_bytes(shape.dims, s.replica_dtype, micro, s.generate_tokens,
                         s.max_new_tokens, s.device)
    dev["kv_cache"], dev["activations"] = gen["kv_cache"], gen["activations"]
    dev["allocator_reserve"] = allocator_reserve_bytes(
        dev["lowrank_factors"] + gen["total"], s.device)

    # update phase (the KV cache is gone by then)
    if lowrank:
        seeds = s.population // 2 if s.antithetic else s.population
        kr = seeds * s.rank * FP32  # every distinct seed's factors of one matrix, side by side
        # es_mpi.noise.LowRankNoise.add_update_: A and B side by side on the host, then
        # on the device A, A times the coefficients, and B
        dev["update"] = max((kr * (2 * a + b) for a, b in shape.matrices), default=0)
        if cuda:
            host["update"] = max((kr * (a + b) for a, b in shape.matrices), default=0)
    elif realized:
        dev["update"] = 0                    # the Replica's work space, counted above
    elif not on_host:
        dev["update"] = work                 # es_update_ makes its own work space
    elif not cuda:
        dev["update"] = chunk * FP32         # the update writes the Replica's second chunk
    if cuda:  # the checksum's int64 sums of a chunk (the CPU's numpy sum makes none)
        dev["update"] = max(dev["update"], chunk * 8)
    if cuda:
        dev["cuda_context"] = CUDA_CONTEXT_BYTES
    else:
        dev["runtime"] = CPU_RUNTIME_BYTES
    return dev, host


def _total(terms: dict[str, int]) -> int:
    """Resident terms plus the larger of the evaluation and the update phases."""
    evaluation = sum(terms[k] for k in EVALUATION)
    resident = sum(terms[k] for k in TERMS) - evaluation - terms["update"]
    return resident + max(evaluation, terms["update"])


def _with_members(shape: Shape, s: Settings, notes: list[str]) -> Settings:
    """member_batch 0 (auto), as the engine decides it: the members one generate call
    holds (its --generate-batch rows, or the rows that fit), at most N."""
    if s.mode != "lowrank" or s.member_batch:
        return s
    rows = s.generate_batch
    if not rows and s.device == "cuda":
        rows = plan(shape, dataclasses.replace(s, member_batch=s.population)).generate_batch
    members = members_per_call(rows, s.prompts, s.population) if rows else s.population
    notes.append(f"--member-batch 0 (auto) gives groups of {members} of the {s.population} "
                 "members")
    return dataclasses.replace(s, member_batch=members)


def plan(shape: Shape, settings: Settings) -> Plan:
    """The memory of one rank for `settings`; see the module docstring for the terms."""
    s = settings
    if s.mode == "lowrank" and shape.lowrank_error:
        raise EsError(f"model {shape.name}: {shape.lowrank_error}")
    if s.mode == "lowrank" and not shape.matrices:
        raise EsError(f"model {shape.name} has no Linear, Conv1D or Embedding weights for "
                      "lowrank mode; use --mode full")
    notes = []
    s = _with_members(shape, s, notes)
    micro = min(s.generate_batch, s.call_rows) if s.generate_batch else s.call_rows
    if not s.generate_batch and s.device == "cuda":
        # as the engine decides it: 90% of the memory free once the replica (and the KL
        # base model) is loaded
        dev, _ = _terms(shape, s, 1)
        loaded = sum(dev[k] for k in ("weights", "kl_model", "master", "anchor",
                                      "cuda_context"))
        fit = rows_that_fit(shape, s.replica_dtype, s.generate_tokens, s.max_new_tokens,
                            int(max(0, s.gpu_memory - loaded) * 0.9))
        micro = min(s.call_rows, fit)
        notes.append(f"--generate-batch 0 (auto) gives {micro} of {s.call_rows} rows per "
                     "generate call in this much GPU memory")
    dev, host = _terms(shape, s, micro)
    dev["total"] = _total(dev)
    host["total"] = _total(host)
    trained = shape.matrix_params if s.mode == "lowrank" else shape.params
    return Plan(model=shape.name, params=shape.params, trained_params=trained, settings=s,
                generate_batch=micro, device=dev, host=host, notes=notes)


def suggestions(shape: Shape, p: Plan) -> list[str]:
    """Changes that make a plan fit in --gpu-memory, each with its device total (none when
    it fits), least disruptive first."""
    s = p.settings
    if p.fits is not False:
        return []
    budget = s.gpu_memory

    def fitting(**changes) -> Plan | None:
        q = plan(shape, replace(s, **changes))
        return q if q.device["total"] <= budget else None

    out = []

    def offer(flags: str, q: Plan, why: str) -> None:
        out.append(f"{flags}: {human(q.device['total'])} on the GPU ({why})")

    # micro-batches: the largest generate batch that fits (the plan is monotone in it)
    lo, hi = 0, p.generate_batch - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fitting(generate_batch=mid) else (lo, mid - 1)
    if lo >= 1:
        offer(f"--generate-batch {lo}", fitting(generate_batch=lo),
              f"the KV cache of {lo} rows per generate call")
    moved = p.device["master"] + p.device["anchor"]
    if moved:
        q = fitting(master="host") or fitting(master="host", generate_batch=0)
        if q:
            flags = "--master host" + (" --generate-batch 0" if q.settings.generate_batch
                                       != s.generate_batch else "")
            offer(flags, q, f"{human(moved)} of fp32 copies move to host memory")
    if s.mode == "full" and shape.matrices and not shape.lowrank_error:
        for master in ("device", "host"):
            q = fitting(mode="lowrank", master=master, generate_batch=0)
            if q:
                offer(f"--mode lowrank{' --master host' if master == 'host' else ''}", q,
                      "trains the weight matrices only, all members of a group in one "
                      "generate")
                break
    if s.replica_dtype == "float32":
        q = fitting(dtype="bfloat16", generate_batch=0)
        if q:
            offer("--dtype bfloat16", q, "half the replica; the update stays fp32")
    if s.decay_to == "init" and (q := fitting(decay_to="zero")):
        offer("--decay-to zero", q, "no fp32 anchor copy")
    if not out:
        k = max(2, math.ceil(p.device["total"] / (budget * 0.9)))
        if k <= MAX_GPUS_PER_RANK:
            out.append(f"split the replica across GPUs: --gpus-per-rank {k}, about "
                       f"{human(p.device['total'] / k)} per GPU (the weights alone are "
                       f"{human(p.device['weights'])})")
        else:
            out.append(f"nothing fits: even split across {MAX_GPUS_PER_RANK} GPUs it "
                       f"needs {human(p.device['total'] / MAX_GPUS_PER_RANK)} per GPU, "
                       f"more than 90% of --gpu-memory {human(budget)}; is that the "
                       "memory of one GPU?")
    return out


# -- text output -----------------------------------------------------------------------------

_LABELS = {
    "weights": "weights ({dtype} replica)",
    "kl_model": "KL base model (--eval-kl)",
    "master": "fp32 master",
    "anchor": "decay anchor (--decay-to init)",
    "staging": "staging buffer (--master host)",
    "noise_work": "noise work buffers",
    "kept_draws": "lowrank draws kept for the update",
    "lowrank_factors": "lowrank factors (one group)",
    "kv_cache": "KV cache ({rows} rows x {seq} tokens)",
    "activations": "generate: activations, logits",
    "allocator_reserve": "allocator reserve (assumed {reserve}%)",
    "update": "update transients",
    "cuda_context": "CUDA context (assumed)",
    "runtime": "libraries' first use",
}


def report(shape: Shape, p: Plan) -> str:
    """The plan as the lines `es-mpi plan` prints."""
    s = p.settings
    d = shape.dims
    seq = s.generate_tokens + s.max_new_tokens
    where = "GPU" if s.device == "cuda" else "CPU"
    auto = " (dtype auto: a GPU rank)" if s.dtype == "auto" and s.device == "cuda" else ""
    group = (f" in groups of {s.members}, rank {s.rank}"
             if s.mode == "lowrank" else "")
    lines = [
        f"es-mpi plan: {shape.name}, {p.params / 1e9:.2f} B parameters "
        f"({p.trained_params / 1e9:.2f} B trained), {s.mode} mode, {s.replica_dtype} "
        f"replica{auto}, master on the {s.master}",
        f"  shape: {d.layers} layers, hidden {d.hidden}, intermediate {d.intermediate}, "
        f"{d.heads} heads, {d.kv_heads} KV heads x {d.head_dim}, vocab {d.vocab}",
        f"  batch: population {s.population}{group}; {s.prompts} prompts x "
        f"({s.prompt_tokens} prompt + {s.max_new_tokens} new tokens); {p.generate_batch} "
        f"of {s.call_rows} rows per generate call",
        "",
        f"  {'per rank':<42}{where:>11}{'host':>11}",
    ]
    if s.eval_batch_size:
        lines.insert(3, f"  held-out: {s.eval_batch_size} prompts per call x "
                        f"({s.eval_prompt_tokens or s.prompt_tokens} prompt + "
                        f"{s.max_new_tokens} new tokens)"
                        + (", KL to the base model" if s.eval_kl else ""))
    for term in TERMS:
        dv, hv = p.device[term], p.host[term]
        if dv or hv:
            label = _LABELS[term].format(dtype=s.replica_dtype, rows=p.generate_batch,
                                         seq=seq, reserve=round(100 * ALLOCATOR_RESERVE))
            lines.append(f"  {label:<42}{human(dv) if dv else '-':>11}"
                         f"{human(hv) if hv else '-':>11}")
    lines.append(f"  {'total (peak)':<42}{human(p.device['total']):>11}"
                 f"{human(p.host['total']) if p.host['total'] else '-':>11}")
    evaluation = sum(p.device[k] for k in EVALUATION)
    lines.append(f"  (peak: the resident terms and the larger phase: generate "
                 f"{human(evaluation)}, update {human(p.device['update'])})")
    lines += [f"  note: {n}" for n in p.notes]
    lines.append("  (not counted: the Python process itself, torch and transformers "
                 "imported, a few hundred MiB of host memory per rank)")
    if s.device == "cpu":
        lines.append("Estimates calibrated against peaks measured on the CPU.")
        return "\n".join(lines)
    if p.fits:
        lines.append(f"fits in {human(s.gpu_memory)} of GPU memory, "
                     f"{human(s.gpu_memory - p.device['total'])} to spare")
    else:
        lines.append(f"does not fit in {human(s.gpu_memory)} of GPU memory "
                     f"({human(p.device['total'] - s.gpu_memory)} over); to fit:")
        lines += [f"  {tip}" for tip in suggestions(shape, p)]
    lines.append("Estimates calibrated against peaks measured on the CPU; the GPU's "
                 "allocator reserve and CUDA context are assumptions no GPU has checked "
                 "yet: leave a margin.")
    return "\n".join(lines)
