"""`es-mpi report` on real small run files: PNGs that exist and show something, overlays."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import run_cli

sys.path.insert(0, str(Path(__file__).parent.parent / "tools"))
import experiments  # tools/experiments.py: the results tables

from es_mpi import runfile
from es_mpi.cli import cli
from es_mpi.tooling import report

pytest.importorskip("matplotlib")

TINY_ARGS = ["--population", "4", "--max-new-tokens", "4", "--lr", "0.05", "--generations",
             "3", "--eval-every", "2"]
SINGLE = {"reward.png", "heldout.png", "diagnostics.png", "phases.png", "ranks.png"}


def invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """Two seeds at sigma 0.05 (seed 1 on two ranks) and one run at sigma 0.02."""
    tmp = tmp_path_factory.mktemp("report")
    paths = {"s0": tmp / "s0.h5", "s1": tmp / "s1.h5", "g2": tmp / "g2.h5"}
    for name, extra in (("s0", ["--seed", "0", "--sigma", "0.05"]),
                        ("g2", ["--seed", "0", "--sigma", "0.02"])):
        result = invoke(["train", "--model", tiny_model, "--run", paths[name], *TINY_ARGS,
                         *extra])
        assert result.exit_code == 0, result.output
    two = run_cli(["train", "--model", tiny_model, "--run", paths["s1"], *TINY_ARGS,
                   "--seed", "1", "--sigma", "0.05"], np=2)
    assert two.returncode == 0, two.stderr
    # only rank 0 prints: one line per generation and one summary, not two
    lines = two.stdout.splitlines()
    assert [ln.split()[1] for ln in lines if ln.startswith("gen ")] == ["0:", "1/3", "2/3", "3/3"]
    assert two.stdout.count("es-mpi: done.") == 1
    return paths


def assert_picture(path):
    """A real plot: PNG of the expected size with lines, bands and text on it."""
    import matplotlib.image

    assert path.stat().st_size > 10_000, path
    img = matplotlib.image.imread(path)
    assert img.shape[1] == 700 and img.shape[0] >= 250, img.shape
    rgb = img[..., :3]
    drawn = (rgb < 0.9).any(axis=-1).mean()
    colors = len(np.unique((rgb * 255).astype(np.uint8).reshape(-1, 3), axis=0))
    assert drawn > 0.03 and colors > 50, (path, drawn, colors)


def test_report_of_one_run(runs, tmp_path):
    out = tmp_path / "one"
    rep = report.write_report([runs["s1"]], out)
    assert {p.name for p in rep.files} == SINGLE | {"summary.md"}
    for name in SINGLE:
        assert_picture(out / name)
    assert rep.legends["reward.png"] == ["population mean", "mean \u00b1 std",
                                         "min \u2013 max over members"]
    assert rep.legends["ranks.png"][:2] == ["rank 0", "rank 1"]  # made on two ranks
    assert rep.legends["phases.png"][0].startswith("evaluate")
    summary = (out / "summary.md").read_text()
    rewards = runfile.read_generations(runs["s1"])["reward_mean"]
    best = int(np.argmax(rewards))
    assert f"best {rewards[best]:.4g} at generation {best + 1}" in summary
    assert "held-out mean reward | -" in summary and "world size(s) [2]" in summary
    for name in SINGLE:
        assert f"]({name})" in summary


def test_report_overlays_two_run_files(runs, tmp_path):
    """The CLI in a real process (headless), then the labels of the overlay."""
    out = tmp_path / "two"
    result = run_cli(["report", runs["s0"], runs["g2"], "-o", out])
    assert result.returncode == 0, result.stderr
    assert f"report in {out}/" in result.stdout
    for name in ("reward.png", "heldout.png", "phases.png", "summary.md"):
        assert (out / name).is_file()
    for run in ("s0", "g2"):
        assert {p.name for p in (out / run).iterdir()} == SINGLE
    assert_picture(out / "reward.png")
    rep = report.write_report([runs["s0"], runs["g2"]], tmp_path / "again")
    assert rep.legends["reward.png"] == ["sigma=0.05", "sigma=0.02"]
    assert rep.legends["heldout.png"] == ["sigma=0.05", "sigma=0.02"]
    summary = (out / "summary.md").read_text()
    assert "| sigma=0.05 | " in summary and "| sigma=0.02 | " in summary


def test_seeds_of_one_setting_are_drawn_as_mean_and_spread(runs, tmp_path):
    rep = report.write_report([runs["s0"], runs["s1"], runs["g2"]], tmp_path / "sweep")
    assert rep.legends["reward.png"] == ["sigma=0.05 (2 seeds)", "sigma=0.02, seed=0"]
    assert_picture(tmp_path / "sweep" / "reward.png")
    summary = (tmp_path / "sweep" / "summary.md").read_text()
    last = [runfile.read_generations(runs[r])["reward_mean"][-1] for r in ("s0", "s1")]
    assert f"| sigma=0.05 (2 seeds) | 2 | {np.mean(last):.4g} \u00b1 {np.std(last):.2g} |" \
        in summary


def test_runs_with_the_same_settings_are_labelled_by_file(runs, tmp_path):
    copy = tmp_path / "copy.h5"
    shutil.copy(runs["s0"], copy)
    loaded = [report.load_run(p) for p in (runs["s0"], copy)]
    report.label_runs(loaded)
    assert [r.label for r in loaded] == ["s0", "copy"]
    assert [label for label, _ in report.group_runs(loaded)] == ["mean of 2 runs"]


def test_phase_plot_picks_up_new_timing_fields(runs, tmp_path, monkeypatch):
    path = tmp_path / "noise.h5"
    shutil.copy(runs["s0"], path)
    with h5py.File(path, "r+") as f:
        g = int(f.attrs["complete_generations"])
        f["generations/time_noise"] = np.full(g, 0.5)
    monkeypatch.setitem(runfile.GENERATION_FIELDS, "time_noise", ("f8", ""))
    rep = report.write_report([path], tmp_path / "out")
    assert "noise" in rep.legends["phases.png"]
    run = report.load_run(path)
    segments = dict(report._phase_segments(run))
    total = sum(segments.values())
    np.testing.assert_allclose(np.maximum(total, run.gens["time_total"]), total)


def test_report_bad_input_is_one_error_line(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = 1
    result = invoke(["report", other, "-o", tmp_path / "out"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"es-mpi: error: {other} is an HDF5 file but not an es-mpi run file "
        "(no format_version/config attributes)"]
    assert not (tmp_path / "out").exists()


def test_results_table_of_seeds_and_of_a_reward_that_is_not_a_distance(runs, tmp_path):
    """tools/experiments.py table: numbers straight from the run files, the seed spread,
    and no gap-to-0 columns (nor a division by a 0 base score) for other rewards."""
    lines = experiments.table([runs["s0"], runs["s1"]]).splitlines()
    assert len(lines) == 5 and "gap closed" in lines[0]
    scores = {s: runfile.read_evals(runs[f"s{s}"])["mean_reward"] for s in (0, 1)}
    d = 1 if min(abs(scores[s][0]) for s in (0, 1)) >= 10 else 3  # the table's decimals
    for seed, line in zip((0, 1), lines[2:4], strict=True):
        base, best = scores[seed][0], scores[seed][1:].max()
        assert line.startswith(f"| full | {seed} | {base:.{d}f} | {best:.{d}f} (")
    best = [scores[s][1:].max() for s in (0, 1)]
    assert f"{np.mean(best):.{d}f} +- {np.std(best):.{d}f}" in lines[4]

    positive = tmp_path / "positive.h5"
    shutil.copy(runs["s0"], positive)
    with h5py.File(positive, "r+") as f:
        f["eval/mean_reward"][...] = np.arange(len(f["eval/mean_reward"]), dtype=float)
    lines = experiments.table([positive]).splitlines()
    assert "gap closed" not in lines[0] and "closed at" not in lines[0]
    assert lines[2].startswith("| full | 0 | 0.000 | 2.000 (3) | 2.000 (gen 3) |")
    curves = experiments.curves([positive]).splitlines()
    assert curves[0] == "| run | 0 | 2 | 3 |"
    assert curves[2] == "| positive | 0.000 | 1.000 | 2.000 |"


def test_results_table_has_a_kl_column_where_kl_was_measured(runs, tmp_path):
    lines = experiments.table([runs["s0"]]).splitlines()
    assert "KL to base" not in lines[0]  # not measured: NaN, no column
    measured = tmp_path / "kl.h5"
    shutil.copy(runs["s0"], measured)
    with h5py.File(measured, "r+") as f:
        scores = f["eval/mean_reward"][:]
        kls = np.linspace(0.0, 0.5, len(scores))
        f["eval/kl"][...] = kls
    best = 1 + int(np.argmax(scores[1:]))
    lines = experiments.table([measured, runs["s1"]]).splitlines()
    assert "| KL to base: best / last |" in lines[0]
    assert f"| {kls[best]:.3f} / {kls[-1]:.3f} |" in lines[2]
    assert "| - / - |" in lines[3]  # the run without KL
