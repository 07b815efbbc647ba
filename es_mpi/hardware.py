"""What a rank computes on, recorded in the run file so a run can say where it came from.

The arithmetic of an update (noise drawn on a GPU, GEMM kernels) can depend on the
device model and on the torch and CUDA versions, so a replay elsewhere may not give the
same bits. The record lets resume and replay name both machines when that happens.
"""

from __future__ import annotations

import platform

import torch

from es_mpi.errors import EsError

# what decides the bits of an update; transformers only shapes rewards, which are logged
ARITHMETIC = ("device", "gpu", "torch", "cuda")


def describe(devices: list[torch.device], dtype: torch.dtype) -> dict:
    """This rank's machine: device kind, GPU model and count, library versions, dtype."""
    import transformers

    gpus = [d for d in devices if d.type == "cuda"]
    return {
        "device": "cuda" if gpus else "cpu",
        "gpu": torch.cuda.get_device_name(gpus[0]) if gpus else "",
        "gpus_per_rank": len(gpus),
        "cpu": _cpu_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": (torch.version.cuda or "") if gpus else "",
        "python": platform.python_version(),
        "dtype": str(dtype).removeprefix("torch."),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def label(hw: dict) -> str:
    """One line naming a machine, e.g. 'NVIDIA H200 (CUDA 13.0, torch 2.11.0)'."""
    if hw.get("device") == "cuda":
        return f"{hw.get('gpu', '?')} (CUDA {hw.get('cuda', '?')}, torch {hw.get('torch', '?')})"
    return f"CPU {hw.get('cpu', '?')} (torch {hw.get('torch', '?')})"


def same_arithmetic(a: dict | None, b: dict | None) -> bool:
    """Whether two machines compute an update with the same kernels (unknown: assume so)."""
    if not a or not b:
        return True
    return all(a.get(k) == b.get(k) for k in ARITHMETIC)


def check_uniform(all_ranks: list[dict]) -> None:
    """Every rank of a job must compute alike: a GPU's noise and kernels follow its model,
    so a job mixing GPU models (or CPU and GPU ranks) would diverge after one update."""
    first = all_ranks[0]
    for rank, hw in enumerate(all_ranks):
        if not same_arithmetic(first, hw):
            raise EsError(f"rank {rank} computes on {label(hw)} but rank 0 on {label(first)}; "
                          "replicas on different devices or library versions drift apart: "
                          "run a job on one GPU model and one software stack")
