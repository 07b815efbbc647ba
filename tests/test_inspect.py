"""`es-mpi inspect --json` says what the run file holds, read back here with plain h5py."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from es_mpi.cli import cli


def invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("inspect") / "run.h5"
    result = invoke(["train", "--model", tiny_model, "--run", path, "--population", "4",
                     "--max-new-tokens", "4", "--sigma", "0.05", "--lr", "0.05",
                     "--generations", "6", "--checkpoint-every", "2", "--eval-every", "4",
                     "--quiet"])
    assert result.exit_code == 0, result.output
    return path


def test_inspect_json_matches_the_file(run):
    result = invoke(["inspect", run, "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    with h5py.File(run, "r") as f:
        attrs = f.attrs
        done = int(attrs["complete_generations"])
        gen = f["generations"]
        assert got["path"] == str(run) and got["file_bytes"] == os.path.getsize(run)
        assert got["config"] == json.loads(attrs["config"])
        assert got["task"] == attrs["task"] == got["config"]["task"]
        assert got["model"] == {"path": attrs["model_path"],
                                "fingerprint": attrs["model_fingerprint"]}
        assert got["task_fingerprint"] == attrs["task_fingerprint"]
        assert got["format_version"] == attrs["format_version"]
        assert got["es_mpi_version"] == attrs["es_mpi_version"]
        assert got["created"] == attrs["created"]
        assert got["generations_complete"] == done == 6
        assert got["generations_target"] == 6
        checkpoints = sorted(int(g.attrs["generation"]) for g in f["checkpoints"].values()
                             if g.attrs.get("complete"))
        assert got["checkpoints"] == checkpoints == [4, 6]  # keep_checkpoints 2: 2 dropped
        assert got["world_sizes"] == sorted(set(gen["world_size"][:done].tolist())) == [1]
        assert got["seconds_total"] == pytest.approx(gen["time_total"][:done].sum())
        last = got["last_generations"]
        assert [g["generation"] for g in last] == list(range(done - 5, done))
        for name in ("reward_mean", "reward_min", "reward_max"):
            np.testing.assert_array_equal([g[name] for g in last], gen[name][done - 5:done])
        ev = f["eval"]
        assert [e["generation"] for e in got["evals"]] == ev["generation"][:].tolist() == \
            [0, 4, 6]
        np.testing.assert_array_equal([e["mean_reward"] for e in got["evals"]],
                                      ev["mean_reward"][:])
        assert all(e["accuracy"] is None for e in got["evals"])  # conciseness: no "solved"
        assert [e["n_examples"] for e in got["evals"]] == ev["n_examples"][:].tolist()


def test_inspect_text(run):
    result = invoke(["inspect", run])
    assert result.exit_code == 0, result.output
    out = result.output
    for text in (f"run file     {run}", "MiB", "model        ", "fingerprint",
                 "generations  6 of 6 complete", "checkpoints  [4, 6]", "  gen 6: reward mean",
                 "held-out     after 6 generations"):
        assert text in out, text
