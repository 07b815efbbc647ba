"""Rebuilding a generation's weights from a run file (resume, export, eval RUN@G).

The latest checkpoint at or before the generation restores exactly on any machine; the
generations after it are replayed from their logged seeds and rewards (no evaluation),
through the same update code, so the weights are bit-identical to the run that wrote the
file on the same kind of machine. Elsewhere, replay either reproduces the logged
checksum or stops with one line naming both machines.
"""

from __future__ import annotations

from es_mpi import devices, runfile
from es_mpi.errors import EsError
from es_mpi.session import Session, examples_fingerprint
from es_mpi.shaping import shape


def rebuild(s: Session, path: str, info: runfile.RunInfo, upto: int) -> None:
    """Set the replica to theta_upto: latest checkpoint <= upto, then replay the rest.

    Replay reuses the logged seeds and rewards (no evaluation) and the same update code,
    so the weights are bit-identical to the run that wrote the file.
    """
    if s.fingerprint != info.model_fingerprint:
        raise EsError(f"model {s.cfg.model} (weights fingerprint {s.fingerprint}) is not the "
                      f"base model of run file {path} ({info.model_path}, fingerprint "
                      f"{info.model_fingerprint}); pass the original model directory with --model")
    if info.task_fingerprint and info.task_fingerprint != examples_fingerprint(s.train):
        raise EsError(f"task {s.cfg.task}: the training examples differ from those run file "
                      f"{path} was made with (task data or task code changed?); use the "
                      "original examples")
    usable = [c for c in info.checkpoints if c <= upto]
    start = 0
    if usable:
        start = usable[-1]
        master = s.replica.master  # holds theta_0 here; becomes theta_start in place
        runfile.apply_checkpoint_(path, start, master)
        s.replica.restore()
        want = runfile.checkpoint_checksum(path, start)
        if s.replica.checksum() != want:
            raise EsError(f"run file {path}: checkpoint {start} does not reproduce its "
                          "recorded checksum; the file is damaged")
    then = info.machine
    other = not devices.same_arithmetic(then, s.machine)
    rows = runfile.read_generations(path, start, upto, ("seeds", "signs", "rewards", "checksum"))
    for k in range(upto - start):
        z_n = shape(rows["rewards"][k], s.cfg.shaping)
        s.replica.update(rows["seeds"][k], rows["signs"][k], z_n, s.cfg.lr,
                         s.cfg.weight_decay, s.anchor)
    if upto > start and s.replica.checksum() != int(rows["checksum"][-1]):
        if other:
            raise EsError(
                f"run file {path}: generations {start}..{upto - 1} were computed on "
                f"{devices.label(then)}, and replaying them here on "
                f"{devices.label(s.machine)} gives other weights (noise and kernels "
                f"differ between machines); replay on the original kind of machine, or "
                f"use a checkpoint ({', '.join(map(str, info.checkpoints)) or 'none yet'}), "
                "which any machine restores exactly")
        raise EsError(f"run file {path}: replaying generations {start}..{upto - 1} does not "
                      f"reproduce the recorded weights checksum of generation {upto - 1}; "
                      "different library versions than the original run, or a damaged file?")
