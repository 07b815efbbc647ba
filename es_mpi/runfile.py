"""The HDF5 run file: one per run, written by rank 0 only, readable with plain h5py.

Layout (see docs/runfile.md):

    /                         attrs: format_version, es_mpi_version, created, config (JSON),
                                     model_path, model_fingerprint, task, complete_generations
    /generations/<name>       one row per generation, resizable along axis 0
    /checkpoints/<t:08d>/     theta_t - theta_0 per tensor (fp32), attrs generation, checksum
    /checkpoints/<t:08d>/fixups/<tensor>/{index,value}
                              the few elements where fp32(theta_0 + delta) != theta_t, so a
                              checkpoint restores the weights bit for bit

Commit protocol: a generation's rows (and its checkpoint, if due) are written and flushed
first; only then is the root attribute `complete_generations` raised and flushed again.
Rows or checkpoints beyond `complete_generations` are leftovers of a crash: readers
ignore them and `open_append` removes them.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import resource
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from es_mpi import __version__
from es_mpi.config import Config
from es_mpi.errors import EsError

FORMAT_VERSION = 1

# name -> (dtype, row shape key); "n" = one value per member, "b" = per prompt, "" = scalar
GENERATION_FIELDS: dict[str, tuple[str, str]] = {
    "seeds": ("i8", "n"),          # noise seed of each member (antithetic pairs share one)
    "signs": ("i1", "n"),          # +1 / -1 (antithetic mirror)
    "rewards": ("f8", "n"),        # mean reward of each member over the generation's prompts
    "tokens": ("i8", "n"),         # tokens each member generated
    "eval_seconds": ("f8", "n"),   # wall time of each member's evaluation
    "eval_rank": ("i4", "n"),      # rank that evaluated the member
    "prompt_ids": ("i8", "b"),     # training examples scored in this generation
    "reward_mean": ("f8", ""),
    "reward_std": ("f8", ""),
    "reward_min": ("f8", ""),
    "reward_max": ("f8", ""),
    "checksum": ("i8", ""),        # weights checksum after this generation's update
    "world_size": ("i4", ""),
    "comm_bytes": ("i8", ""),      # bytes rank 0 sent + received in the collectives
    "time_eval": ("f8", ""),       # phase timings on rank 0, seconds
    "time_perturb": ("f8", ""),    # part of time_eval: noise and perturbation (full) or
                                   # low-rank factors (lowrank)
    "time_generate": ("f8", ""),   # part of time_eval: generate calls
    "time_score": ("f8", ""),      # part of time_eval: reward functions
    "time_gather": ("f8", ""),
    "time_update": ("f8", ""),
    "time_checksum": ("f8", ""),
    "time_io": ("f8", ""),         # rank 0's main thread on the run file: the rows, an
                                   # in-line checkpoint, or the wait (before the update)
                                   # for the previous one's background write (es_mpi.record)
    "time_total": ("f8", ""),
    "timestamp": ("f8", ""),       # unix time at the end of the generation
    "peak_mem_eval": ("i8", ""),   # peak memory of the evaluation phase, bytes, largest over
                                   # ranks: torch's CUDA allocations, or the process RSS on CPU
    "peak_mem_update": ("i8", ""), # same for gather, update and checksum
    # diagnostics (es_mpi.diagnostics; NaN in rows written before they were recorded)
    "pair_disagree": ("f8", ""),   # antithetic: share of mirrored pairs whose 2 rewards differ
    "pair_gap": ("f8", ""),        # antithetic: mean |r+ - r-| over the pairs (NaN without)
    "distinct_rewards": ("f8", ""),  # distinct reward values / N (1/N: all equal, no signal)
    "update_coef_norm": ("f8", ""),  # lr/N * ||c||_2, c = sum of sign*z per noise draw: the
                                     # expected RMS per weight of the noise part of the update
}


EVAL_FIELDS: dict[str, str] = {
    "generation": "i8",    # weights after this many generations (0 = base model)
    "mean_reward": "f8",
    "accuracy": "f8",      # NaN where the task has no notion of solved
    "n_examples": "i8",
    "seconds": "f8",
    "kl": "f8",            # mean per-token KL to the base model (es_mpi.kl); NaN: not measured
}
# fields added after format 1 first shipped: NaN in the evaluations of older files
EVAL_ADDED = ("kl",)
# /eval/completions: per evaluation, its completions (example order) as one JSON list
# (a variable-length UTF-8 string); added after format 1 first shipped, "" in older rows
COMPLETIONS = "completions"


@dataclass
class RunInfo:
    """What a run file says about its run (header + progress), read without torch."""

    path: str
    config: Config
    format_version: int
    es_mpi_version: str
    created: str
    model_path: str
    model_fingerprint: str
    task_fingerprint: str
    complete_generations: int
    checkpoints: list[int]
    hardware: list[dict]    # one entry per start or resume: {"generation", "world_size", ...}

    @property
    def machine(self) -> dict | None:
        """The machine the last generations were computed on (None in older files)."""
        return self.hardware[-1] if self.hardware else None


def _open(path: str | Path, mode: str) -> h5py.File:
    try:
        if mode == "r":
            return h5py.File(path, "r", locking=False)
        return h5py.File(path, mode)
    except FileNotFoundError:
        raise EsError(f"run file {path} does not exist") from None
    except BlockingIOError:
        raise EsError(f"run file {path} is open in another process (HDF5 lock); "
                      "stop that run first") from None
    except OSError as exc:
        text = str(exc)
        if "unable to lock file" in text.lower():  # not just "lock": "sblock" is no lock
            raise EsError(f"run file {path} is open in another process (HDF5 lock); "
                          "stop that run first") from None
        if "truncated file" in text:
            raise EsError(f"run file {path} is truncated ({text.split('truncated file: ')[-1]}"
                          ": it was cut short (interrupted copy, full disk?) and cannot be "
                          "used; restore a complete copy") from None
        raise EsError(f"run file {path} cannot be opened as HDF5 ({text.splitlines()[0]}); "
                      "is it a run file of es-mpi, and complete?") from None


@contextmanager
def _damaged(path: str | Path, what: str) -> Iterator[None]:
    """Turn a read failure inside an opened run file into one clear EsError."""
    try:
        yield
    except EsError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        text = (str(exc).splitlines() or [type(exc).__name__])[0]
        if _locked(path):
            raise EsError(f"run file {path}: cannot read {what} ({text}) while a run is "
                          "writing it; try again") from None
        raise EsError(f"run file {path}: cannot read {what} ({text}); the file is damaged "
                      "(truncated, overwritten or partly copied?)") from None


def _locked(path: str | Path) -> bool:
    """Whether a writer holds the file's HDF5 lock (flock) right now."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class RunFileFull(EsError):
    """No room for the next write. Raised on rank 0 alone (the writer), so the CLI aborts
    the job after the error line instead of leaving the other ranks waiting."""

    abort_job = True


def _space_left(path: str | Path) -> int:
    """Bytes the file at `path` may still grow: free disk space, and RLIMIT_FSIZE."""
    st = os.statvfs(path)
    left = st.f_bavail * st.f_frsize
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        left = min(left, max(0, limit - os.path.getsize(path)))
    return left


def _checkpoint_generations(f: h5py.File, limit: int) -> list[int]:
    if "checkpoints" not in f:
        return []
    gens = []
    for name, group in f["checkpoints"].items():
        if name.isdigit() and group.attrs.get("complete", False):
            g = int(group.attrs["generation"])
            if g <= limit:
                gens.append(g)
    return sorted(gens)


def checkpoint_list(f: h5py.File) -> list[int]:
    """Generations with a complete checkpoint in an open run file (committed or not)."""
    return _checkpoint_generations(f, 2**62)


def read_info(path: str | Path) -> RunInfo:
    """Header and progress of a run file; raises EsError for anything not a valid run file."""
    with _open(path, "r") as f, _damaged(path, "its header"):
        attrs = f.attrs
        if "format_version" not in attrs or "config" not in attrs:
            raise EsError(f"{path} is an HDF5 file but not an es-mpi run file "
                          "(no format_version/config attributes)")
        version = int(attrs["format_version"])
        if version > FORMAT_VERSION:
            raise EsError(f"run file {path} has format version {version}, newer than this "
                          f"es-mpi ({__version__}, format {FORMAT_VERSION}); upgrade es-mpi")
        complete = int(attrs.get("complete_generations", 0))
        return RunInfo(
            path=str(path),
            config=Config.from_json(attrs["config"]),
            format_version=version,
            es_mpi_version=str(attrs["es_mpi_version"]),
            created=str(attrs["created"]),
            model_path=str(attrs["model_path"]),
            model_fingerprint=str(attrs["model_fingerprint"]),
            task_fingerprint=str(attrs.get("task_fingerprint", "")),
            hardware=json.loads(attrs.get("hardware", "[]")),
            complete_generations=complete,
            checkpoints=_checkpoint_generations(f, complete),
        )


def read_generations(path: str | Path, start: int = 0, stop: int | None = None,
                     fields: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Rows [start, stop) of the complete generations, as NumPy arrays by field name."""
    with _open(path, "r") as f, _damaged(path, "the generation rows"):
        complete = int(f.attrs.get("complete_generations", 0))
        stop = complete if stop is None else min(stop, complete)
        gen = f["generations"]
        names = fields or tuple(n for n in GENERATION_FIELDS if n in gen)
        return {n: gen[n][start:stop] for n in names}


def read_evals(path: str | Path) -> dict[str, np.ndarray]:
    """Committed held-out evaluations, as NumPy arrays by field name."""
    with _open(path, "r") as f, _damaged(path, "the held-out evaluations"):
        if "eval" not in f:
            return {name: np.zeros(0, dtype) for name, dtype in EVAL_FIELDS.items()}
        complete = int(f.attrs.get("complete_generations", 0))
        gens = f["eval/generation"][...]
        keep = gens <= complete
        return {name: f["eval"][name][...][keep] if name in f["eval"]
                else np.full(int(keep.sum()), np.nan) for name in EVAL_FIELDS}


def read_eval_completions(path: str | Path) -> list[list[str] | None]:
    """Each committed held-out evaluation's completions, in example order (None where the
    file was written before completions were recorded)."""
    with _open(path, "r") as f, _damaged(path, "the held-out completions"):
        if "eval" not in f:
            return []
        complete = int(f.attrs.get("complete_generations", 0))
        keep = f["eval/generation"][...] <= complete
        if COMPLETIONS not in f["eval"]:
            return [None] * int(keep.sum())
        texts = f["eval"][COMPLETIONS].asstr()[...]
        return [json.loads(t) if t else None for t, k in zip(texts, keep, strict=True) if k]


ROW_BLOCK = 1 << 22  # elements per block when a checkpoint tensor is written or read


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor as a (first axis, the rest) view; a 0-d tensor as one row."""
    return t.view(t.shape[0] if t.dim() else 1, -1)


def apply_checkpoint_(path: str | Path, generation: int,
                      master: dict[str, torch.Tensor]) -> None:
    """Turn `master` (holding theta_0, fp32) into theta_generation in place, bit-exact:
    theta_0 + delta, then the stored fix-ups."""
    with _open(path, "r") as f, _damaged(path, f"checkpoint {generation}"):
        group = f[f"checkpoints/{generation:08d}"]
        fixups = group.get("fixups", {})
        for name, theta in master.items():
            if name not in group:
                raise EsError(f"run file {path}: checkpoint {generation} has no tensor {name!r}; "
                              "was the run made with another model?")
            ds = group[name]
            rows = as_rows(theta)
            step = max(1, ROW_BLOCK // max(1, rows.shape[1]))
            for r0 in range(0, rows.shape[0], step):
                part = np.asarray(ds[r0:r0 + step] if theta.dim() else ds[()])
                rows[r0:r0 + step].add_(
                    torch.from_numpy(part).view(-1, rows.shape[1]).to(theta.device))
            if name in fixups:
                index = torch.from_numpy(fixups[name]["index"][...]).to(theta.device)
                value = torch.from_numpy(fixups[name]["value"][...]).to(theta.device)
                theta.view(-1)[index] = value


def checkpoint_checksum(path: str | Path, generation: int) -> int:
    with _open(path, "r") as f, _damaged(path, f"checkpoint {generation}"):
        return int(f[f"checkpoints/{generation:08d}"].attrs["checksum"])


def _add_completions(ev: h5py.Group, rows: int) -> None:
    ev.create_dataset(COMPLETIONS, shape=(rows,), maxshape=(None,), chunks=(64,),
                      dtype=h5py.string_dtype("utf-8"))


def _add_missing_fields(gen: h5py.Group, rows: int) -> None:
    """Fields added since a file was made: created with NaN (or 0) for its older rows."""
    n = gen["seeds"].shape[1]
    for name, (dtype, kind) in GENERATION_FIELDS.items():
        if name in gen or kind == "b":
            continue
        width = (n,) if kind == "n" else ()
        fill = np.nan if dtype.startswith("f") else 0
        gen.create_dataset(name, shape=(rows, *width), maxshape=(None, *width), dtype=dtype,
                           chunks=(64, *width), fillvalue=fill)


class RunWriter:
    """Rank 0's handle on the run file while a run is going."""

    def __init__(self, f: h5py.File):
        self.f = f
        self.path = f.filename
        # a checkpoint being written by a thread (es_mpi.record.InFlight): while it runs,
        # the thread alone touches the file
        self.pending = None
        self._margin: int | None = None  # check_space's margin, computed at first use

    # -- opening ----------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, config: Config, model_path: str, model_fingerprint: str,
               task_fingerprint: str, n_prompts: int) -> RunWriter:
        path = Path(path)
        if path.exists():
            raise EsError(f"run file {path} already exists")
        try:
            # default libver on purpose: newer superblocks carry a "file open for write"
            # flag that stops readers (es-mpi inspect) while a run is going
            f = h5py.File(path, "w-", fs_strategy="fsm", fs_persist=True)
        except OSError as exc:
            raise EsError(f"cannot create run file {path}: {exc}") from None
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["es_mpi_version"] = __version__
        f.attrs["created"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        f.attrs["config"] = config.to_json()
        f.attrs["task"] = config.task
        f.attrs["model_path"] = str(Path(model_path).resolve())
        f.attrs["model_fingerprint"] = model_fingerprint
        f.attrs["task_fingerprint"] = task_fingerprint
        f.attrs["complete_generations"] = 0
        gen = f.create_group("generations")
        n = config.population
        for name, (dtype, kind) in GENERATION_FIELDS.items():
            width = {"n": (n,), "b": (n_prompts,), "": ()}[kind]
            gen.create_dataset(name, shape=(0, *width), maxshape=(None, *width), dtype=dtype,
                               chunks=(64, *width))
        f.create_group("checkpoints")
        ev = f.create_group("eval")
        for name, dtype in EVAL_FIELDS.items():
            ev.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(64,))
        _add_completions(ev, 0)
        f.flush()
        return cls(f)

    @classmethod
    def open_append(cls, path: str | Path) -> RunWriter:
        """Open for continuing; drops rows and checkpoints a crash left uncommitted."""
        f = _open(path, "r+")
        complete = int(f.attrs["complete_generations"])
        gen = f["generations"]
        for ds in gen.values():
            if ds.shape[0] > complete:
                ds.resize(complete, axis=0)
        _add_missing_fields(gen, complete)
        if "eval" in f:
            gens = f["eval/generation"][...]
            kept = int(np.searchsorted(gens, complete, side="right"))
            for ds in f["eval"].values():
                ds.resize(kept, axis=0)
            if COMPLETIONS not in f["eval"]:
                _add_completions(f["eval"], kept)
            for name in EVAL_ADDED:
                if name not in f["eval"]:
                    f["eval"].create_dataset(name, shape=(kept,), maxshape=(None,),
                                             dtype=EVAL_FIELDS[name], chunks=(64,),
                                             fillvalue=np.nan)
        keep = set(_checkpoint_generations(f, complete))
        for name in list(f["checkpoints"]):
            group = f["checkpoints"][name]
            if not (name.isdigit() and int(group.attrs.get("generation", -1)) in keep):
                del f["checkpoints"][name]
        f.flush()
        return cls(f)

    def close(self) -> None:
        if self.pending is not None:  # the loop waited for it (and reported its error)
            self.pending.wait()       # unless it ended by another error: let it finish
            self.pending = None
        self._margin: int | None = None  # check_space's margin, computed at first use
        if self.f.id.valid:
            self.f.flush()
            self.f.close()

    # -- writing ----------------------------------------------------------------------

    @property
    def complete_generations(self) -> int:
        return int(self.f.attrs["complete_generations"])

    def check_space(self, nbytes: int, what: str) -> None:
        """Refuse a write the disk has no room for, before writing any of it.

        HDF5 does not survive a full disk (it can crash in the middle of a flush), so the
        writer checks first: room on the file system (and under RLIMIT_FSIZE) plus the free
        space inside the file (left by dropped checkpoints) must hold `nbytes` and a margin
        for one new chunk of every generation field and the metadata.
        """
        if self._margin is None:  # the fields' chunks are fixed once the file is open
            self._margin = (1 << 20) + sum(int(np.prod(ds.chunks)) * ds.dtype.itemsize
                                           for ds in self.f["generations"].values())
        margin = self._margin
        room = _space_left(self.path) + self.f.id.get_freespace()
        if room < nbytes + margin:
            mib = 1 << 20
            raise RunFileFull(
                f"run file {self.path}: no room to write {what}: {room / mib:.2f} MiB "
                f"available, about {(nbytes + margin) / mib:.2f} MiB needed (disk full or "
                f"file size limit); it was not committed and the file holds "
                f"{self.complete_generations} complete generations. Free some space, then "
                f"continue with: es-mpi resume {self.path}")

    def append_generation(self, generation: int, row: dict[str, np.ndarray | float | int]) -> None:
        """Write generation `generation`'s row; it counts only after `commit`."""
        if generation != self.complete_generations:
            raise RuntimeError(f"writing generation {generation} but the file has "
                               f"{self.complete_generations} complete")
        gen = self.f["generations"]
        missing = set(GENERATION_FIELDS) - set(row)
        if missing:
            raise RuntimeError(f"generation row lacks {sorted(missing)}")
        self.check_space(0, f"generation {generation}")
        for name in GENERATION_FIELDS:
            ds = gen[name]
            ds.resize(generation + 1, axis=0)
            ds[generation] = row[name]

    def append_eval(self, row: dict[str, float | int], completions: list[str]) -> None:
        """A held-out evaluation and its completions; like a generation row it counts once
        committed."""
        ev = self.f["eval"]
        n = ev["generation"].shape[0]
        text = json.dumps(completions, ensure_ascii=False)
        self.check_space(len(text.encode()), "a held-out evaluation")
        for name in EVAL_FIELDS:
            ds = ev[name]
            ds.resize(n + 1, axis=0)
            ds[n] = row[name]
        ev[COMPLETIONS].resize(n + 1, axis=0)
        ev[COMPLETIONS][n] = text

    def add_hardware(self, generation: int, world_size: int, machine: dict) -> None:
        """Record the machine that computes from `generation` on (es_mpi.hardware)."""
        history = json.loads(self.f.attrs.get("hardware", "[]"))
        history.append({"generation": generation, "world_size": world_size, **machine})
        self.f.attrs["hardware"] = json.dumps(history)
        self.f.flush()

    def set_field(self, generation: int, name: str, value: float) -> None:
        self.f["generations"][name][generation] = value

    def write_checkpoint(self, generation: int, checksum: int,
                         master: Mapping[str, torch.Tensor],
                         base_rows: Callable[[str, int, int], torch.Tensor],
                         keep: int, verify: bool = False) -> None:
        """Store theta_t - theta_0 per tensor of `master` and drop old checkpoints.

        base_rows(name, r0, r1) gives rows r0..r1 of theta_0 (fp32). Tensors are written
        a block of rows at a time, so a checkpoint needs only a block of extra memory.
        `verify`: the weights stored must have `checksum` (their bits summed block by
        block as they are read), else the checkpoint is left incomplete and this raises:
        a checkpoint written beside other work (es_mpi.record) proves that nothing
        changed the weights while it read them.
        """
        from es_mpi.es import bit_sum
        from es_mpi.es import checksum as checksum_of

        sums: dict[str, int] | None = {} if verify else None
        root = self.f["checkpoints"]
        if ".partial" in root:
            del root[".partial"]
        group = root.create_group(".partial")
        for name, theta in master.items():
            self.check_space(4 * theta.numel(), f"checkpoint {generation}")
            chunks = _chunks(tuple(theta.shape))
            ds = group.create_dataset(name, shape=tuple(theta.shape), dtype="f4", chunks=chunks,
                                      shuffle=chunks is not None,
                                      compression="lzf" if chunks else None)
            flat = as_rows(theta.detach())
            step = max(1, ROW_BLOCK // max(1, flat.shape[1]) // chunks[0] * chunks[0]) \
                if chunks else 1
            wrong_i, wrong_v = [], []
            for r0 in range(0, flat.shape[0], step):
                block = flat[r0:r0 + step].to("cpu", torch.float32)
                if sums is not None:
                    sums[name] = sums.get(name, 0) + bit_sum(block)
                block0 = base_rows(name, r0, r0 + block.shape[0]).reshape(block.shape)
                delta = block - block0
                wrong = ((block0 + delta) != block).view(-1).nonzero().view(-1)
                if wrong.numel():
                    wrong_i.append(wrong + r0 * flat.shape[1])
                    wrong_v.append(block.view(-1)[wrong])
                if theta.dim():
                    ds[r0:r0 + block.shape[0]] = delta.reshape(-1, *theta.shape[1:]).numpy()
                else:
                    ds[()] = delta.reshape(()).numpy()
            if wrong_i:
                fix = group.require_group("fixups").create_group(name)
                fix.create_dataset("index", data=torch.cat(wrong_i).numpy())
                fix.create_dataset("value", data=torch.cat(wrong_v).numpy())
        if sums is not None and checksum_of(master, sums) != checksum:
            raise RuntimeError(f"checkpoint {generation}: the weights changed while they were "
                               "written (their checksum is not the generation's); the "
                               "checkpoint was left incomplete")
        group.attrs["generation"] = generation
        group.attrs["checksum"] = checksum
        group.attrs["complete"] = True
        name = f"{generation:08d}"
        if name in root:
            del root[name]
        root.move(".partial", name)
        for old in _checkpoint_generations(self.f, generation)[:-keep]:
            del root[f"{old:08d}"]

    def commit(self, generation: int) -> None:
        """Mark generation `generation` complete: everything before this is flushed first."""
        self.f.flush()
        self.f.attrs["complete_generations"] = generation + 1
        self.f.flush()


def _chunks(shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """About 1 MiB fp32 chunks along the first axis."""
    if not shape:
        return None
    row = int(np.prod(shape[1:], dtype=np.int64)) or 1
    rows = max(1, min(shape[0], (1 << 18) // row))
    return (rows, *shape[1:])


def check_unlocked(path: str | Path) -> None:
    """Fail early if another process holds the run file open for writing (HDF5's flock)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise EsError(f"run file {path} cannot be read: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        raise EsError(f"run file {path} is open in another process (HDF5 lock); "
                      "stop that run first") from None
    except OSError:
        pass  # no flock on this file system: HDF5's own open will decide
    finally:
        os.close(fd)


def check_writable(path: str | Path) -> None:
    """Fail early (before loading a model) if a new run file cannot be created at `path`."""
    path = Path(path)
    parent = path.resolve().parent
    if not parent.is_dir():
        raise EsError(f"cannot create run file {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EsError(f"cannot create run file {path}: directory {parent} is not writable")
    st = os.statvfs(parent)
    if st.f_bavail * st.f_frsize < 4 << 20:
        raise EsError(f"cannot create run file {path}: less than 4 MiB free in {parent}")

