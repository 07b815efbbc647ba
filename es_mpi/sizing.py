"""The memory of one `generate` call, and how many rows fit: how the engine sizes its
automatic batches (es_mpi.session.decide_batches), and the generate terms of `es-mpi
plan` (es_mpi.tooling.plan, which builds a whole rank's estimate on this module).

A row's cost is its KV cache (2 * layers * kv_heads * head_dim per token, sliding
windows capped) and, at generate's peak, its activations: the largest of the prefill
(PREFILL_PER_HIDDEN * hidden + PREFILL_PER_INTERMEDIATE * intermediate values per prompt
token, and the attention mask), its logits (rows x vocab in the replica dtype plus two
fp32 copies; on the CPU in 16 bits, the LM head's weight copies that head_copies_per_row
measures) and the last decode step (the cache's growth: torch.cat makes each layer's keys
anew every step, and the logits). On a GPU each row also costs what the caching allocator
reserves beyond it (ALLOCATOR_RESERVE). The coefficients were measured on the CPU; the
reserve is an assumption until a GPU calibrates it.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from es_mpi.errors import EsError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FP32 = 4

# generate, measured on the CPU: values per prompt token in the prefill, replica dtype
PREFILL_PER_HIDDEN = 4        # residual, normed input, MLP output, the layer's output
PREFILL_PER_INTERMEDIATE = 3  # gate activation, up projection and their product
LOGIT_COPIES_FP32 = 2         # generate's fp32 scores, and a logits processor's copy
# What torch's caching allocator reserves on a GPU beyond what the evaluation phase
# allocates, as a fraction of it: freed blocks stay reserved for reuse, and generate's
# DynamicCache grows by torch.cat at every decode step, so blocks of every size of one
# layer's keys are freed and kept, and a new one may not fit in any of them. An
# assumption (no GPU has calibrated it yet): torch's docs give no figure; its
# reserved-but-unallocated memory is what a CUDA OOM message reports. With
# PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (segments that grow in place, for
# allocations whose sizes keep changing) the reserve is smaller.
ALLOCATOR_RESERVE = 0.25


@dataclass(frozen=True)
class Dims:
    """What the KV cache and activations depend on, read from a (text) config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    # per layer: the tokens its cache keeps at most (None: all, a sliding window: that)
    windows: tuple[int | None, ...] = ()

    def cache_tokens(self, seq: int) -> int:
        """Tokens summed over the layers' caches when the sequence is `seq` long."""
        windows = self.windows or (None,) * self.layers
        return sum(seq if w is None else min(seq, w) for w in windows)


def dims_of(config: Any) -> Dims:
    """Dims from a transformers config (a multimodal one's text config)."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config

    def get(*names: str, default=None):
        for name in names:
            value = getattr(c, name, None)
            if value is not None:
                return value
        if default is None:
            raise EsError(f"model config ({type(c).__name__}) has none of "
                          f"{', '.join(names)}: cannot plan its memory")
        return default

    layers = int(get("num_hidden_layers", "n_layer"))
    hidden = int(get("hidden_size", "n_embd", "d_model"))
    heads = int(get("num_attention_heads", "n_head"))
    kv_heads = int(get("num_key_value_heads", default=heads))
    head_dim = int(get("head_dim", default=hidden // heads))
    intermediate = int(get("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden))
    vocab = int(get("vocab_size"))
    windows: tuple[int | None, ...] = ()
    layer_types = getattr(c, "layer_types", None)
    window = getattr(c, "sliding_window", None)
    if layer_types and window:
        windows = tuple(int(window) if t == "sliding_attention" else None
                        for t in layer_types)
    return Dims(layers, hidden, intermediate, heads, kv_heads, head_dim, vocab, windows)


# -- generate: KV cache and activations ----------------------------------------------------

def _dtype_bytes(dtype: Any) -> int:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise EsError(f"dtype {dtype}: choose float32, bfloat16 or float16")
    return DTYPE_BYTES[name]


def _dims(model: Any) -> Dims:
    if isinstance(model, Dims):
        return model
    if isinstance(getattr(model, "dims", None), Dims):  # es-mpi plan's Shape
        return model.dims
    return dims_of(model)


def kv_cache_bytes(model: Any, dtype: Any, rows: int, tokens: int) -> int:
    """Keys and values of `rows` sequences of `tokens` tokens (DynamicCache)."""
    d = _dims(model)
    return 2 * rows * d.kv_heads * d.head_dim * d.cache_tokens(tokens) * _dtype_bytes(dtype)


# The prefill's LM head on the CPU in 16 bits. generate keeps only the last position's
# logits (logits_to_keep=1: the head reads hidden[:, -1:, :], a strided slice of the
# prefill's (rows, prompt, hidden)), and with frozen weights (requires_grad False) torch's
# matmul does not fold that into one GEMM: it runs a batched matmul over the rows, and some
# CPUs' 16-bit kernels copy the head's expanded weight, once per row, while others (those
# with AVX512-BF16 or AMX, for one) do not; float16 and bfloat16 may differ on one CPU. So
# the plan measures it, once per process and dtype: PROBE_ROWS rows through a weight large
# enough to tell a copy from the allocator's noise (32 MiB in 16 bits).
PROBE_ROWS = 2
PROBE_VOCAB, PROBE_HIDDEN = 16384, 1024


def _head_copies(dtype: str) -> float:
    """The probe itself, in the child process of head_copies_per_row: the peak RSS growth
    of the op, in copies of the weight per row (2 decimals); 1.0 where the peak RSS
    cannot be reset (not Linux)."""
    import torch
    import torch.nn.functional as F

    from es_mpi import memory

    dt = getattr(torch, dtype)
    weight = torch.ones(PROBE_VOCAB, PROBE_HIDDEN, dtype=dt)
    hidden = torch.ones(PROBE_ROWS, 2, PROBE_HIDDEN, dtype=dt)
    weight_bytes = weight.numel() * weight.element_size()
    with torch.no_grad():
        F.linear(hidden[:, -1:, :], weight)  # the kernels' first use, not measured
        memory.reset_peak_rss()
        before = memory.rss_bytes()
        if memory.peak_rss_bytes() > before + weight_bytes // 2:
            return 1.0  # the peak did not reset: cannot measure
        logits = F.linear(hidden[:, -1:, :], weight)
        grown = memory.peak_rss_bytes() - before - logits.numel() * logits.element_size()
    return max(0.0, round(grown / (PROBE_ROWS * weight_bytes), 2))


@functools.cache
def head_copies_per_row(dtype: str) -> float:
    """Copies of the LM head's weights one row of a CPU prefill makes in `dtype`
    ('bfloat16', 'float16'), as measured on this machine: 0 or 1. It runs the op
    generate runs (F.linear on the last position's strided slice, weights without grad,
    under no_grad) and reads the peak RSS growth, in a child process (one thread, a few
    seconds, once per process and dtype), so that this process's peak RSS, which the
    engine and bench measure, is neither reset nor raised. Where it cannot measure
    (the child fails, or not Linux), it assumes 1, the larger."""
    code = f"from es_mpi.sizing import _head_copies; print(_head_copies({dtype!r}))"
    root = str(Path(__file__).resolve().parent.parent)  # this es_mpi, installed or not
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=env, timeout=300, check=True)
        return float(proc.stdout.split()[-1])
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return 1.0


def generate_bytes(model: Any, dtype: Any, rows: int, prompt_tokens: int,
                   max_new_tokens: int, device: str = "cuda") -> dict[str, int]:
    """Peak bytes of one greedy `generate` call of `rows` rows: {"kv_cache": the cache at
    the end, "activations": the rest at the peak, "total"}. Without the caching
    allocator's reserve (see allocator_reserve_bytes).

    The peak is the largest of three moments: the prefill's last layer (cache of the
    prompt, activations of every prompt token), the prefill's logits (with, on a CPU
    whose 16-bit LM head copies its weights, the copies on top of the prefill's peak),
    and the last decode step (full cache, one layer's keys made anew, the step's
    logits). A CPU plan in 16 bits runs head_copies_per_row once per process and dtype
    (a child process, a few seconds).
    """
    d = _dims(model)
    eb = _dtype_bytes(dtype)
    seq = prompt_tokens + max_new_tokens - 1          # the last token is never fed back
    kv_final = kv_cache_bytes(d, dtype, rows, seq)
    kv_prompt = kv_cache_bytes(d, dtype, rows, prompt_tokens)
    per_token = max(PREFILL_PER_HIDDEN * d.hidden + PREFILL_PER_INTERMEDIATE * d.intermediate,
                    3 * d.hidden + 6 * d.heads * d.head_dim + 2 * d.kv_heads * d.head_dim)
    prefill = (kv_prompt + rows * prompt_tokens * per_token * eb
               + rows * prompt_tokens * prompt_tokens)   # the boolean attention mask
    logits = rows * d.vocab * (eb + LOGIT_COPIES_FP32 * FP32)
    head = kv_prompt + logits
    if device == "cpu" and eb == 2 and prompt_tokens > 1:  # one token: a contiguous slice
        copies = head_copies_per_row(str(dtype).removeprefix("torch."))
        if copies:
            # fresh memory on top of the prefill's peak, at worst all of it: glibc keeps
            # the prefill's freed blocks under its mmap threshold (es_mpi.dist.
            # return_freed_memory) resident in its heap
            head = prefill + logits + round(rows * copies * d.vocab * d.hidden * eb)
    growth = kv_final // max(1, 2 * d.layers)         # one layer's keys, made anew
    decode = kv_final + growth + logits
    peak = max(prefill, head, decode)
    return {"kv_cache": kv_final, "activations": peak - kv_final, "total": peak}


def allocator_reserve_bytes(evaluation_bytes: int, device: str) -> int:
    """What torch's caching allocator holds beyond the evaluation phase's allocations on
    a GPU (0 on the CPU): ALLOCATOR_RESERVE of them."""
    return int(evaluation_bytes * ALLOCATOR_RESERVE) if device == "cuda" else 0


def rows_that_fit(model: Any, dtype: Any, prompt_tokens: int, max_new_tokens: int,
                  budget_bytes: int, device: str = "cuda") -> int:
    """Rows per generate call whose KV cache and activations fit in `budget_bytes`.

    `model`: a transformers config (as `model.config`), a Shape or Dims; `dtype`: the
    replica's (torch.bfloat16 or 'bfloat16'); tokens: the longest prompt (training or
    held-out) and the new tokens. Every term of generate_bytes grows linearly with the
    rows, so this is the budget over one row's bytes, and at least 1 (a single row is
    always attempted). On cuda a row also costs the allocator's reserve: the budget is
    divided by 1 + ALLOCATOR_RESERVE.
    """
    one_row = generate_bytes(model, dtype, 1, prompt_tokens, max_new_tokens, device)["total"]
    one_row += allocator_reserve_bytes(one_row, device)
    return max(1, int(budget_bytes // max(1, one_row)))


def members_per_call(rows: int, prompts: int, population: int) -> int:
    """member_batch 0 (auto): the members whose prompts fill one generate call of `rows`
    rows, at least 1 and at most the population; the engine and the plan both use it."""
    return max(1, min(population, rows // prompts))
