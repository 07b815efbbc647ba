"""What a rank computes on: its GPUs (or the CPU), the replica dtype, how a model is laid
over the devices, what decides the bits of its arithmetic, and its memory budget.

Binding. Every rank lists the GPUs it can see by UUID and all ranks exchange the lists
(one allgather at start-up). Ranks that see the same GPUs, on one host, share them out by
their order: the k GPUs after those of the ranks before them (`mpiexec` shows every rank
all the node's GPUs). A rank that sees GPUs no one else sees takes its first k (`srun
--gpus-per-task` or `--gpu-bind` binds each rank to its own). The result is then checked
the same way on every rank: two ranks on one GPU is one error line, unless the run asks
for it (`share_gpus`), so a launcher that did not bind is never silently doubled up.
This reads the devices themselves, not `visible == k`, which cannot tell "the launcher
bound me to k GPUs" from "this node has only k".

Identity. A replay elsewhere must reproduce a run's bits or say why not; what decides the
bits is recorded: on a GPU its compute capability, its number of SMs (an H100 SXM has
132, a PCIe card 114, a MIG slice fewer) and whether it is a MIG slice; on the CPU the
instruction set that torch's kernels dispatch on. TF32 is pinned off for the run
(`pin_arithmetic`), so nothing a user's code set changes fp32 matmuls.
"""

from __future__ import annotations

import contextlib
import platform
import socket
from collections.abc import Sequence

import torch

from es_mpi.config import DTYPE_NAMES
from es_mpi.errors import EsError

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}

# what decides the bits of an update or a reward (transformers only shapes rewards, which
# are logged); a key that one of two records lacks (an older run file) is not compared
ARITHMETIC = ("device", "gpu", "torch", "cuda", "capability", "sms", "mig", "cpu_isa")

# the CPU features that select other kernels (/proc/cpuinfo flags; torch dispatches on
# its own capability level, recorded apart, and oneDNN on these)
_CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile",
                 "amx_bf16", "amx_fp16")


# -- binding ----------------------------------------------------------------------------------

def visible_gpus() -> list[str]:
    """UUIDs of the CUDA devices this process sees, in torch's index order ([] without
    CUDA). A MIG slice has its own UUID."""
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        uuid = getattr(torch.cuda.get_device_properties(i), "uuid", None)
        out.append(str(uuid) if uuid is not None else f"{socket.gethostname()}:cuda:{i}")
    return out


def assign(seen: Sequence[tuple[str, Sequence[str]]], gpus_per_rank: int,
           share: bool = False) -> list[list[int]]:
    """Every rank's GPU indices (into its own visible list), from every rank's (host,
    visible GPU UUIDs), in rank order. Pure: the same answer on every rank.

    Ranks that see the same GPUs on one host take them k at a time in rank order; with
    `share`, ranks beyond the GPUs wrap around onto them. Raises EsError (the same on
    every rank) where a rank lacks GPUs or two ranks would share one unasked.
    """
    k = gpus_per_rank
    blind = [(r, h) for r, (h, u) in enumerate(seen) if not u]
    if blind:
        raise EsError(f"rank {blind[0][0]} on {blind[0][1]} sees no GPU while other ranks "
                      "do; a job computes on one kind of device: give every rank its GPUs "
                      "(or hide them from all: CUDA_VISIBLE_DEVICES=)")
    out: list[list[int]] = []
    for rank, (host, uuids) in enumerate(seen):
        peers = [r for r, (h, u) in enumerate(seen) if h == host and tuple(u) == tuple(uuids)]
        first = peers.index(rank) * k
        if len(uuids) < k:
            raise EsError(f"rank {rank} on {host} sees {len(uuids)} GPU(s) and needs "
                          f"{k} (--gpus-per-rank {k}); lower --gpus-per-rank or give each "
                          "rank more GPUs")
        if first + k > len(uuids):
            if not share:
                raise EsError(
                    f"{len(peers)} ranks on {host} share its {len(uuids)} visible GPU(s) at "
                    f"{k} per rank: rank {rank} has none left; start at most "
                    f"{len(uuids) // k} rank(s) per node, lower --gpus-per-rank, or pass "
                    "--share-gpus to put several ranks on one GPU on purpose")
            first %= len(uuids) // k * k
        out.append(list(range(first, first + k)))
    if not share:
        owner: dict[str, int] = {}
        for rank, ((host, uuids), mine) in enumerate(zip(seen, out, strict=True)):
            for i in mine:
                other = owner.setdefault(uuids[i], rank)
                if other != rank:
                    raise EsError(
                        f"ranks {other} and {rank} on {host} would both compute on GPU "
                        f"{uuids[i]}: the launcher gave them overlapping GPUs; bind one set "
                        "per rank (srun --gpus-per-task, or CUDA_VISIBLE_DEVICES per rank), "
                        "or pass --share-gpus to share on purpose")
    return out


def bind(dist, gpus_per_rank: int, share: bool = False) -> list[torch.device]:
    """Collective: this rank's devices, k GPUs (see the module docstring) or the CPU where
    no rank has CUDA. Every rank raises alike on a bad binding."""
    mine = visible_gpus()
    seen = dist.allgather((socket.gethostname(), mine))
    if not any(uuids for _, uuids in seen):
        return [torch.device("cpu")]
    indices = assign(seen, gpus_per_rank, share)[dist.rank]
    devices = [torch.device("cuda", i) for i in indices]
    torch.cuda.set_device(devices[0])
    return devices


# -- dtype and layout ----------------------------------------------------------------------------

def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The replica dtype: `auto` is bfloat16 on a GPU and float32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def load_kwargs(devices: Sequence[torch.device]) -> dict:
    """from_pretrained's placement arguments: nothing on the CPU (load there); one GPU by
    index, straight onto it tensor by tensor (no whole host copy per rank); several GPUs
    balanced by their free memory. Never the CPU beside GPUs: accelerate would offload
    those layers (parameters on `meta`), and a replica is computed where it lives."""
    gpus = [d for d in devices if d.type == "cuda"]
    if not gpus:
        return {}
    if len(gpus) != len(devices):
        raise EsError("a replica lives on its GPUs or on the CPU, not on both")
    index = [d.index if d.index is not None else torch.cuda.current_device() for d in gpus]
    if len(index) == 1:
        return {"device_map": {"": index[0]}}
    free = {i: torch.cuda.mem_get_info(i)[0] for i in index}
    return {"device_map": "balanced", "max_memory": {i: int(b * 0.9) for i, b in free.items()}}


# -- arithmetic and identity ----------------------------------------------------------------

def pin_arithmetic() -> None:
    """fp32 matmuls in full fp32 for the run: TF32 off, whatever a user's code set
    (torch.set_float32_matmul_precision('high') would change the bits of fp32 work)."""
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def describe(devices: Sequence[torch.device], dtype: torch.dtype) -> dict:
    """This rank's machine: what decides the bits (ARITHMETIC), names and versions."""
    import transformers

    gpus = [d for d in devices if d.type == "cuda"]
    out = {
        "device": "cuda" if gpus else "cpu",
        "gpu": "", "gpus_per_rank": len(gpus),
        "cpu": _cpu_name(), "cpu_isa": cpu_isa(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "cuda": (torch.version.cuda or "") if gpus else "",
        "python": platform.python_version(), "dtype": dtype_name(dtype),
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
    }
    if gpus:
        props = torch.cuda.get_device_properties(gpus[0])
        uuids = visible_gpus()
        first = gpus[0].index if gpus[0].index is not None else torch.cuda.current_device()
        out.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   sms=int(props.multi_processor_count),
                   mig=bool(uuids) and uuids[first].startswith("MIG-"),
                   gpu_memory=int(props.total_memory))
    return out


def cpu_isa() -> str:
    """The CPU instruction set torch's kernels dispatch on (e.g. 'AVX512'), and the
    features oneDNN's 16-bit kernels choose by ('avx512_bf16', 'amx_bf16', ...)."""
    level = "?"
    with contextlib.suppress(AttributeError, RuntimeError):
        level = torch.backends.cpu.get_cpu_capability()
    flags = set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return " ".join([level, *[f for f in _CPU_FEATURES if f in flags]])


def _cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def label(hw: dict) -> str:
    """One line naming a machine, e.g. 'NVIDIA H100 (sm 9.0, 132 SMs, CUDA 12.8, torch 2.8)'."""
    if hw.get("device") == "cuda":
        detail = ""
        if hw.get("capability"):
            detail = f"sm {hw['capability']}, {hw.get('sms', '?')} SMs, "
            if hw.get("mig"):
                detail += "MIG slice, "
        return (f"{hw.get('gpu', '?')} ({detail}CUDA {hw.get('cuda', '?')}, "
                f"torch {hw.get('torch', '?')})")
    isa = f", {hw['cpu_isa'].split()[0]}" if hw.get("cpu_isa") else ""
    return f"CPU {hw.get('cpu', '?')} (torch {hw.get('torch', '?')}{isa})"


def same_arithmetic(a: dict | None, b: dict | None) -> bool:
    """Whether two machines compute an update with the same kernels (unknown: assume so;
    a key only one record has, from an older es-mpi, is not compared)."""
    if not a or not b:
        return True
    return all(a.get(k) == b.get(k) for k in ARITHMETIC if k in a and k in b)


def check_uniform(all_ranks: list[dict]) -> None:
    """Every rank of a job must compute alike: a GPU's noise and kernels follow its model,
    so a job mixing GPU models (or CPU and GPU ranks) would diverge after one update."""
    first = all_ranks[0]
    for rank, hw in enumerate(all_ranks):
        if not same_arithmetic(first, hw):
            raise EsError(f"rank {rank} computes on {label(hw)} but rank 0 on {label(first)}; "
                          "replicas on different devices or library versions drift apart: "
                          "run a job on one GPU model and one software stack")


# -- memory ---------------------------------------------------------------------------------

def generation_budget(devices: Sequence[torch.device], ranks_on_node: int) -> int:
    """Bytes one generate call may take, measured after everything resident has loaded.

    GPU: 90% of what the allocator can still hand out on the fullest of the rank's GPUs:
    the driver's free memory plus what torch reserved and does not use now (it serves new
    allocations first). CPU: 80% of the host memory available now, shared by the node's
    ranks. The plan's rows_that_fit then prices what the caching allocator will reserve
    beyond the bytes it hands out (es_mpi.sizing.ALLOCATOR_RESERVE)."""
    from es_mpi import memory

    gpus = [d for d in devices if d.type == "cuda"]
    if gpus:
        for d in gpus:
            torch.cuda.synchronize(d)
        usable = min(torch.cuda.mem_get_info(d)[0] + torch.cuda.memory_reserved(d)
                     - torch.cuda.memory_allocated(d) for d in gpus)
        return int(0.9 * usable)
    return int(0.8 * memory.host_available_bytes() / max(1, ranks_on_node))
