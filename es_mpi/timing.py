"""Seconds per phase of a generation, true on a GPU as on the CPU.

CUDA runs kernels asynchronously: without a synchronization, a phase's kernels finish
(and are timed) inside whichever later phase first waits for them. Each phase here ends
with a synchronization of the rank's devices, so its time is its own.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from es_mpi import memory


class PhaseTimer:
    """`with timer("generate"): ...` adds the block's seconds to timer.seconds["generate"]."""

    def __init__(self, devices: list[torch.device]):
        self.devices = devices
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            memory.sync(self.devices)
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def __getitem__(self, phase: str) -> float:
        return self.seconds.get(phase, 0.0)
