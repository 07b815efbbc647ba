"""Peak memory of a rank: what the CUDA caching allocator reserved at its peak on GPUs (the
memory other work on the GPU can no longer have, above the bytes it handed out), the
process's peak RSS on the CPU.

Both can be reset, so the peak of one phase (a generation's evaluation, its update, a
model load) is measured on its own.
"""

from __future__ import annotations

import os
import resource

import torch


def rss_bytes() -> int:
    """The process's resident memory now."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _proc_bytes(path: str, key: str) -> int | None:
    """A "Key:  N kB" line of a Linux /proc file, in bytes; None where there is none."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def host_available_bytes() -> int:
    """Bytes of host memory available to new allocations now (Linux MemAvailable), or the
    machine's total where /proc/meminfo cannot be read."""
    available = _proc_bytes("/proc/meminfo", "MemAvailable")
    if available is None:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return available


def peak_rss_bytes() -> int:
    """The process's peak RSS since start or since the last reset_peak_rss()."""
    peak = _proc_bytes("/proc/self/status", "VmHWM")
    if peak is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
    except OSError:
        pass


def peak_bytes(devices: list[torch.device]) -> int:
    """Peak memory since the last reset_peak(): the largest over the CUDA devices of
    what torch's caching allocator reserved, or the process's peak RSS on the CPU."""
    cuda = [d for d in devices if d.type == "cuda"]
    if cuda:
        return max(torch.cuda.max_memory_reserved(d) for d in cuda)
    return peak_rss_bytes()


def reset_peak(devices: list[torch.device]) -> None:
    cuda = [d for d in devices if d.type == "cuda"]
    for d in cuda:
        torch.cuda.reset_peak_memory_stats(d)
    if not cuda:
        reset_peak_rss()


def sync(devices: list[torch.device]) -> None:
    """Wait for the devices' queued work, so a timer read next measures it (CUDA runs
    asynchronously: without this, work is booked under whatever phase waits for it)."""
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)
