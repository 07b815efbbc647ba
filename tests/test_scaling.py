"""es_mpi.scaling: the communication model against hand-computed figures, real 1- and
2-rank training runs measured on a tiny model, and the allgather microbenchmark's bytes
against what MPI delivered."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from conftest import need_mpiexec

from es_mpi import scaling


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


def test_fit_recovers_alpha_beta_of_a_synthetic_measurement():
    alpha, beta = 5e-6, 3e-10
    sizes = {}
    for n in (8, 64, 512, 4096):
        sizes[str(n)] = {"seconds": scaling.comm_model(n, 2, alpha, beta)["seconds"]}
    fitted = scaling.fit_alpha_beta({"ranks": 2, "row_bytes": 48, "sizes": sizes})
    assert fitted == pytest.approx((alpha, beta), rel=1e-6)


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
    # the fitted model reproduces the 2-rank measurement it was fitted to, roughly
    table = scaling.comm_table_rows(result, members_per_rank=4, ranks=(2, 4, 4096))
    assert [r["ranks"] for r in table["rows"]] == [2, 4, 4096]
    row2 = table["rows"][0]
    assert row2["measured_seconds"] == result["sizes"]["8"]["seconds"]
    assert row2["modelled_seconds"] == pytest.approx(row2["measured_seconds"], rel=0.5)
    assert table["rows"][2]["received"] == 4 * 4096 * 48 + 4096 * 32
