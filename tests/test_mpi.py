"""Real processes: es-mpi under mpiexec -n 2 and alone; resume, replay, export, inspect.

The determinism contract: same seed and config give bit-identical weights whatever the
number of ranks and across any resume (same hardware).
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import run_cli, run_python_mpi, train_with_rank1_reward

from es_mpi.es import checksum

pytestmark = pytest.mark.mpi

# population 5 over 2 ranks: members are dealt unevenly (3 + 2)
ARGS = ["--population", "5", "--sigma", "0.05", "--lr", "0.05", "--max-new-tokens", "6",
        "--checkpoint-every", "4", "--seed", "3", "--shaping", "rank"]


def train(model, run, generations, np=None, extra=()):
    result = run_cli(["train", "--model", model, "--run", run, *ARGS,
                      "--generations", generations, *extra], np=np)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def rows(path):
    with h5py.File(path, "r") as f:
        n = f.attrs["complete_generations"]
        return {k: v[:n] for k, v in f["generations"].items()}


def delta(path, generation):
    with h5py.File(path, "r") as f:
        g = f[f"checkpoints/{generation:08d}"]
        return {k: g[k][...] for k in g if isinstance(g[k], h5py.Dataset)}


def assert_same_trajectory(a, b):
    """Two runs with equal rows and bit-identical final weights; guarded: their rewards
    vary and the weights moved, or equal runs would prove nothing."""
    ra, rb = rows(a), rows(b)
    assert len(np.unique(ra["rewards"])) > 1, "rewards never vary: the comparison is blind"
    assert len(set(ra["checksum"].tolist())) > 1, "the weights never moved"
    for key in ("seeds", "signs", "rewards", "tokens", "prompt_ids", "checksum"):
        np.testing.assert_array_equal(ra[key], rb[key], err_msg=key)
    g = len(ra["checksum"])
    da, db = delta(a, g), delta(b, g)
    assert da.keys() == db.keys()
    for k in da:
        np.testing.assert_array_equal(da[k], db[k], err_msg=k)


@pytest.fixture(scope="module")
def run_n2(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("mpi") / "n2.h5"
    result = train(tiny_model, path, 6, np=2)
    return path, result


@pytest.fixture(scope="module")
def run_n1(tiny_model, tmp_path_factory):
    """World size 1, launched without mpiexec."""
    path = tmp_path_factory.mktemp("mpi") / "n1.h5"
    train(tiny_model, path, 6)
    return path


def test_two_ranks_end_to_end(run_n2):
    path, result = run_n2
    progress = [ln for ln in result.stdout.splitlines() if ln.startswith("gen ")]
    assert [ln.split()[1] for ln in progress] == [f"{g}/6" for g in range(1, 7)]
    assert "reward mean" in progress[0] and "ETA" in progress[0]
    assert f"run file: {path}" in result.stdout
    r = rows(path)
    assert r["seeds"].shape == (6, 5)
    assert (r["world_size"] == 2).all()
    assert set(r["eval_rank"][0].tolist()) == {0, 1}
    assert r["eval_rank"][0].tolist() == [0, 1, 0, 1, 0]
    assert (r["time_total"] > 0).all() and (r["time_eval"] > 0).all()
    assert (r["tokens"] > 0).all()
    assert len({tuple(x) for x in r["rewards"]}) > 1, "rewards never vary: test is vacuous"
    with h5py.File(path, "r") as f:
        assert sorted(f["checkpoints"]) == ["00000004", "00000006"]


def test_same_weights_with_one_and_two_ranks(run_n1, run_n2):
    assert_same_trajectory(run_n1, run_n2[0])


def test_antithetic_same_weights_with_one_and_two_ranks(tiny_model, tmp_path):
    extra = ["--population", "4", "--antithetic", "--shaping", "zscore"]
    train(tiny_model, tmp_path / "a1.h5", 3, extra=extra)
    train(tiny_model, tmp_path / "a2.h5", 3, np=2, extra=extra)
    assert_same_trajectory(tmp_path / "a1.h5", tmp_path / "a2.h5")
    signs = rows(tmp_path / "a2.h5")["signs"]
    assert signs[0].tolist() == [1, -1, 1, -1]


def test_resume_on_another_world_size_is_bit_identical(tiny_model, run_n2, tmp_path):
    path = tmp_path / "stopped.h5"
    train(tiny_model, path, 3)  # one rank, stops after 3 generations (checkpoint 3)
    result = run_cli(["resume", path, "--generations", "6"], np=2)
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stdout
    assert_same_trajectory(path, run_n2[0])
    assert rows(path)["world_size"].tolist() == [1, 1, 1, 2, 2, 2]


def test_resume_replays_generations_after_the_checkpoint(run_n2, tmp_path):
    """A crash after generation 5 was written but before it was committed: resume takes
    checkpoint 4, replays generation 4 from the logged seeds and rewards, redoes 5."""
    path = tmp_path / "crashed.h5"
    shutil.copy(run_n2[0], path)
    with h5py.File(path, "r+") as f:
        f.attrs["complete_generations"] = 5
    result = run_cli(["resume", path])
    assert result.returncode == 0, result.stderr
    assert_same_trajectory(path, run_n2[0])


def test_resume_replays_from_the_base_model_without_checkpoints(run_n2, tmp_path):
    path = tmp_path / "nockpt.h5"
    shutil.copy(run_n2[0], path)
    with h5py.File(path, "r+") as f:
        f.attrs["complete_generations"] = 3
        for name in list(f["checkpoints"]):
            del f["checkpoints"][name]
    result = run_cli(["resume", path, "--generations", "6"], np=2)
    assert result.returncode == 0, result.stderr
    assert_same_trajectory(path, run_n2[0])


def test_export_loads_in_transformers(run_n2, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = run_n2[0]
    result = run_cli(["export", path, tmp_path / "g6"], np=2)
    assert result.returncode == 0, result.stderr
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "g6", dtype=torch.float32)
    AutoTokenizer.from_pretrained(tmp_path / "g6")
    params = dict(model.named_parameters())
    assert f"{checksum(params):016x}" == f"{int(rows(path)['checksum'][-1]):016x}"
    meta = json.loads((tmp_path / "g6" / "es_mpi_export.json").read_text())
    assert meta["generation"] == 6

    assert run_cli(["export", path, tmp_path / "g0", "--generation", "0"]).returncode == 0
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    g0 = AutoModelForCausalLM.from_pretrained(tmp_path / "g0", dtype=torch.float32)
    for (name, a), (_, b) in zip(base.named_parameters(), g0.named_parameters(), strict=True):
        assert torch.equal(a, b), name
        assert not torch.equal(a, params[name]), f"{name} never moved"


def test_inspect_json_matches_the_file(run_n2):
    path = run_n2[0]
    result = run_cli(["inspect", path, "--json"])
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    r = rows(path)
    assert info["generations_complete"] == 6
    assert info["checkpoints"] == [4, 6]
    assert info["world_sizes"] == [2]
    assert info["config"]["population"] == 5
    assert info["last_generations"][-1]["reward_mean"] == pytest.approx(r["reward_mean"][-1])
    text = run_cli(["inspect", path])
    assert "6 of 6 complete" in text.stdout and "checkpoints  [4, 6]" in text.stdout


def test_a_failing_reward_on_one_rank_stops_every_rank(tiny_model, tmp_path):
    """User reward code raising on rank 1 only: both ranks exit 2 with its message, no hang,
    and the run file holds no generation evaluated with it."""
    result, run = train_with_rank1_reward(tiny_model, tmp_path,
                                          'raise ValueError("broken scorer")', timeout=120)
    assert result.returncode != 0
    assert "reward raised ValueError: broken scorer (member 1, rank 1)" in result.stderr
    assert result.stderr.count("es-mpi: error:") == 1
    with h5py.File(run, "r") as f:
        assert f.attrs["complete_generations"] == 0


def test_diverged_replica_is_caught_by_the_checksum(tiny_model, tmp_path):
    """Flip one bit of rank 1's weights after its second update: the run stops with the
    rank and generation named, and that generation is never committed."""
    script = tmp_path / "flip_bit_on_rank1.py"
    script.write_text(textwrap.dedent("""
        import sys
        from mpi4py import MPI
        from es_mpi.es import Replica
        from es_mpi.cli import cli

        update = Replica.update
        calls = []

        def flipping_update(self, *args, **kw):
            check = update(self, *args, **kw)
            calls.append(1)
            if MPI.COMM_WORLD.rank == 1 and len(calls) == 2:
                name = next(iter(self.master))
                self.master[name].view(-1).view(__import__("torch").int32)[0] ^= 1 << 3
                self.restore()
                # an update that came out different: its checksum is of what it wrote
                return self.checksum() if kw.get("with_checksum") else None
            return check

        Replica.update = flipping_update
        cli(sys.argv[1:])
    """))
    run = tmp_path / "r.h5"
    result = run_python_mpi(script, ["train", "--model", tiny_model, "--run", run,
                                     "--population", "4", "--max-new-tokens", "3",
                                     "--generations", "4"], np=2, timeout=120)
    assert result.returncode == 2, result.stderr
    assert ("replicas diverged after generation 1: weight checksum of rank(s) 1 differs "
            "from rank 0") in result.stderr
    with h5py.File(run, "r") as f:
        assert f.attrs["complete_generations"] == 1


def test_bf16_replica_resumes_bit_identically(tiny_model, tmp_path):
    extra = ["--dtype", "bfloat16", "--checkpoint-every", "2"]
    train(tiny_model, tmp_path / "full.h5", 4, np=2, extra=extra)
    train(tiny_model, tmp_path / "half.h5", 3, extra=extra)
    result = run_cli(["resume", tmp_path / "half.h5", "--generations", "4"], np=2)
    assert result.returncode == 0, result.stderr
    assert_same_trajectory(tmp_path / "full.h5", tmp_path / "half.h5")


# -- lowrank mode -------------------------------------------------------------------------

# population 5 in groups of 2 ([0, 1], [2, 3], [4]): rank 0 evaluates groups 0 and 2
LOWRANK = ["--mode", "lowrank", "--rank", "2", "--member-batch", "2", "--sigma", "0.1"]


def test_lowrank_same_weights_with_one_and_two_ranks_and_after_resume(tiny_model, tmp_path):
    train(tiny_model, tmp_path / "l2.h5", 5, np=2, extra=LOWRANK)
    train(tiny_model, tmp_path / "l1.h5", 3, extra=LOWRANK)   # checkpoint-every 4: replay
    result = run_cli(["resume", tmp_path / "l1.h5", "--generations", "5"], np=2)
    assert result.returncode == 0, result.stderr
    assert_same_trajectory(tmp_path / "l1.h5", tmp_path / "l2.h5")
    r = rows(tmp_path / "l2.h5")
    assert r["eval_rank"][0].tolist() == [0, 0, 1, 1, 0]
    assert len({tuple(x) for x in r["rewards"]}) > 1, "rewards never vary: test is vacuous"
    # only matrices train: checkpoint deltas exist for 2-D weights, norms stay frozen
    d = delta(tmp_path / "l2.h5", 5)
    assert d and all(v.ndim == 2 for v in d.values())
    assert all(np.abs(v).max() > 0 for v in d.values())

    # replay in lowrank mode: without checkpoints, a resume rebuilds generations 0-2 from
    # the logged seeds and rewards on the base model, then runs 3 and 4
    replayed = tmp_path / "replayed.h5"
    shutil.copy(tmp_path / "l2.h5", replayed)
    with h5py.File(replayed, "r+") as f:
        f.attrs["complete_generations"] = 3
        for name in list(f["checkpoints"]):
            del f["checkpoints"][name]
    result = run_cli(["resume", replayed, "--generations", "5"])
    assert result.returncode == 0, result.stderr
    assert_same_trajectory(replayed, tmp_path / "l2.h5")

    # export: the exported weights are the ones the run recorded (its checksum covers the
    # trained tensors, the matrices; the rest must still be the base model's)
    from transformers import AutoModelForCausalLM

    assert run_cli(["export", tmp_path / "l2.h5", tmp_path / "out"]).returncode == 0
    params = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                       dtype=torch.float32).named_parameters())
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_model,
                                                     dtype=torch.float32).named_parameters())
    assert all(torch.equal(params[k], base[k]) for k in params if k not in d)
    got = checksum({k: p for k, p in params.items() if k in d})  # in model order
    assert f"{got:016x}" == f"{int(rows(tmp_path / 'l2.h5')['checksum'][-1]):016x}"


def test_lowrank_antithetic_bf16_two_ranks_match_one(tiny_model, tmp_path):
    extra = [*LOWRANK, "--population", "4", "--antithetic", "--dtype", "bfloat16",
             "--member-batch", "3"]
    train(tiny_model, tmp_path / "b2.h5", 3, np=2, extra=extra)
    train(tiny_model, tmp_path / "b1.h5", 3, extra=extra)
    assert_same_trajectory(tmp_path / "b1.h5", tmp_path / "b2.h5")


def test_traffic_counted_outside_the_engine_is_o_n_scalars_whatever_the_model(
        tiny_model, tmp_path):
    """Every byte the communicator moves, counted by a proxy outside es-mpi
    (tests/count_mpi_bytes.py): per generation, rank 0 sends its members' 48-byte rows
    and 4 int64, and receives all N rows and 4 int64 per rank, for a model 4x larger
    too; what set-up moves is far below one copy of the weights (a weight broadcast
    would fail here). The engine's own comm_bytes agrees."""
    from tiny_model import make_tiny_model

    script = Path(__file__).parent / "count_mpi_bytes.py"
    big = make_tiny_model(tmp_path / "big", hidden_size=64, layers=4)
    weights = (big / "model.safetensors").stat().st_size
    counted, recorded = {}, {}
    for name, model in (("small", tiny_model), ("big", big)):
        for g in (2, 4):
            run = tmp_path / f"{name}{g}.h5"
            result = run_python_mpi(script, ["train", "--model", model, "--run", run, *ARGS,
                                             "--generations", g, "-q"], np=2)
            assert result.returncode == 0, result.stdout + result.stderr
            lines = [json.loads(ln.split(" ", 1)[1]) for ln in result.stdout.splitlines()
                     if ln.startswith("COUNTED ")]
            counted[name, g] = {c["rank"]: c for c in lines}
            recorded[name, g] = rows(run)["comm_bytes"].tolist()
    for name in ("small", "big"):
        two, four = counted[name, 2], counted[name, 4]
        assert sorted(two) == [0, 1]
        # generations 3 and 4 alone: population 5 on 2 ranks, members 0, 2, 4 on rank 0
        per_gen = {r: ((four[r]["sent"] - two[r]["sent"]) // 2,
                       (four[r]["received"] - two[r]["received"]) // 2) for r in (0, 1)}
        assert per_gen == {0: (3 * 48 + 32, 5 * 48 + 2 * 32), 1: (2 * 48 + 32, 5 * 48 + 2 * 32)}
        assert recorded[name, 4] == [sum(per_gen[0])] * 4  # the engine's own counter
        setup = two[0]["sent"] + two[0]["received"] - 2 * sum(per_gen[0])
        assert 0 < setup < weights / 20, (setup, weights)
    assert weights > 200_000


