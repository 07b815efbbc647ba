"""es_mpi.tooling.scaling: the communication model against hand-computed figures, real 1- and
2-rank training runs measured on a tiny model, and the allgather microbenchmark's bytes
against what MPI delivered."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from conftest import need_mpiexec

from es_mpi.tooling import scaling


def test_comm_model_bytes_and_latency_by_hand():
    # N=8 on 2 ranks: rank 0 sends its 4 rows of 48 B and its 4 int64, and receives the
    # whole receive buffers: 8 rows and 2 x 4 int64
    m = scaling.comm_model(8, 2, alpha=1e-6, beta=1e-9)
    assert (m["sent"], m["received"]) == (4 * 48 + 32, 8 * 48 + 2 * 32) == (224, 448)
    # recursive doubling, P=2: one step each, half of the gathered bytes cross
    # rows: 1e-6 + 1e-9 * 384 / 2, ints: 1e-6 + 1e-9 * 64 / 2
    assert m["seconds"] == pytest.approx(2e-6 + 192e-9 + 32e-9, rel=1e-12)
    # N=4096 on 64 ranks: 64 rows out, 4096 rows and 64 x 32 B in; 6 steps each
    m = scaling.comm_model(4096, 64, alpha=2e-6, beta=0.0)
    assert (m["sent"], m["received"]) == (3104, 198656)
    assert m["seconds"] == pytest.approx(2 * 6 * 2e-6)
    # uneven: N=5 on 2 ranks, rank 0 has 3 members; P=3 takes ceil(log2 3) = 2 steps
    assert scaling.comm_model(5, 2, 0, 0)["sent"] == 3 * 48 + 32
    assert scaling.comm_model(6, 3, 1.0, 0.0)["seconds"] == 4.0
    assert scaling.comm_model(8, 1, 1.0, 1.0)["seconds"] == 0.0  # no collective to wait on
    # a ring takes P - 1 steps: 3 per allgather on 4 ranks
    assert scaling.comm_model(8, 4, 1.0, 0.0, algorithm="ring")["seconds"] == 6.0


# Synthetic allgather timings written out by hand from T = 2 alpha ceil(log2 P) + beta M
# (P-1)/P, M = N x 48 B of rows + P x 4 x 8 B of ints (the two collectives of a generation):
# P = 2, alpha 5 us, beta 0.3 ns/B: T = 1e-5 + 3e-10 (24 N + 32)
TWO_RANKS = {8: 1.00672e-5, 64: 1.04704e-5, 512: 1.3696e-5, 4096: 3.95008e-5}
# P = 4 (2 steps), alpha 1 us, beta 1 ns/B: T = 4e-6 + 1e-9 (36 N + 96)
FOUR_RANKS = {16: 4.672e-6, 256: 1.3312e-5, 1024: 4.096e-5}


def measurement(ranks: int, seconds: dict[int, float]) -> dict:
    return {"ranks": ranks, "row_bytes": 48,
            "sizes": {str(n): {"seconds": t} for n, t in seconds.items()}}


@pytest.mark.parametrize("ranks,seconds,alpha,beta", [(2, TWO_RANKS, 5e-6, 3e-10),
                                                      (4, FOUR_RANKS, 1e-6, 1e-9)])
def test_fit_recovers_alpha_beta_of_timings_written_by_hand(ranks, seconds, alpha, beta):
    fitted = scaling.fit_alpha_beta(measurement(ranks, seconds))
    assert fitted == pytest.approx((alpha, beta), rel=1e-6)


def test_fit_of_noisy_timings_is_the_least_relative_squares():
    """Timings off the model by -10..+10 % (a loaded machine): the fit minimizes the sum
    of squared relative errors, so its sum is at most the true constants' own,
    0.1^2 + 0.1^2 + 0.05^2 + 0.05^2 = 0.025; a fit that fell back to latency only or
    weighted the sizes otherwise would not get there."""
    noise = {8: 1.10, 64: 0.90, 512: 1.05, 4096: 0.95}
    noisy = {n: t * noise[n] for n, t in TWO_RANKS.items()}
    alpha, beta = scaling.fit_alpha_beta(measurement(2, noisy))
    assert alpha > 0 and beta > 0
    err = sum(((2 * alpha + beta * (24 * n + 32)) / t - 1) ** 2 for n, t in noisy.items())
    assert err <= 0.025 * (1 + 1e-9)
    # the least squares of 4 points by 2 constants is no exact fit: some point is missed
    assert err > 0.001


def test_fit_falls_back_to_latency_only_when_bigger_is_faster():
    """Timings that fall with the size (the first size hit by a busy spell) give no
    bandwidth term: beta 0, alpha the median over sizes of T / (2 ceil(log2 P))."""
    fitted = scaling.fit_alpha_beta(measurement(2, {8: 5e-5, 512: 3e-5, 4096: 2e-5}))
    assert fitted == pytest.approx((1.5e-5, 0.0), rel=1e-12)  # of 2.5, 1.5 and 1 x 1e-5


@pytest.fixture(scope="module")
def measured(tiny_model, tmp_path_factory):
    need_mpiexec()
    keep = tmp_path_factory.mktemp("scaling")
    report = scaling.measure(str(tiny_model), population=4, prompts=2, max_new_tokens=3,
                             generations=3, ranks=(1, 2), repeat=1, keep_dir=str(keep),
                             extra_args=("--antithetic", "--sigma", "0.05"))
    return report, keep


def read(path):
    with h5py.File(path, "r") as f:
        n = f.attrs["complete_generations"]
        return {k: f["generations"][k][:n] for k in ("checksum", "world_size", "seeds",
                                                     "time_total", "time_io")}


@pytest.mark.mpi
def test_measure_runs_1_and_2_ranks_and_reports_their_figures(measured):
    report, keep = measured
    files = {p.name: read(p) for p in keep.glob("*.h5")}
    assert set(files) == {"full-strong-1-0.h5", "full-strong-2-0.h5", "full-weak-2-0.h5"}
    strong1, strong2 = files["full-strong-1-0.h5"], files["full-strong-2-0.h5"]
    weak2 = files["full-weak-2-0.h5"]
    # really 1 and 2 ranks, 3 generations each; weak scaling doubled N on 2 ranks
    assert list(strong1["world_size"]) == [1, 1, 1]
    assert list(strong2["world_size"]) == list(weak2["world_size"]) == [2, 2, 2]
    assert strong1["seeds"].shape == strong2["seeds"].shape == (3, 4)
    assert weak2["seeds"].shape == (3, 8)
    # N fixed: 2 ranks end with the 1-rank weights (the run files' own checksums)
    np.testing.assert_array_equal(strong1["checksum"], strong2["checksum"])
    assert report["strong"]["identical"]
    assert report["strong"]["final_checksums"] == [int(strong1["checksum"][-1])]

    def steady(g):  # generations 1.., the final checkpoint write (time_io) left out
        return float(np.median((g["time_total"] - g["time_io"])[1:]))

    t1, t2, w2 = steady(strong1), steady(strong2), steady(weak2)
    strong, weak = report["strong"]["ranks"], report["weak"]["ranks"]
    assert strong["1"]["seconds"]["median"] == pytest.approx(t1)
    assert strong["2"]["seconds"]["median"] == pytest.approx(t2)
    assert strong["2"]["speedup"] == pytest.approx(t1 / t2)
    assert strong["2"]["efficiency"] == pytest.approx(t1 / t2 / 2)
    assert weak["2"]["ratio"] == pytest.approx(w2 / t1)
    assert weak["1"]["ratio"] == 1.0 and weak["2"]["population"] == 8
    for row in (*strong.values(), *weak.values()):
        assert 0 < row["seconds"]["min"] <= row["seconds"]["median"] <= row["seconds"]["max"]
        assert row["seconds"]["max"] < 30  # a tiny model: seconds, not minutes
    # the recorded traffic of rank 0 is the model's: N=4 on 2 ranks (1 antithetic pair
    # each) 2 rows + 4 int64 out, 4 rows + 2 x 4 int64 in
    assert strong["2"]["comm_bytes"] == 2 * 48 + 32 + 4 * 48 + 64
    model = scaling.comm_model(4, 2, 0, 0)
    assert strong["2"]["comm_bytes"] == model["sent"] + model["received"]
    md = scaling.table(report)
    assert "| full | strong | 2 | 4 |" in md and "bit-identical" in md


@pytest.mark.mpi
def test_measure_lowrank_gives_every_rank_a_batch(tiny_model, tmp_path):
    need_mpiexec()
    # N per rank 2: on 2 ranks the weak run is the strong one (N=4), measured once
    report = scaling.measure(str(tiny_model), mode="lowrank", population=4,
                             population_per_rank=2, prompts=1, max_new_tokens=2,
                             generations=3, ranks=(2,), repeat=1, keep_dir=str(tmp_path))
    assert [p.name for p in tmp_path.glob("*.h5")] == ["lowrank-strong-2-0.h5"]
    assert report["settings"]["member_batch"] == 2
    assert any("--member-batch 2" in n for n in report["notes"])
    with h5py.File(tmp_path / "lowrank-strong-2-0.h5", "r") as f:
        assert f["generations/world_size"][0] == 2
        # one batch of 2 members per rank: both ranks evaluated members
        assert sorted(set(f["generations/eval_rank"][0].tolist())) == [0, 1]


@pytest.mark.mpi
def test_allgather_bytes_match_what_mpi_delivered():
    need_mpiexec()
    # N=3: uneven (rank 0 has 2 members, rank 1 one); N=8: the hand figure above
    result = scaling.allgather_latency(ranks=2, sizes=(3, 8), repeat=20, warmup=2)
    assert result["ranks"] == 2 and result["row_bytes"] == 48
    for n, sent, received in ((3, 2 * 48 + 32, 3 * 48 + 64), (8, 224, 448)):
        m = result["sizes"][str(n)]
        assert m["received_ok"]  # every rank's rows arrived, in rank order
        # the receive buffers MPI filled: N rows of 48 B, and a (2, 4) int64 array
        assert (m["received_rows_bytes"], m["received_ints_bytes"]) == (n * 48, 64)
        assert (m["sent_bytes"], m["received_bytes"]) == (sent, received)
        model = scaling.comm_model(n, 2, 0, 0)
        assert (model["sent"], model["received"]) == (sent, received)
        # es_mpi.dist's own counter: one iteration's sent + received
        assert m["dist_bytes_moved"] == sent + received
        assert 0 < m["rows_seconds"] < 0.1 and 0 < m["ints_seconds"] < 0.1
    # the table of the model fitted to this measurement (whatever the machine's load made
    # of the constants: the fit itself is tested on hand-written timings above): each row
    # is T = 2 alpha ceil(log2 P) + beta M (P-1)/P at its own bytes, written out here
    table = scaling.comm_table_rows(result, members_per_rank=4, ranks=(2, 4, 4096))
    alpha, beta = table["alpha"], table["beta"]
    assert alpha >= 0 and beta >= 0 and alpha + beta > 0
    assert [(r["ranks"], r["population"]) for r in table["rows"]] == [
        (2, 8), (4, 16), (4096, 16384)]
    row2, row4, row4096 = table["rows"]
    assert row2["measured_seconds"] == result["sizes"]["8"]["seconds"]
    assert "measured_seconds" not in row4  # measured on 2 ranks only
    assert row2["modelled_seconds"] == pytest.approx(2 * alpha + beta * (8 * 48 + 64) / 2)
    assert row4["modelled_seconds"] == pytest.approx(
        4 * alpha + beta * (16 * 48 + 128) * 3 / 4)
    assert row4096["modelled_seconds"] == pytest.approx(
        24 * alpha + beta * (16384 * 48 + 4096 * 32) * 4095 / 4096)
    assert (row4096["sent"], row4096["received"]) == (4 * 48 + 32, 16384 * 48 + 4096 * 32)
