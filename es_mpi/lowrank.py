"""Lowrank mode (EGGROLL): a whole population in one batched forward pass.

Member i perturbs each weight matrix W by sigma * A_i B_i^T / sqrt(r), with A_i, B_i thin
factors for W in the layout it is stored in. Instead of writing that into W, the
module's forward is wrapped for the block: it adds the term to the module's output for
the rows of member i:

    Linear     W (out x in)   y = x W^T + b   ->  y + sigma/sqrt(r) * (x B_i) A_i^T
    Conv1D     W (in x out)   y = x W + b     ->  y + sigma/sqrt(r) * (x A_i) B_i^T
    Embedding  W (vocab x d)  e = W[ids]      ->  e + sigma/sqrt(r) * A_i[ids] B_i^T
    scaled     W (vocab x d)  e = W[ids] * s  ->  e + s * sigma/sqrt(r) * A_i[ids] B_i^T

(Conv1D is transformers' GPT-2-family layer, weight stored transposed; a scaled
embedding, e.g. Gemma 3's, multiplies its output by a constant.) Those are the only
layouts this module knows: any other module holding a weight of two or more dimensions
(a subclass that changes its forward, a quantized layer, a fused expert tensor) is refused
by name, so nothing is ever skipped silently. Norms and biases (1-D) stay frozen.

The batch is member-major (member 0's prompts, then member 1's, ...), so member k's rows
are the k-th block of a (members, rows per member, ...) view: each wrapper multiplies each
member's block by that member's factors only (one batched product per side, r*(in + out)
multiply-adds per row) and adds the result into the module's output in place. The
weights stay untouched: every member and every prompt share one `generate` call, and a
micro-batch holds whole members or part of one (`Rows.select`). Tied weights (an
embedding reused as the LM head) are one parameter, so both uses get the same factors,
as the materialized W + sigma A B^T / sqrt(r) would.
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
class Reader:
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


def _reader(module: torch.nn.Module) -> Reader | None:
    """How `module` reads its `weight`, or None where this module cannot say exactly."""
    if _plain(module, torch.nn.Linear):
        return Reader(module, LINEAR)
    conv1d = _conv1d_class()
    if conv1d is not None and _plain(module, conv1d):
        return Reader(module, CONV1D)
    if isinstance(module, torch.nn.Embedding) and module.max_norm is None:
        if _plain(module, torch.nn.Embedding):
            return Reader(module, EMBEDDING)
        scale = _embedding_scale(module)
        if scale is not None:
            return Reader(module, EMBEDDING, scale)
    return None


def perturbed_matrices(model: torch.nn.Module) -> dict[str, list[Reader]]:
    """Parameter name -> the modules that read it as a matrix, in model order.

    Raises EsError naming every parameter of two or more dimensions that is not the
    weight of a layout this module knows (see the module docstring): lowrank mode would
    otherwise leave it untouched without a word.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    found: dict[str, list[Reader]] = {}
    refused: dict[str, str] = {}
    for module in model.modules():
        for attr, p in module.named_parameters(recurse=False):
            name = names.get(id(p))
            if name is None or p.dim() < 2:
                continue
            use = _reader(module) if attr == "weight" and p.dim() == 2 else None
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


def _dense(t: torch.Tensor) -> torch.Tensor:
    """A row-major copy with the canonical strides even along dimensions of size 1
    (`contiguous()` keeps any stride there): at r = 1 a factor viewed with a stride of 1
    on both inner dimensions sends bmm down a path about 10x slower."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


class _GroupFactors:
    """One matrix's factors for every member of the group, per member, as the wrappers use
    them (members is the first dimension, so a window of members is a view):

        in_side  (M, r, in)   the input side: rows of a Linear's B, a Conv1D's A, or for
                           an Embedding the (M, vocab, r) table its ids index
        out_side  (M, r, out)  the output side, already times the member's sign*sigma/sqrt(r)

    `window` is what the wrapper needs for the rows the forward passes now see: (members,
    rows, the input side as the wrapper multiplies it, out_side, an Embedding's table offsets)."""

    def __init__(self, use: Reader, a: torch.Tensor, b: torch.Tensor, coef: torch.Tensor):
        # a, b: (M, W's first dim, r), (M, W's second dim, r); coef: (M,)
        if use.layout == EMBEDDING:   # e = W[ids] * s: rows of A picked by the ids, against B
            in_side, out_side = a, b * use.scale if use.scale != 1.0 else b
        elif use.layout == CONV1D:    # y = x W, W (in x out): x (A B^T) = (x A) B^T
            in_side, out_side = a.transpose(1, 2), b
        else:                         # y = x W^T, W (out x in): x (A B^T)^T = (x B) A^T
            in_side, out_side = b.transpose(1, 2), a
        self.use = use
        self.in_side = _dense(in_side)
        self.out_side = _dense((out_side * coef.view(-1, 1, 1)).transpose(1, 2))
        self.window: tuple = ()

    def select(self, m0: int, m1: int, rows: int) -> None:
        in_side = self.in_side[m0:m1]
        if self.use.layout == EMBEDDING:  # member k's ids index the k-th table of the window
            offsets = torch.arange(m1 - m0, device=in_side.device).view(-1, 1) * in_side.shape[1]
            self.window = (m1 - m0, rows, in_side.reshape(-1, in_side.shape[-1]),
                           self.out_side[m0:m1], offsets)
        else:
            self.window = (m1 - m0, rows, in_side.transpose(1, 2), self.out_side[m0:m1], None)


def _forward(f: _GroupFactors, forward):
    """`forward` (the module's own) plus each row's own member's term: per member one thin
    product with the input side and one with the output side (the batch is member-major,
    so member k's rows are the k-th block of a view), added into the output in place:
    r*(in + out) multiply-adds per row.

    It replaces the module's forward for the block rather than hooking it (a module with
    a forward hook takes torch's slower call path), and it takes the input-side product
    before the module's own product: the weight's GEMM streams the weights through the
    caches, and a small op right after it runs cold (what the two saved per decode step
    is measured in docs/speed.md, with tools/lowrank_step.py)."""
    device = f.out_side.device
    embedding, outer = f.use.layout == EMBEDDING, f.out_side.shape[1] == 1

    def perturbed(*args, **kwargs):
        members, rows, in_side, out_side, offsets = f.window
        x = args[0] if args else next(iter(kwargs.values()))
        if x.device != device:  # a replica split across devices: accelerate moves the
            x = x.to(device)    # input inside its own forward, so this sees it where it was
        if x.shape[0] != rows:
            return _shared(f, x, forward(*args, **kwargs))
        if embedding:  # one lookup in the window's tables, stacked
            low = torch.nn.functional.embedding(x.reshape(members, -1) + offsets, in_side)
        else:
            low = torch.bmm(x.reshape(members, -1, x.shape[-1]), in_side)
        output = forward(*args, **kwargs)
        # in place: the module's output is a fresh tensor that nothing else holds yet
        out = output.view(members, -1, output.shape[-1])
        if outer:  # rank 1: an outer product per member, cheaper as an elementwise op
            out.addcmul_(low, out_side)
        else:
            out.baddbmm_(low, out_side)
        return output
    return perturbed


def _linear(module: torch.nn.Linear):
    """A plain Linear's forward with its parameters looked up once (nn.Module's attribute
    lookup and the bound method's frame are a measurable share of a decode step's
    overhead across hundreds of matrices)."""
    weight, bias, linear = module.weight, module.bias, torch.nn.functional.linear

    def forward(input: torch.Tensor) -> torch.Tensor:  # nn.Linear's signature
        return linear(input, weight, bias)
    return forward


def _shared(f: _GroupFactors, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """An output of one row shared by every row of the batch (position embeddings of
    (1, seq)): each member's term, repeated over its rows, on a new tensor."""
    members, rows, in_side, out_side, offsets = f.window
    if output.shape[0] != 1 or rows == 1:
        raise RuntimeError(f"lowrank: a batch of {output.shape[0]} rows where "
                           f"{rows} (members x prompts) were expected")
    x = x.expand(members, *x.shape[1:])
    if offsets is not None:
        low = torch.nn.functional.embedding(x.reshape(members, -1) + offsets, in_side)
    else:
        low = torch.bmm(x.reshape(members, -1, x.shape[-1]), in_side)
    term = torch.bmm(low, out_side).repeat_interleave(rows // members, dim=0)
    return output + term.view(rows, *output.shape[1:])


class Rows:
    """Which rows of the population's batch the forward passes now see (micro-batches):
    whole members, or a part of one member's rows."""

    def __init__(self, factors: list[_GroupFactors], rows: int, members: int):
        self._factors, self._rows, self._members = factors, rows, members
        self.select(0, rows)

    def select(self, r0: int, r1: int) -> None:
        """The next forward passes hold rows r0..r1-1 of the members x prompts batch,
        which are whole members' rows or a part of one member's (`unit` of
        es_mpi.model.generate_rows)."""
        per = self._rows // self._members
        if r0 % per == 0 and (r1 % per == 0 or r1 == self._rows):
            m0, m1 = r0 // per, -(-r1 // per)
        elif r0 // per == (r1 - 1) // per:
            m0, m1 = r0 // per, r0 // per + 1
        else:
            raise ValueError(f"rows {r0}..{r1 - 1} hold parts of several members "
                             f"({per} rows each)")
        for f in self._factors:
            f.select(m0, m1, r1 - r0)


@contextlib.contextmanager
def population(matrices: dict[str, list[Reader]], master: dict[str, torch.Tensor],
               noise: LowRankNoise, seeds: list[int], signs: list[int],
               sigma: float, rows: int) -> Iterator[Rows]:
    """Within the block, batch rows [k*P, (k+1)*P) of any forward pass see member k's
    perturbed weights (seeds[k], signs[k]), for P = rows // len(seeds); `rows` is the
    batch size of the forward passes (members x prompts). The block gets a `Rows`: its
    `select(r0, r1)` runs the next passes on rows r0..r1-1 only (a micro-batch of whole
    members, or a part of one member's rows); each row still sees its own member's
    weights."""
    if rows % len(seeds):
        raise ValueError(f"{rows} rows do not split into {len(seeds)} members")
    replaced: list[tuple[torch.nn.Module, object]] = []  # module, its own instance forward
    factors: list[_GroupFactors] = []
    held: list[torch.Tensor] = []  # pinned draws, alive until the block's passes ran
    try:
        for name, uses in matrices.items():
            theta = master[name]
            weight = uses[0].module.weight
            # one draw per distinct seed, on the host (kept for the update where the
            # evaluator asked, LowRankNoise.keep_draws); pinned for a GPU, so that the
            # copy below does not block
            cuda = weight.device.type == "cuda"
            ab = noise.draws(seeds, name, theta.shape, pin=cuda)
            held.append(ab)
            ab = ab.to(weight.device, weight.dtype, non_blocking=cuda)
            a, b = ab[:, :theta.shape[0]], ab[:, theta.shape[0]:]  # _GroupFactors copies them
            coef = torch.tensor([sign * sigma * noise.scale for sign in signs],
                                dtype=weight.dtype, device=weight.device)
            for use in uses:
                f = _GroupFactors(use, a, b, coef)
                factors.append(f)
                module = use.module
                # an instance forward already there (accelerate's device hooks) is wrapped
                own = module.__dict__.get("forward")
                replaced.append((module, own))
                module.forward = _forward(f, module.forward if own is not None or
                                          use.layout != LINEAR else _linear(module))
        yield Rows(factors, rows, len(seeds))
    finally:
        for module, own in reversed(replaced):
            if own is None:
                del module.forward
            else:
                module.forward = own
