"""Hugging Face model loading, prompt encoding and greedy generation."""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from es_mpi.devices import load_kwargs, resolve_dtype
from es_mpi.errors import EsError


def check_model_dir(path: str) -> Path:
    """Cheap checks (no weights loaded) that `path` is a Hugging Face causal-LM directory
    with complete weight files."""
    if not path:
        raise EsError("no model given: pass --model DIR (a Hugging Face model directory)")
    p = Path(path)
    if not p.is_dir():
        raise EsError(f"model directory {p} does not exist")
    config = p / "config.json"
    if not config.is_file():
        raise EsError(f"{p} is not a Hugging Face model directory (no config.json); "
                      "save the model there with save_pretrained()")
    try:
        values = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise EsError(f"{config} is not valid JSON ({exc})") from None
    if not isinstance(values, dict):
        raise EsError(f"{config} is not a JSON object; is it a model's config.json?")
    _check_causal(p, values)
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise EsError(f"{p} has no weights (*.safetensors or *.bin); "
                      "save the model there with save_pretrained()")
    _check_weight_files(p)
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                           "tokenizer.model")):
        raise EsError(f"{p} has no tokenizer files; save the tokenizer there too "
                      "(tokenizer.save_pretrained(DIR))")
    return p


def _check_causal(p: Path, config: dict) -> None:
    """Refuse encoder-decoder and other non-causal models before anything loads."""
    model_type = config.get("model_type")
    if config.get("is_encoder_decoder"):
        raise EsError(f"model {p} is an encoder-decoder ({model_type}); es-mpi fine-tunes "
                      "decoder-only causal language models (AutoModelForCausalLM)")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not isinstance(model_type, str):
        raise EsError(f"{p}/config.json has no model_type; save the model with "
                      "save_pretrained()")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        arch = ", ".join(config.get("architectures") or []) or model_type
        raise EsError(f"model {p} ({arch}) is not a causal language model that "
                      "AutoModelForCausalLM can load (encoder-only, encoder-decoder or "
                      "an unknown model type for this transformers version); es-mpi "
                      "fine-tunes decoder-only causal LMs")


def _check_weight_files(p: Path) -> None:
    """Every safetensors file is complete (its header covers exactly the file's bytes),
    and every shard a sharded index names exists: an interrupted copy is named here."""
    for index in p.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise EsError(f"weights index {index} is damaged (not the JSON of a "
                          "save_pretrained() index); copy the model again") from None
        missing = sorted(s for s in shards if not (p / s).is_file())
        if missing:
            raise EsError(f"weights file {p / missing[0]} is missing ({len(missing)} of "
                          f"{len(shards)} shards named by {index.name}); copy the model again")
    for path in sorted(p.glob("*.safetensors")):
        problem = _safetensors_problem(path)
        if problem:
            raise EsError(f"weights file {path} is damaged: {problem}; it was probably cut "
                          "short (interrupted copy, full disk): copy the model again")


def _safetensors_problem(path: Path) -> str | None:
    """None for a complete safetensors file, else what is wrong with it (reads the header)."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{size} bytes, shorter than a safetensors header"
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                return f"header of {length} bytes in a file of {size}"
            header = json.loads(fh.read(length))
    except (OSError, ValueError) as exc:
        return f"unreadable header ({type(exc).__name__})"
    if not isinstance(header, dict):
        return "header is not a JSON object"
    try:
        end = max((int(meta["data_offsets"][1]) for key, meta in header.items()
                   if key != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return "header without valid data offsets"
    if 8 + length + end > size:
        return f"{size} bytes where its header needs {8 + length + end}"
    return None


def has_chat_template(path: str | Path) -> bool:
    """Whether the model directory's tokenizer has a chat template (read without loading)."""
    p = Path(path)
    if (p / "chat_template.jinja").is_file() or (p / "chat_template.json").is_file():
        return True
    try:
        config = json.loads((p / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("chat_template"))


def load_model(path: str, dtype: str, devices: list[torch.device]):
    """(model, tokenizer) in eval mode; a replica split across devices when there are several."""
    import pickle

    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch_dtype = resolve_dtype(dtype, devices[0])
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype,
                                                     **load_kwargs(devices))
    # damaged weights surface as any of these (a cut .bin zip, a bad safetensors block)
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError,
            SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EsError(f"cannot load model from {path}: {first}") from None
    model.eval()
    model.requires_grad_(False)
    if torch_dtype == torch.float16:
        _watch_overflow(model)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        # padding is masked out, so any token will do; the EOS where there is one
        fallback = tokenizer.eos_token or tokenizer.unk_token
        tokenizer.pad_token = fallback if fallback is not None else \
            tokenizer.convert_ids_to_tokens(0)
    return model, tokenizer


class Overflow(EsError):
    """A float16 replica's logits were not finite: rewards would score garbage."""

    abort_job = True  # raised on the ranks that saw it: the job stops, not just one rank


def _watch_overflow(model) -> None:
    """float16 tops out at 65504: a model trained in bf16 (or a perturbed one) can
    overflow in its activations, and greedy decoding then picks tokens from inf/NaN
    logits without a word. A forward hook on the LM head ORs "not all finite" into a flag
    on the device (no synchronization per step); `generate` reads it once per call."""
    head = model.get_output_embeddings()
    if head is None:
        return
    state: dict[str, torch.Tensor] = {}

    def check(module, args, out):
        logits = out[0] if isinstance(out, tuple) else out
        flag = state.get("flag")
        if flag is None or flag.device != logits.device:
            flag = state["flag"] = torch.zeros((), dtype=torch.bool, device=logits.device)
        flag.logical_or_(~torch.isfinite(logits).all())

    head.register_forward_hook(check)
    model._es_mpi_overflow = state


def _check_overflow(model) -> None:
    flag = getattr(model, "_es_mpi_overflow", {}).get("flag")
    if flag is not None and bool(flag):
        flag.zero_()
        raise Overflow("float16 overflow: the model's logits were inf or NaN in a generate "
                       "call (activations beyond float16's 65504); use --dtype bfloat16 "
                       "(float32's range at the same memory) or --dtype float32")


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Every parameter once (tied weights appear under their first name), in model order."""
    return dict(model.named_parameters())


def encode_prompts(tokenizer, prompts: list[str], device: torch.device,
                   templated: bool) -> dict[str, torch.Tensor]:
    """Left-padded batch; templated prompts already carry their special tokens."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not templated)
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else [int(e) for e in (eos or [])]


@dataclass(frozen=True)
class Sampling:
    """Seeded sampling at `temperature` (plain softmax sampling: no top-k or top-p)."""

    temperature: float
    seed: int


@contextlib.contextmanager
def _only(model, config):
    """Within the block, `config` is the model's whole generation config.

    transformers fills every setting a generate call leaves unset from the model's own
    generation_config.json (sampling, temperature, repetition penalties, n-gram bans,
    bad words, forced tokens, ...), and several of those change even greedy decoding.
    Swapping in a config built from scratch leaves nothing to fill from.
    """
    saved = model.generation_config
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = saved


@torch.no_grad()
def generate(model, tokenizer, batch: dict[str, torch.Tensor], max_new_tokens: int,
             ignore_eos: bool = False, sampling: Sampling | None = None,
             return_ids: bool = False) -> tuple:
    """Completions (new tokens only, decoded) and the number of tokens each made.

    Greedy unless `sampling` is given, whatever the model's generation config says.
    `ignore_eos`: always generate max_new_tokens (benchmarks: equal work in every mode).
    `return_ids`: also the new token ids, (rows, steps) on the CPU (es_mpi.kl).
    """
    from transformers import GenerationConfig

    eos = _eos_ids(model, tokenizer)
    decoding = {"do_sample": False}
    if sampling is not None:
        decoding = {"do_sample": True, "temperature": sampling.temperature, "top_k": 0,
                    "top_p": 1.0}
    config = GenerationConfig(max_new_tokens=max_new_tokens, num_beams=1,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=eos or None,
                              min_new_tokens=max_new_tokens if ignore_eos else 0, **decoding)
    if ignore_eos:
        eos = []
    with _only(model, config), _seeded(sampling, batch["input_ids"].device):
        out = model.generate(**batch, generation_config=config)
    _check_overflow(model)
    new = out[:, batch["input_ids"].shape[1]:].cpu()
    tokens = []
    for row in new.tolist():
        n = len(row)
        for j, tok in enumerate(row):
            if tok in eos:
                n = j + 1
                break
        tokens.append(n)
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    return (texts, tokens, new) if return_ids else (texts, tokens)


def micro_batches(n: int, limit: int, unit: int = 1) -> list[tuple[int, int]]:
    """Rows 0..n-1 cut into (r0, r1) spans of at most `limit` rows (0 = all in one) that
    never split a block of `unit` rows unless one block alone exceeds the limit: then
    each block is cut on its own. (unit: lowrank's rows per member.)"""
    if limit <= 0 or limit >= n:
        return [(0, n)]
    if limit >= unit:
        step = limit // unit * unit
        return [(r0, min(n, r0 + step)) for r0 in range(0, n, step)]
    return [(r0, min(b + unit, r0 + limit, n))
            for b in range(0, n, unit) for r0 in range(b, min(n, b + unit), limit)]


def generate_rows(model, tokenizer, batch: dict[str, torch.Tensor], max_new_tokens: int,
                  limit: int, ignore_eos: bool = False,
                  select: Callable[[int, int], None] | None = None, unit: int = 1
                  ) -> tuple[list[str], list[int]]:
    """`generate` (greedy) on the batch's rows in micro-batches of at most `limit` rows
    (`micro_batches`: blocks of `unit` rows stay whole where the limit allows).

    The rows keep the batch's padding, so each row is computed exactly as in one call.
    `select(r0, r1)` runs before the micro-batch of rows r0..r1-1 (lowrank mode points
    its hooks at those rows' members).
    """
    n = batch["input_ids"].shape[0]
    texts: list[str] = []
    tokens: list[int] = []
    for r0, r1 in micro_batches(n, limit, unit):
        if select is not None:
            select(r0, r1)
        part = batch if (r0, r1) == (0, n) else {k: v[r0:r1] for k, v in batch.items()}
        t, k = generate(model, tokenizer, part, max_new_tokens, ignore_eos)
        texts += t
        tokens += k
    return texts, tokens


@contextlib.contextmanager
def _seeded(sampling: Sampling | None, device: torch.device):
    """Sampling draws from torch's global generator: seed it for the call, then put back
    the state it had, so nothing else sees the difference."""
    if sampling is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(sampling.seed)
        yield
