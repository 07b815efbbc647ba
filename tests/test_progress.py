"""Rank 0's progress lines: content, --quiet/--verbose, the live line on a terminal only."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from click.testing import CliRunner

from es_mpi import progress
from es_mpi.cli import cli
from es_mpi.progress import Progress, format_rate, format_seconds

TINY_ARGS = ["--population", "4", "--max-new-tokens", "4", "--sigma", "0.05", "--lr", "0.05"]


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def row(**extra) -> dict:
    r = {"reward_mean": -4.25, "reward_min": -6.5, "reward_max": -2.0, "time_total": 2.0,
         "time_eval": 1.5, "time_gather": 0.1, "time_update": 0.2, "time_checksum": 0.05,
         "time_io": 0.05, "tokens": np.array([100, 200, 300]),
         "eval_seconds": np.array([0.5, 0.5, 1.0]), "eval_rank": np.array([0, 1, 0])}
    r.update(extra)
    return r


def test_format_seconds_and_rate():
    assert [format_seconds(s) for s in (0.4, 42, 125, 3 * 3600 + 7 * 60)] == \
        ["0s", "42s", "2m05s", "3h07m"]
    assert format_rate(400.4) == "400 tok/s" and format_rate(1234) == "1.2k tok/s"


def test_generation_line_has_rewards_time_throughput_eta_and_held_out():
    out = io.StringIO()
    p = Progress(stream=out)
    p.generation(2, 10, row(), held_out="mean reward -3 on 6 held-out examples")
    line = out.getvalue()
    assert line.count("\n") == 1
    assert line.startswith("gen  3/10  reward mean -4.25 min -6.5 max -2  2.0s  400 tok/s  ")
    assert "ETA 14s" in line  # 7 generations left at 2 s each
    assert line.rstrip().endswith("| held-out mean reward -3 on 6 held-out examples")


def test_quiet_prints_no_generation_lines_and_verbose_adds_every_phase():
    quiet = io.StringIO()
    p = Progress(progress.QUIET, stream=quiet)
    p.info("header")
    p.generation(0, 2, row())
    assert quiet.getvalue() == ""
    assert p.seconds == [2.0]  # still counted for the ETA

    loud = io.StringIO()
    # a timing field a later engine adds shows up without changes to the printer
    Progress(progress.VERBOSE, stream=loud).generation(0, 2, row(time_noise=0.3,
                                                                 time_generate=1.2))
    lines = loud.getvalue().splitlines()
    assert lines[0].startswith("gen 1/2")
    assert "eval 1.50s" in lines[1] and "noise 0.30s" in lines[1] and "other" in lines[1]
    assert "generate 1.20s" in lines[2]  # a part of eval, not a phase of its own
    assert lines[3] == "    evaluation per rank: r0 1.50s  r1 0.50s"


def test_other_ranks_print_nothing():
    out = io.StringIO()
    p = Progress(progress.VERBOSE, enabled=False, stream=out, live=True)
    p.info("x")
    with p.running(0, 2):
        time.sleep(0.01)
    p.generation(0, 2, row())
    assert out.getvalue() == ""
    assert not progress.current(root=False).enabled


def test_live_line_is_redrawn_on_a_terminal_only(monkeypatch):
    monkeypatch.setattr(progress, "TICK_SECONDS", 0.01)
    term = FakeTerminal()
    p = Progress(stream=term)
    assert p.live
    p.seconds = [4.0]
    with p.running(1, 5):
        time.sleep(0.1)
    p.generation(1, 5, row())
    text = term.getvalue()
    assert "\r\033[Kgen 2/5  running 0s  (~4.0s/gen)  ETA" in text
    assert text.endswith("\n") and "\r\033[Kgen 2/5  reward mean" in text

    plain = io.StringIO()
    p = Progress(stream=plain)
    assert not p.live
    with p.running(1, 5):
        time.sleep(0.05)
    assert plain.getvalue() == ""


def test_live_line_is_cleared_when_the_generation_fails(monkeypatch):
    monkeypatch.setattr(progress, "TICK_SECONDS", 0.01)
    term = FakeTerminal()
    with pytest.raises(RuntimeError), Progress(stream=term).running(0, 3):
        time.sleep(0.05)
        raise RuntimeError("boom")
    assert term.getvalue().endswith("\r\033[K")


def train(args):
    return CliRunner().invoke(cli, ["train", *map(str, args)], catch_exceptions=False)


def test_train_quiet_normal_verbose(tiny_model, tmp_path):
    base = ["--model", tiny_model, *TINY_ARGS, "--generations", "2"]
    normal = train([*base, "--run", tmp_path / "n.h5"])
    assert normal.exit_code == 0, normal.output
    lines = normal.output.splitlines()
    assert [ln.split()[1] for ln in lines if ln.startswith("gen ")] == ["1/2", "2/2"]
    assert "tok/s" in lines[1] and "\r" not in normal.output  # not a terminal: plain lines
    assert "es-mpi: done. 2 generations, reward mean" in normal.output

    quiet = train([*base, "--run", tmp_path / "q.h5", "--quiet"])
    assert quiet.exit_code == 0, quiet.output
    assert quiet.output.startswith("es-mpi: done. 2 generations")
    assert "gen " not in quiet.output and "members x" not in quiet.output

    verbose = train([*base, "--run", tmp_path / "v.h5", "-v"])
    assert verbose.exit_code == 0, verbose.output
    assert verbose.output.count("    phases: eval ") == 2
    assert verbose.output.count("    evaluation per rank: r0 ") == 2

