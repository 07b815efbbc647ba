"""Hugging Face model loading, prompt encoding and greedy generation."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from es_mpi.errors import EsError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_dir(path: str) -> Path:
    """Cheap checks (no weights loaded) that `path` is a Hugging Face causal-LM directory."""
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
        json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise EsError(f"{config} is not valid JSON ({exc})") from None
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise EsError(f"{p} has no weights (*.safetensors or *.bin); "
                      "save the model there with save_pretrained()")
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                           "tokenizer.model")):
        raise EsError(f"{p} has no tokenizer files; save the tokenizer there too "
                      "(tokenizer.save_pretrained(DIR))")
    return p


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def load_model(path: str, dtype: str, devices: list[torch.device]):
    """(model, tokenizer) in eval mode; a replica split across devices when there are several."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch_dtype = resolve_dtype(dtype, devices[0])
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if len(devices) == 1:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
            model.to(devices[0])
        else:
            free = {d.index: torch.cuda.mem_get_info(d.index)[0] for d in devices}
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype, device_map="balanced",
                max_memory={i: int(b * 0.9) for i, b in free.items()})
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EsError(f"cannot load model from {path}: {first}") from None
    model.eval()
    model.requires_grad_(False)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


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


@torch.no_grad()
def generate(model, tokenizer, batch: dict[str, torch.Tensor], max_new_tokens: int,
             ignore_eos: bool = False) -> tuple[list[str], list[int]]:
    """Greedy completions (new tokens only, decoded) and the number of tokens each made.

    `ignore_eos`: always generate max_new_tokens (benchmarks: equal work in every mode).
    """
    from transformers import GenerationConfig

    eos = _eos_ids(model, tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=eos or None,
                              min_new_tokens=max_new_tokens if ignore_eos else 0)
    if ignore_eos:
        eos = []
    out = model.generate(**batch, generation_config=config)
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
    return texts, tokens
