"""Work off the critical path: lowrank factors drawn once per generation, and checkpoints
written by a thread of rank 0 while the next generation evaluates.

Both must leave every number as it was: the weights are compared with a reference that
draws the factors again for the update (the former code path, in plain torch), and a run
file written with the background writer with one written in line.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import threading
from collections import Counter

import h5py
import numpy as np
import pytest
import torch
from conftest import cli_env, cli_in_process

from es_mpi import lowrank, record, runfile
from es_mpi import noise as noise_mod
from es_mpi.config import Config
from es_mpi.errors import EsError
from es_mpi.es import LowRankNoise, Replica, checksum, es_update_, noise_coefficients
from es_mpi.noise import lowrank_factors
from es_mpi.shaping import shape

# -- 1. lowrank factors: drawn once per generation --------------------------------------


@pytest.fixture
def draws(monkeypatch) -> Counter:
    """Every draw of lowrank factors, counted by (seed, matrix)."""
    seen: Counter = Counter()
    real = noise_mod.lowrank_factors

    def counting(seed, name, *args, **kwargs):
        seen[seed, name] += 1
        return real(seed, name, *args, **kwargs)
    monkeypatch.setattr(noise_mod, "lowrank_factors", counting)
    return seen


def old_update_(theta: torch.Tensor, name: str, terms, alpha: float, rank: int) -> None:
    """The update as it was before the draws were kept: every member's factors drawn
    again from lowrank_factors, concatenated, one addmm_."""
    pairs = [lowrank_factors(seed, name, theta.shape, rank, "cpu") for seed, _ in terms]
    coef = torch.tensor([c / math.sqrt(rank) for _, c in terms], dtype=torch.float32)
    a = torch.cat([a for a, _ in pairs], dim=1) * coef.repeat_interleave(rank)
    b = torch.cat([b for _, b in pairs], dim=1)
    theta.addmm_(a, b.T, alpha=alpha)


def test_drawing_into_a_buffer_gives_the_same_numbers():
    shape = torch.Size((7, 5))
    a, b = lowrank_factors(123, "m.weight", shape, 3, "cpu")
    stacked = torch.zeros(2, 12, 3)
    a2, b2 = lowrank_factors(123, "m.weight", shape, 3, "cpu", out=stacked[1])
    assert torch.equal(a, a2) and torch.equal(b, b2) and torch.equal(stacked[1, :7], a)
    assert not stacked[0].any()
    with pytest.raises(ValueError, match="contiguous fp32 CPU tensor"):
        lowrank_factors(123, "m.weight", shape, 3, "cpu", out=torch.zeros(3, 12).T)


def test_update_draws_only_the_members_this_rank_did_not_evaluate(draws):
    """A rank evaluated seeds 3 (an antithetic pair) and 8; the update of N = 5 members
    draws only seed 9's factors, made by another rank, and drops what was kept."""
    noise, rank = LowRankNoise(2), 2
    noise.keep_draws()
    w = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    stacked = noise.draws([3, 3, 8], "w", w.shape)
    assert draws == {(3, "w"): 1, (8, "w"): 1}  # the pair's mirror is a copy
    assert torch.equal(stacked[0], stacked[1])
    draws.clear()
    seeds_n = np.array([3, 3, 8, 9, 9], dtype=np.int64)
    signs_n = np.array([1, -1, 1, 1, -1], dtype=np.int8)
    z_n = np.array([0.7, -0.2, -0.5, 1.1, 0.3])
    master = {"w": w.clone()}
    es_update_(master, seeds_n, signs_n, z_n, lr=0.1, noise=noise)
    assert draws == {(9, "w"): 1}
    assert noise.kept("w") == {}
    want = w.clone()
    old_update_(want, "w", noise_coefficients(seeds_n, signs_n, z_n), 0.1 / 5, rank)
    assert torch.equal(master["w"], want)  # bit for bit


@pytest.mark.parametrize("rank", [1, 2])
def test_a_generation_of_a_model_equals_the_former_path(tiny_model, rank, draws):
    """Evaluate two groups as the evaluator does (draws kept), update: each (seed, matrix)
    is drawn once in the generation, and the weights equal those of the former path,
    bit for bit."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    matrices = lowrank.perturbed_matrices(model)
    params = {n: p for n, p in model.named_parameters() if n in matrices}
    before = {n: p.detach().clone() for n, p in params.items()}
    replica = Replica(params, LowRankNoise(rank), share_master=True)
    seeds_n = np.array([41, 41, 42, 42, 43, 43], dtype=np.int64)
    signs_n = np.array([1, -1] * 3, dtype=np.int8)
    replica.noise.keep_draws()
    ids = torch.randint(3, model.config.vocab_size, (2, 5),
                        generator=torch.Generator().manual_seed(0))
    for group in ([0, 1, 2], [3, 4, 5]):  # an antithetic pair split across two groups
        with torch.no_grad(), lowrank.population(
                matrices, replica.master, replica.noise, [int(seeds_n[i]) for i in group],
                [int(signs_n[i]) for i in group], 0.05, rows=3 * 2):
            model(input_ids=ids.repeat(3, 1))
    z_n = np.array([0.5, -1.0, 0.25, 2.0, -0.75, 0.0])
    replica.update(seeds_n, signs_n, z_n, 0.01)
    assert set(draws.values()) == {1} and len(draws) == 3 * len(matrices)
    terms = [t for t in noise_coefficients(seeds_n, signs_n, z_n) if t[1] != 0.0]
    for name, theta in before.items():
        old_update_(theta, name, terms, 0.01 / 6, rank)
        assert torch.equal(params[name].detach(), theta), name


def test_a_lowrank_run_draws_each_factor_once_and_ends_on_the_former_weights(
        tiny_model, tmp_path, draws):
    """A 1-rank lowrank run: each member's factors of each matrix are drawn once per
    generation (the update draws none: this rank evaluated every member), and its last
    checkpoint holds the weights of the former path, computed here from the logged
    rewards."""
    from transformers import AutoModelForCausalLM

    run = tmp_path / "r.h5"
    cli_in_process(["train", "--model", tiny_model, "--run", run, "--mode", "lowrank",
                    "--rank", "2", "--population", "6", "--antithetic", "--member-batch", "3",
                    "--generations", "2", "--sigma", "0.05", "--lr", "0.05",
                    "--max-new-tokens", "4", "--seed", "5", "-q"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    matrices = lowrank.perturbed_matrices(model)
    gens = runfile.read_generations(run)
    seeds = {int(x) for x in gens["seeds"].reshape(-1)}
    assert len(seeds) == 2 * 3
    assert draws == {(seed, name): 1 for seed in seeds for name in matrices}
    theta = {n: p.detach().clone() for n, p in model.named_parameters() if n in matrices}
    for k in range(2):
        z_n = shape(gens["rewards"][k].astype(np.float64), "zscore")
        terms = [t for t in noise_coefficients(gens["seeds"][k], gens["signs"][k], z_n)
                 if t[1] != 0.0]
        for name, w in theta.items():
            old_update_(w, name, terms, 0.05 / 6, 2)
        assert checksum(theta) == gens["checksum"][k]
    got = {n: p.detach().clone() for n, p in model.named_parameters() if n in matrices}
    runfile.apply_checkpoint_(run, 2, got)
    for name, w in theta.items():
        assert torch.equal(got[name], w), name


# -- 2. checkpoints written in the background ------------------------------------------

ARGS = ["--population", "4", "--sigma", "0.05", "--lr", "0.05", "--max-new-tokens", "4",
        "--seed", "3", "--checkpoint-every", "2", "--keep-checkpoints", "100", "-q"]
TIMES = ("time_", "timestamp", "peak_mem_", "eval_seconds")  # what any two runs differ in


class Boom(EsError):
    pass


def train(model, run, generations: int, *extra) -> None:
    cli_in_process(["train", "--model", model, "--run", run, "--generations", generations,
                    *ARGS, *extra])


def content(path) -> dict[str, np.ndarray]:
    """Everything a run file holds but timings: committed rows, evaluations, and every
    checkpoint's deltas, fix-ups and attributes."""
    out = {}
    with h5py.File(path, "r") as f:
        done = int(f.attrs["complete_generations"])
        out["complete"] = np.array(done)
        for name, ds in f["generations"].items():
            if not name.startswith(TIMES):
                out[f"gen/{name}"] = ds[:done]
        for name, ds in f["eval"].items():
            if name == "seconds":
                continue
            out[f"eval/{name}"] = ds[...] if name != "completions" else ds.asstr()[...]

        def visit(name, obj):
            key = f"ckpt/{name}"
            if isinstance(obj, h5py.Dataset):
                out[key] = obj[...]
            for attr, value in obj.attrs.items():
                out[f"{key}@{attr}"] = np.asarray(value)
        f["checkpoints"].visititems(visit)
    return out


def assert_same_content(a, b) -> None:
    ca, cb = content(a), content(b)
    assert ca.keys() == cb.keys()
    assert any(k.startswith("ckpt/") for k in ca)
    for key in ca:
        np.testing.assert_array_equal(ca[key], cb[key], err_msg=key)


@pytest.mark.parametrize("mode", ["full", "lowrank"])
def test_background_checkpoints_write_the_same_run_file(tiny_model, tmp_path, monkeypatch,
                                                        mode):
    """Rewards, checksums, held-out evaluations and every checkpoint (deltas, fix-ups,
    checksums) are those of a run that writes its checkpoints in line."""
    extra = ["--eval-every", "2", "--eval-limit", "2"]
    if mode == "lowrank":
        extra += ["--mode", "lowrank", "--member-batch", "2"]
    monkeypatch.setattr(record, "BACKGROUND", False)
    train(tiny_model, tmp_path / "inline.h5", 5, *extra)
    monkeypatch.setattr(record, "BACKGROUND", True)
    train(tiny_model, tmp_path / "background.h5", 5, *extra)
    assert_same_content(tmp_path / "inline.h5", tmp_path / "background.h5")
    assert runfile.read_info(tmp_path / "background.h5").checkpoints == [2, 4, 5]


def test_the_checkpoint_is_written_while_the_next_generation_evaluates(
        tiny_model, tmp_path, monkeypatch):
    """The write of checkpoint 2 waits until generation 2 (the third) has begun to
    evaluate: in line, it would wait forever (here: fail after 60 s); in the background
    it finishes, and commits generation 1, before generation 2's update."""
    import es_mpi.loop as loop

    evaluating: dict[int, threading.Event] = {t: threading.Event() for t in range(4)}
    seen = {}
    score, write = loop.score_members, runfile.RunWriter.write_checkpoint

    def score_members(s, *args, **kwargs):
        evaluating[len(seen.setdefault("evals", []))].set()
        seen["evals"].append(threading.current_thread() is threading.main_thread())
        return score(s, *args, **kwargs)

    def write_checkpoint(self, generation, *args, **kwargs):
        if generation == 2:
            seen["thread"] = threading.current_thread() is not threading.main_thread()
            seen["committed before"] = self.complete_generations
            if not evaluating[2].wait(timeout=60):  # (an EsError: the run ends, exit 2)
                raise Boom("checkpoint 2 was written before generation 2 evaluated")
        write(self, generation, *args, **kwargs)

    monkeypatch.setattr(loop, "score_members", score_members)
    monkeypatch.setattr(runfile.RunWriter, "write_checkpoint", write_checkpoint)
    run = tmp_path / "r.h5"
    train(tiny_model, run, 4)
    assert seen["thread"] and seen["committed before"] == 1 and all(seen["evals"])
    assert runfile.read_info(run).checkpoints == [2, 4]


def test_a_failed_background_write_leaves_the_last_complete_generation(
        tiny_model, tmp_path, monkeypatch):
    """Checkpoint 4 fails in its thread after two tensors: the error ends the run (one
    error line, exit 2), generation 3 is not committed (its checkpoint is not complete),
    the file's checkpoints stop at 2, and a resume ends on the weights of a run that
    never failed."""
    write, create = runfile.RunWriter.write_checkpoint, h5py.Group.create_dataset
    state = {"in": False, "n": 0}

    def write_checkpoint(self, generation, *args, **kwargs):
        state["in"] = generation == 4
        write(self, generation, *args, **kwargs)

    def create_dataset(self, *args, **kwargs):
        state["n"] += state["in"]
        if state["n"] == 3:
            state["thread"] = threading.current_thread().name
            raise Boom("disk on fire")
        return create(self, *args, **kwargs)

    monkeypatch.setattr(runfile.RunWriter, "write_checkpoint", write_checkpoint)
    monkeypatch.setattr(h5py.Group, "create_dataset", create_dataset)
    run = tmp_path / "r.h5"
    with pytest.raises(SystemExit) as exit_:
        train(tiny_model, run, 8)
    assert exit_.value.code == 2 and state["thread"] == "es-mpi checkpoint 4"
    monkeypatch.undo()
    with h5py.File(run, "r") as f:  # the half checkpoint is there, not trusted
        assert int(f.attrs["complete_generations"]) == 3
        assert ".partial" in f["checkpoints"]
        assert f["generations/seeds"].shape[0] == 4
    info = runfile.read_info(run)
    assert info.complete_generations == 3 and info.checkpoints == [2]

    cli_in_process(["resume", run, "--generations", "6", "-q"])
    train(tiny_model, tmp_path / "reference.h5", 6)
    assert_same_content(run, tmp_path / "reference.h5")


KILL_IN_THREAD = textwrap.dedent("""
    import os, signal, sys, threading
    import h5py
    from es_mpi.runfile import RunWriter
    from es_mpi.cli import cli

    AT = int(sys.argv.pop(1))
    write, create = RunWriter.write_checkpoint, h5py.Group.create_dataset
    state = {"in": False, "n": 0}

    def write_checkpoint(self, generation, *args, **kw):
        state["in"] = generation == AT
        write(self, generation, *args, **kw)

    def create_dataset(self, *args, **kw):
        state["n"] += state["in"]
        if state["n"] == 3:
            print("killed in", threading.current_thread().name, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return create(self, *args, **kw)

    RunWriter.write_checkpoint = write_checkpoint
    h5py.Group.create_dataset = create_dataset
    cli(sys.argv[1:])
""")


def test_a_kill_during_a_background_write_leaves_the_last_complete_generation(
        tiny_model, tmp_path):
    """SIGKILL in the middle of the thread's write of checkpoint 4: the file opens at
    generation 3 with checkpoint 2 (the half checkpoint and generation 3's row are
    leftovers, ignored), and a resume ends on the weights of an uninterrupted run."""
    script = tmp_path / "kill.py"
    script.write_text(KILL_IN_THREAD)
    run = tmp_path / "r.h5"
    result = subprocess.run([sys.executable, str(script), "4", "train", "--model",
                             str(tiny_model), "--run", str(run), "--generations", "8", *ARGS],
                            capture_output=True, text=True, timeout=300, env=cli_env())
    assert result.returncode == -9, result.stderr
    assert "killed in es-mpi checkpoint 4" in result.stdout
    info = runfile.read_info(run)
    assert info.complete_generations == 3 and info.checkpoints == [2]
    cli_in_process(["resume", run, "--generations", "6", "-q"])
    train(tiny_model, tmp_path / "reference.h5", 6)
    assert_same_content(run, tmp_path / "reference.h5")


def test_weights_changed_during_the_write_are_never_a_checkpoint(tmp_path):
    """verify: a checkpoint whose weights do not have the generation's checksum (the
    master changed while it was read) raises and stays incomplete."""
    w = runfile.RunWriter.create(tmp_path / "r.h5", Config(model="m"), "m", "f", "t", 1)
    theta = {"a": torch.randn(5, 3), "b": torch.randn(4)}
    base = {n: torch.zeros_like(t) for n, t in theta.items()}

    def rows(name, r0, r1):
        return runfile.as_rows(base[name])[r0:r1]
    good = checksum(theta)
    w.write_checkpoint(1, good, theta, rows, keep=5, verify=True)
    with pytest.raises(RuntimeError, match="changed while they were written"):
        w.write_checkpoint(2, good + 1, theta, rows, keep=5, verify=True)
    assert runfile.checkpoint_list(w.f) == [1]
    w.close()


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_a_background_write_reads_the_weights_after_the_queued_update(tmp_path, device):
    """write_generation in the background, right after an update that may still be
    queued on a GPU: the thread's copies (on a stream of their own there) see the updated
    weights (verify would refuse anything else), and the generation commits once the
    checkpoint is complete."""
    from types import SimpleNamespace

    w = runfile.RunWriter.create(tmp_path / "r.h5", Config(model="m", population=2), "m",
                                 "f", "t", 1)
    master = {"a": torch.zeros(1024, 1024, device=device), "b": torch.zeros(7, device=device)}
    for _ in range(50):  # the update, queued
        for t in master.values():
            t.add_(1.0)
    want = {n: torch.full(t.shape, 50.0) for n, t in master.items()}
    base = {n: torch.zeros(t.shape) for n, t in master.items()}
    s = SimpleNamespace(cfg=SimpleNamespace(checkpoint_every=1, generations=3,
                                            keep_checkpoints=2),
                        replica=SimpleNamespace(master=master), base=base,
                        devices=[torch.device(device)])
    widths = {"n": (2,), "b": (1,), "": ()}
    row = {name: np.zeros(widths[kind], dtype) for name, (dtype, kind)
           in runfile.GENERATION_FIELDS.items()}
    row["checksum"] = checksum(want)
    record.write_generation(s, w, 0, row, 0.0, background=True)
    assert w.pending is not None
    record.finish_checkpoint(w)
    assert w.complete_generations == 1 and runfile.checkpoint_list(w.f) == [1]
    w.close()
    got = {n: torch.zeros(t.shape) for n, t in master.items()}
    runfile.apply_checkpoint_(tmp_path / "r.h5", 1, got)
    assert all(torch.equal(got[n], want[n]) for n in want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_draws_update_a_gpu_matrix_as_the_former_path():
    """On a GPU the draws are pinned and copied without blocking: the same bits as the
    former path's blocking copies of fresh draws."""
    noise = LowRankNoise(2)
    noise.keep_draws()
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(2)).cuda()
    noise.draws([5, 5, 6], "w", w.shape, pin=True)
    seeds_n = np.array([5, 5, 6, 7], dtype=np.int64)
    signs_n = np.array([1, -1, 1, 1], dtype=np.int8)
    z_n = np.array([0.3, -0.9, 0.4, 1.2])
    got = {"w": w.clone()}
    es_update_(got, seeds_n, signs_n, z_n, lr=0.1, noise=noise)
    terms = noise_coefficients(seeds_n, signs_n, z_n)
    want = w.clone()
    pairs = [lowrank_factors(seed, "w", w.shape, 2, "cpu") for seed, _ in terms]
    coef = torch.tensor([c / math.sqrt(2) for _, c in terms], device="cuda")
    a = torch.cat([a for a, _ in pairs], dim=1).cuda() * coef.repeat_interleave(2)
    b = torch.cat([b for _, b in pairs], dim=1).cuda()
    want.addmm_(a, b.T, alpha=0.1 / 4)
    assert torch.equal(got["w"], want)
