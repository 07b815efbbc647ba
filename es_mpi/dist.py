"""The MPI layer: the only module that imports mpi4py.

Ranks exchange seeds and scalars only. `Dist` wraps COMM_WORLD with the few collectives
the loop needs; without mpi4py (or its MPI library) a serial stand-in serves world size 1.
Per-rank thread counts are decided here too; rank -> GPU binding is es_mpi.devices.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from es_mpi.errors import EsError
from es_mpi.stop import Stopped

T = TypeVar("T")

_LAUNCHER_VARS = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


class Dist:
    """Rank, size, local rank and the collectives of one MPI job (or a serial stand-in)."""

    def __init__(self, serial: bool = False) -> None:
        self.comm = None
        self.rank, self.size, self.local_rank, self.local_size = 0, 1, 0, 1
        self.bytes_moved = 0  # sent + received by this rank in allgather_rows/allgather_ints
        if serial:
            return
        try:
            from mpi4py import MPI
        except (ImportError, RuntimeError) as exc:
            if any(v in os.environ for v in _LAUNCHER_VARS):
                raise EsError(f"launched under MPI but mpi4py cannot load ({exc}); install "
                              "mpi4py against this MPI (pip install mpi4py) or es-mpi[mpich]"
                              ) from None
            return
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = node.Get_rank()
        self.local_size = node.Get_size()
        node.Free()

    @classmethod
    def serial(cls) -> Dist:
        """A world of one, whatever the launcher (for work that rank 0 does alone)."""
        return cls(serial=True)

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def print0(self, *args: Any, **kw: Any) -> None:
        if self.rank == 0:
            print(*args, **kw, flush=True)

    # -- collectives ------------------------------------------------------------------

    def barrier(self) -> None:
        if self.comm is not None:
            self.comm.Barrier()

    def bcast(self, obj: T) -> T:
        return obj if self.comm is None else self.comm.bcast(obj, root=0)

    def allgather(self, obj: T) -> list[T]:
        return [obj] if self.comm is None else self.comm.allgather(obj)

    def allgather_rows(self, rows: np.ndarray, counts: list[int]) -> np.ndarray:
        """Concatenate every rank's structured rows (rank order); counts are known to all."""
        if self.comm is None:
            return rows.copy()
        out = np.empty(sum(counts), dtype=rows.dtype)
        itemsize = rows.dtype.itemsize
        self.bytes_moved += rows.nbytes + out.nbytes
        byte_counts = [c * itemsize for c in counts]
        displs = np.concatenate([[0], np.cumsum(byte_counts)[:-1]]).tolist()
        send = np.ascontiguousarray(rows).view(np.uint8)
        self.comm.Allgatherv([send, self.MPI.BYTE],
                             [out.view(np.uint8), (byte_counts, displs), self.MPI.BYTE])
        return out

    def allgather_ints(self, values: list[int]) -> np.ndarray:
        """Every rank's int64 values as a (size, len(values)) array (buffer-based)."""
        send = np.asarray(values, dtype=np.int64)
        if self.comm is None:
            return send[None, :].copy()
        out = np.empty((self.size, len(values)), dtype=np.int64)
        self.comm.Allgather([send, self.MPI.INT64_T], [out, self.MPI.INT64_T])
        self.bytes_moved += send.nbytes + out.nbytes
        return out

    def root_first(self, fn: Callable[[], T]) -> T | None:
        """Run fn on rank 0 only (its result stays there); an EsError is raised everywhere.

        For checks and writes that only rank 0 makes (the run file, output paths), so all
        ranks stop together instead of waiting forever in the next collective.
        """
        result = None
        error = None
        if self.is_root:
            try:
                result = fn()
            except EsError as exc:
                error = str(exc)
        error = self.bcast(error)
        if error is not None:
            raise EsError(error)
        return result

    def collective(self, fn: Callable[[], T]) -> T:
        """Run fn on every rank; an EsError on any rank is raised on all of them.

        For per-rank work that can fail on some ranks only (a model dir missing on one
        node, too few GPUs on another): nobody is left waiting in a collective.
        """
        result: Any = None
        error = None
        try:
            result = fn()
        except EsError as exc:
            error = str(exc)
        self.agree(error)
        return result

    def agree(self, error: str | None) -> None:
        """Collective: if any rank reports an error, raise the first one on every rank."""
        errors = [e for e in self.allgather(error) if e]
        if errors:
            raise EsError(errors[0])

    def abort(self, code: int = 1) -> None:
        """Kill the whole job (for an unexpected error on one rank: the others would hang)."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.comm is not None and self.size > 1:
            self.comm.Abort(code)
        sys.exit(code)


def run_guarded(dist: Dist, fn: Callable[[], T]) -> T:
    """Run fn; a bug (not an EsError) on any rank prints its traceback and aborts the job."""
    try:
        return fn()
    except SystemExit as exc:
        if dist.size > 1:  # exit() in task code on one rank: the others would wait forever
            sys.stderr.write(f"es-mpi: rank {dist.rank}: exit({exc.code}) called during the "
                             "run; aborting the job\n")
            dist.abort(1)
        raise
    except (EsError, KeyboardInterrupt, Stopped):
        raise
    except Exception:
        sys.stderr.write(f"es-mpi: rank {dist.rank}: unexpected error\n")
        traceback.print_exc()
        dist.abort(1)
        raise


def return_freed_memory() -> None:
    """Have glibc give large freed blocks back to the OS at once.

    By default glibc raises its mmap threshold after the first large free, so later
    blocks of up to 32 MiB (checkpoint blocks, HDF5 buffers) come from a heap that keeps
    freed memory: a checkpoint write then left a rank ~0.7x a model's bytes larger.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB


def set_threads(dist: Dist) -> int:
    """Torch threads per rank: OMP_NUM_THREADS if set, else the cores shared out per node."""
    import torch

    return_freed_memory()
    if os.environ.get("OMP_NUM_THREADS"):
        threads = max(1, int(os.environ["OMP_NUM_THREADS"]))
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = max(1, (cores or 1) // dist.local_size)
    torch.set_num_threads(threads)
    return threads

