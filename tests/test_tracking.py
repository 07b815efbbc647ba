"""--tensorboard: the run's scalars as TensorBoard event files, read back with
TensorBoard's own reader and compared with the run file read by h5py."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from conftest import need_modules, run_cli

from es_mpi import tracking
from es_mpi.errors import EsError


def scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files of `directory`, by tag, as (step, value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_holds_the_run_files_scalars_across_a_resume(tiny_model, tmp_path):
    need_modules("tensorboard", extra="track")  # CI installs the extra
    run, board = tmp_path / "run.h5", tmp_path / "board"
    args = ["train", "--model", tiny_model, "--run", run, "--population", "4", "--antithetic",
            "--max-new-tokens", "4", "--eval-every", "2", "--eval-limit", "2",
            "--tensorboard", board, "--seed", "5"]
    first = run_cli([*args, "--generations", "2"], np=2)
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_cli([*args, "--generations", "3"], np=2)  # continues the same run
    assert second.returncode == 0, second.stderr[-2000:]

    got = scalars(board)
    with h5py.File(run, "r") as f:
        reward_mean = f["generations/reward_mean"][:3]
        reward_std = f["generations/reward_std"][:3]
        disagree = f["generations/pair_disagree"][:3]
        eval_gen, eval_reward = f["eval/generation"][:], f["eval/mean_reward"][:]
    # one point per generation, steps 1..3, none repeated by the resume
    assert [step for step, _ in got["reward/mean"]] == [1, 2, 3]
    np.testing.assert_allclose([v for _, v in got["reward/mean"]], reward_mean, rtol=1e-6)
    np.testing.assert_allclose([v for _, v in got["reward/std"]], reward_std, rtol=1e-6)
    np.testing.assert_allclose([v for _, v in got["diagnostics/pair_disagree"]], disagree,
                               rtol=1e-6)
    # held-out at the start, after 2 and at the end (3)
    assert list(eval_gen) == [0, 2, 3]
    assert [step for step, _ in got["held_out/mean_reward"]] == [0, 2, 3]
    np.testing.assert_allclose([v for _, v in got["held_out/mean_reward"]], eval_reward,
                               rtol=1e-6)
    assert "held_out/kl" not in got  # not measured (no --eval-kl): NaN is not plotted
    assert {"time/total", "time/generate", "comm/bytes"} <= got.keys()


def test_a_missing_tensorboard_is_one_error_before_any_work(monkeypatch):
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EsError, match="--tensorboard needs the tensorboard package"):
        tracking.check("runs/board")
    tracking.check("")  # not asked for: nothing to check


def test_a_directory_that_cannot_be_made_is_one_error(tmp_path):
    need_modules("tensorboard", extra="track")
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(EsError, match=f"--tensorboard {afile}/board: {afile} exists and is "
                       "not a directory"):
        tracking.check(str(afile / "board"))
    tracking.check(str(tmp_path / "new" / "board"))  # made when the run starts
    assert not (tmp_path / "new").exists()  # the check itself makes nothing
