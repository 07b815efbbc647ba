"""Lowrank mode (EGGROLL): a whole population in one batched forward pass.

Member i perturbs each weight matrix W by sigma * A_i B_i^T / sqrt(r), with A_i, B_i thin
factors for W in the layout it is stored in. Instead of writing that into W, a forward
hook adds it to the module's output for the rows of member i:

    Linear     W (out x in)   y = x W^T + b   ->  y + sigma/sqrt(r) * (x B_i) A_i^T
    Conv1D     W (in x out)   y = x W + b     ->  y + sigma/sqrt(r) * (x A_i) B_i^T
    Embedding  W (vocab x d)  e = W[ids]      ->  e + sigma/sqrt(r) * A_i[ids] B_i^T
    scaled     W (vocab x d)  e = W[ids] * s  ->  e + s * sigma/sqrt(r) * A_i[ids] B_i^T

(Conv1D is transformers' GPT-2-family layer, weight stored transposed; a scaled
embedding, e.g. Gemma 3's, multiplies its output by a constant.) Those are the only
layouts this module knows: any other module holding a weight of two or more dimensions
(a subclass that changes its forward, a quantized layer, a fused expert tensor) is refused
by name, so nothing is ever skipped silently. Norms and biases (1-D) stay frozen.

The batch is member-major (member 0's prompts, then member 1's, ...). Each hook does two
thin GEMMs against all members' factors side by side, masked so a row keeps only its own
member's columns. The weights stay untouched: every member and every prompt share one
`generate` call. Tied weights (an embedding reused as the LM head) are one parameter, so
both uses get the same factors, as the materialized W + sigma A B^T / sqrt(r) would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from es_mpi.errors import EsError
from es_mpi.es import LowRankNoise

LINEAR, CONV1D, EMBEDDING = "linear", "conv1d", "embedding"


@dataclass(frozen=True)
class Use:
    """One module that reads a perturbed weight, and how (its layout)."""

    module: torch.nn.Module
    layout: str            # LINEAR, CONV1D or EMBEDDING
    scale: float = 1.0     # a scaled embedding's output factor


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but lowrank on plain torch works too
        return None
    return Conv1D


def _plain(module: torch.nn.Module, base: type) -> bool:
    """`module` is `base` or a subclass that keeps base's forward (so the layout holds)."""
    return isinstance(module, base) and type(module).forward is base.forward


def _embedding_scale(module: torch.nn.Embedding) -> float | None:
    """The constant of an embedding that returns W[ids] * constant (Gemma's scaled word
    embeddings), checked on the module's own weights; None for any other forward."""
    if not type(module).__name__.endswith("ScaledWordEmbedding"):
        return None
    scale = getattr(module, "embed_scale", None)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        if scale.device.type == "meta":  # the skeleton of check_layout: structure only
            return 1.0
        scale = float(scale)
    if not isinstance(scale, float):
        return None
    if module.weight.device.type != "meta":
        ids = torch.arange(min(4, module.num_embeddings), device=module.weight.device)
        with torch.no_grad():
            want = torch.nn.functional.embedding(ids, module.weight) * torch.tensor(
                scale, dtype=module.weight.dtype, device=module.weight.device)
            if not torch.equal(module(ids), want):
                return None
    return scale


def _use(module: torch.nn.Module) -> Use | None:
    """How `module` reads its `weight`, or None where this module cannot say exactly."""
    if _plain(module, torch.nn.Linear):
        return Use(module, LINEAR)
    conv1d = _conv1d_class()
    if conv1d is not None and _plain(module, conv1d):
        return Use(module, CONV1D)
    if isinstance(module, torch.nn.Embedding) and module.max_norm is None:
        if _plain(module, torch.nn.Embedding):
            return Use(module, EMBEDDING)
        scale = _embedding_scale(module)
        if scale is not None:
            return Use(module, EMBEDDING, scale)
    return None


def perturbed_matrices(model: torch.nn.Module) -> dict[str, list[Use]]:
    """Parameter name -> the modules that read it as a matrix, in model order.

    Raises EsError naming every parameter of two or more dimensions that is not the
    weight of a layout this module knows (see the module docstring): lowrank mode would
    otherwise leave it untouched without a word.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    found: dict[str, list[Use]] = {}
    refused: dict[str, str] = {}
    for module in model.modules():
        for attr, p in module.named_parameters(recurse=False):
            name = names.get(id(p))
            if name is None or p.dim() < 2:
                continue
            use = _use(module) if attr == "weight" and p.dim() == 2 else None
            if use is None:
                refused.setdefault(name, type(module).__name__)
            else:
                found.setdefault(name, []).append(use)
    if refused:  # also where a known module shares the weight: that use would be wrong
        shown = ", ".join(f"{n} ({cls})" for n, cls in list(refused.items())[:4])
        more = f" and {len(refused) - 4} more" if len(refused) > 4 else ""
        raise EsError(f"lowrank mode cannot perturb {len(refused)} weight(s) whose layout it "
                      f"does not know: {shown}{more}; it perturbs Linear, Conv1D and "
                      "(scaled) Embedding weights only. Use --mode full")
    return {name: found[name] for name in names.values() if name in found}


def check_layout(model_dir: str) -> None:
    """perturbed_matrices' refusal before any weight loads: on the model's skeleton, built
    from its config on the meta device (no memory, about a second for a 7B model)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    # a model that cannot be built this way is left to the real load to report
    except (OSError, ValueError, TypeError, KeyError, AttributeError, ImportError,
            RuntimeError, NotImplementedError):
        return
    perturbed_matrices(skeleton)


def _row_scales(coef: torch.Tensor, rank: int, rows: int) -> torch.Tensor:
    """(rows, 1, M*r): row k (member k // P) keeps its own member's r columns, scaled
    by sign*sigma/sqrt(r), and zeroes every other member's."""
    members = coef.shape[0]
    own = torch.zeros(members, members * rank, dtype=coef.dtype, device=coef.device)
    for m in range(members):
        own[m, m * rank:(m + 1) * rank] = coef[m]
    return own.repeat_interleave(rows // members, dim=0).unsqueeze(1)


def _hook(use: Use, a: torch.Tensor, b: torch.Tensor, current: dict, key: tuple):
    """a, b: every member's factors side by side, (W's first dim, M*r), (second, M*r).

    Two thin GEMMs: the input against all members' input-side factors (stored (M*r, in),
    contiguous, for F.linear: about twice as fast as `x @ b` on a CPU at decode shapes),
    masked to each row's own member by the row scales, then back through the output-side
    factors into the module's output, in place: M*r*(in + out) extra multiply-adds per row.
    `current[key]` holds the row scales of the rows now in the batch (see population).
    """
    if use.layout == EMBEDDING:   # e = W[ids] * s: the rows of A picked by the ids, against B
        back = (b * use.scale if use.scale != 1.0 else b).T.contiguous()

        def low_of(x):
            return torch.nn.functional.embedding(x, a)
    else:  # Conv1D: y = x W, W (in x out): x (A B^T) = (x A) B^T
        #      Linear: y = x W^T, W (out x in): x (A B^T)^T = (x B) A^T
        into, back = (a, b) if use.layout == CONV1D else (b, a)
        into, back = into.T.contiguous(), back.T.contiguous()

        def low_of(x):
            return torch.nn.functional.linear(x, into)
    device = back.device

    def hook(module, inputs, output):
        scales = current[key]
        rows = scales.shape[0]
        x = inputs[0]
        if x.device != device:  # a replica split across devices: accelerate moves the
            x = x.to(device)    # input inside forward, so a hook sees it where it was
        low = low_of(x)
        if output.shape[0] == rows:
            low *= scales
            # in place: the module's output is a fresh tensor that nothing else holds yet
            output.view(-1, output.shape[-1]).addmm_(low.view(-1, low.shape[-1]), back)
            return output
        if output.shape[0] == 1:  # shared by every row (position embeddings of (1, seq))
            return output + (low * scales) @ back
        raise RuntimeError(f"lowrank: a batch of {output.shape[0]} rows where "
                           f"{rows} (members x prompts) were expected")
    return hook


class Rows:
    """Which rows of the population's batch the forward passes now see (micro-batches)."""

    def __init__(self, scales_of: dict[tuple, torch.Tensor], current: dict[tuple, torch.Tensor]):
        self._all = scales_of
        self._current = current
        self.select(0, next(iter(scales_of.values())).shape[0] if scales_of else 0)

    def select(self, r0: int, r1: int) -> None:
        """The next forward passes hold rows r0..r1-1 of the members x prompts batch."""
        for key, scales in self._all.items():
            self._current[key] = scales[r0:r1]


@contextlib.contextmanager
def population(matrices: dict[str, list[Use]], master: dict[str, torch.Tensor],
               noise: LowRankNoise, seeds: list[int], signs: list[int],
               sigma: float, rows: int) -> Iterator[Rows]:
    """Within the block, batch rows [k*P, (k+1)*P) of any forward pass see member k's
    perturbed weights (seeds[k], signs[k]), for P = rows // len(seeds); `rows` is the
    batch size of the forward passes (members x prompts). The block gets a `Rows`: its
    `select(r0, r1)` runs the next passes on rows r0..r1-1 only (a micro-batch); each
    row still sees its own member's weights."""
    if rows % len(seeds):
        raise ValueError(f"{rows} rows do not split into {len(seeds)} members")
    handles = []
    scales_of: dict[tuple, torch.Tensor] = {}  # the row scales of a (device, dtype): one copy
    current: dict[tuple, torch.Tensor] = {}    # those of the rows in the batch now
    try:
        for name, uses in matrices.items():
            theta = master[name]
            weight = uses[0].module.weight
            pairs = [noise.factors(seed, name, theta, "cpu") for seed in seeds]
            a = torch.cat([a for a, _ in pairs], dim=1).to(weight.device, weight.dtype)
            b = torch.cat([b for _, b in pairs], dim=1).to(weight.device, weight.dtype)
            key = (weight.device, weight.dtype)
            if key not in scales_of:
                coef = torch.tensor([sign * sigma * noise.scale for sign in signs],
                                    dtype=weight.dtype, device=weight.device)
                scales_of[key] = _row_scales(coef, noise.rank, rows)
            for use in uses:
                handles.append(use.module.register_forward_hook(
                    _hook(use, a, b, current, key)))
        yield Rows(scales_of, current)
    finally:
        for handle in handles:
            handle.remove()
