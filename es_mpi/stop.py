"""Stopping early on a signal (Slurm's time-limit warning, preemption, Ctrl-C), cleanly.

SIGUSR1, SIGTERM or SIGINT on any rank sets a flag; the loop reads it at safe points:
a rank skips the members it has not evaluated yet (the generation is then abandoned on
every rank: nothing written, no update), and the per-generation status allgather tells
every rank that someone was signalled (the generation in hand is completed first). Rank 0
then writes a checkpoint of the last complete generation and every rank exits with
EXIT_STOPPED. Repeats of SIGUSR1/SIGTERM are ignored (under Slurm a rank can get the same
SIGTERM twice: from slurmstepd and from mpiexec); a second SIGINT aborts (Ctrl-C twice).
"""

from __future__ import annotations

import signal

EXIT_STOPPED = 75  # sysexits EX_TEMPFAIL: stopped early, resumable from the run file
SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    """Raised on every rank once the job agreed to stop."""

    def __init__(self, signum: int, complete: int):
        self.signum = signum
        self.complete = complete
        super().__init__(f"stopped by {signal.Signals(signum).name} after {complete} "
                         "complete generations")


class StopFlag:
    """The first stop signal this process got (0: none)."""

    def __init__(self) -> None:
        self.signum = 0

    def install(self) -> None:
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if not self.signum:
            self.signum = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C again: abort

    @property
    def requested(self) -> bool:
        return self.signum != 0
