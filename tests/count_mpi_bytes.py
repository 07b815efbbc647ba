"""`python count_mpi_bytes.py ARGS` under mpiexec: `es-mpi ARGS` on this rank, with every
byte its communicator moves counted outside es-mpi.

MPI.COMM_WORLD is swapped for a counting proxy before es_mpi imports mpi4py, so every
call es-mpi makes on it passes through here, whatever method or collective it uses:
buffer methods (Allgather, Bcast, Send, ...) count their send and receive buffers,
pickle-based ones (bcast, allgather, send, ...) the pickled object and result. At exit the
rank prints one line: COUNTED {"rank": r, "sent": ..., "received": ..., "calls": {...}}.
"""

from __future__ import annotations

import atexit
import json
import pickle
import sys

import numpy as np
from mpi4py import MPI


def _nbytes(buf) -> int:
    if isinstance(buf, list | tuple):  # [buffer, (counts, displs), datatype]
        buf = buf[0]
    return memoryview(np.ascontiguousarray(buf)).nbytes


def _pickled(obj) -> int:
    return len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


class Counting:
    def __init__(self, comm):
        self._comm = comm
        self.sent = self.received = 0
        self.calls: dict[str, int] = {}

    def __getattr__(self, name):
        attr = getattr(self._comm, name)
        if not callable(attr) or name.startswith("Get_") or name in ("Split_type", "Free"):
            return attr

        def call(*args, **kw):
            self.calls[name] = self.calls.get(name, 0) + 1
            buffers = name[0].isupper()
            if args:
                self.sent += _nbytes(args[0]) if buffers else _pickled(args[0])
            if buffers and len(args) >= 2:
                self.received += _nbytes(args[1])
            result = attr(*args, **kw)
            if not buffers and result is not None:
                self.received += _pickled(result)
            return result
        return call


counting = Counting(MPI.COMM_WORLD)
MPI.COMM_WORLD = counting
atexit.register(lambda: print("COUNTED " + json.dumps({
    "rank": counting._comm.Get_rank(), "sent": counting.sent, "received": counting.received,
    "calls": counting.calls}), flush=True))

from es_mpi.cli import cli  # after the swap: es_mpi must see the proxy

cli.main(sys.argv[1:], standalone_mode=False)
