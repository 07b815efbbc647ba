"""The base model's weights (theta_0) read tensor by tensor from its safetensors files.

Rank 0 needs theta_0 only when it writes a checkpoint delta. Holding a copy would cost
one more model in memory, so it is read from the model directory on demand instead:
plain reads at the offsets in the safetensors header (no mmap, so nothing stays in the
process's memory). A tensor whose file copy does not reproduce the loaded parameter bit
for bit (renamed keys, .bin weights) is held in memory instead, so deltas stay exact.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from es_mpi.runfile import ROW_BLOCK, as_rows

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16}


def _index(model_dir: Path) -> dict[str, tuple[Path, torch.dtype, list[int], int, int]]:
    """key -> (file, dtype, shape, start, end) over every *.safetensors file of the dir."""
    index = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with path.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for key, meta in header.items():
            if key == "__metadata__" or meta["dtype"] not in _DTYPES:
                continue
            start, end = meta["data_offsets"]
            index[key] = (path, _DTYPES[meta["dtype"]], meta["shape"], 8 + size + start,
                          8 + size + end)
    return index


class BaseWeights(Mapping):
    """name -> theta_0 as an fp32 CPU tensor, for the parameters given at construction."""

    def __init__(self, model_dir: str, params: Mapping[str, torch.Tensor]):
        index = _index(Path(model_dir))
        self._where: dict[str, tuple] = {}
        self._dtype = {name: p.dtype for name, p in params.items()}
        self._held: dict[str, torch.Tensor] = {}
        self._names = list(params)
        for name, p in params.items():
            entry = index.get(name)
            if entry is not None and list(p.shape) == entry[2] and p.dim():
                self._where[name] = entry
                if self._same(name, p):
                    continue
                del self._where[name]
            self._held[name] = p.detach().to("cpu", torch.float32, copy=True)

    def _same(self, name: str, p: torch.Tensor) -> bool:
        """Whether the file reproduces the loaded parameter bit for bit (read in blocks)."""
        flat = as_rows(p.detach())
        step = max(1, ROW_BLOCK // max(1, flat.shape[1]))
        for r0 in range(0, flat.shape[0], step):
            part = self._read(name, r0, r0 + step).to(p.dtype).reshape(-1, flat.shape[1])
            if not torch.equal(part, flat[r0:r0 + step].cpu()):
                return False
        return True

    @property
    def held_bytes(self) -> int:
        """Bytes kept in memory (tensors that could not be read back from the files)."""
        return sum(t.numel() * t.element_size() for t in self._held.values())

    def _read(self, name: str, r0: int = 0, r1: int | None = None) -> torch.Tensor:
        """Rows r0..r1 (first axis) of a tensor as stored, or all of it."""
        path, dtype, shape, start, end = self._where[name]
        row_bytes = (end - start) // shape[0] if shape else end - start
        stop = end if r1 is None or not shape else min(end, start + r1 * row_bytes)
        start += r0 * row_bytes if shape else 0
        buf = bytearray(max(0, stop - start))
        with path.open("rb", buffering=0) as fh:
            fh.seek(start)
            view = memoryview(buf)
            while view:
                n = fh.readinto(view)
                if not n:
                    raise OSError(f"{path}: short read of tensor {name}")
                view = view[n:]
        if r1 is None:
            return torch.frombuffer(buf, dtype=dtype).reshape(shape)
        return torch.frombuffer(buf, dtype=dtype).reshape(-1, *shape[1:]) if shape else \
            torch.frombuffer(buf, dtype=dtype)

    def rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows r0..r1 of theta_0[name] as fp32, shaped (rows, rest flattened)."""
        if name in self._held:
            return as_rows(self._held[name])[r0:r1]
        part = self._read(name, r0, r1).to(self._dtype[name]).to(torch.float32)
        return part.reshape(part.shape[0], -1)  # only tensors with a first axis are read

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._held:
            return self._held[name]
        if name not in self._where:
            raise KeyError(name)
        # as the fp32 master was made: from the loaded parameter's dtype
        return self._read(name).to(self._dtype[name]).to(torch.float32)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
