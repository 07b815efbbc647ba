"""The HDF5 run file: layout, commit protocol, bit-exact checkpoints, bad files."""

import h5py
import numpy as np
import pytest
import torch

from es_mpi import runfile
from es_mpi.config import Config
from es_mpi.errors import EsError
from es_mpi.es import checksum


def _row(n, b, g):
    row = {name: (np.full(n if kind == "n" else b, g) if kind else float(g))
           for name, (_, kind) in runfile.GENERATION_FIELDS.items()}
    row["rewards"] = np.arange(n) * 0.5 + g
    return row


def _write(path, generations=3, population=4):
    cfg = Config(model="m", population=population, generations=generations)
    w = runfile.RunWriter.create(path, cfg, "m", "abcd", "ef01", n_prompts=2)
    for g in range(generations):
        w.append_generation(g, _row(population, 2, g))
        w.commit(g)
    return w


def test_layout_is_plain_h5py(tmp_path):
    path = tmp_path / "run.h5"
    _write(path).close()
    with h5py.File(path, "r") as f:
        assert f.attrs["format_version"] == runfile.FORMAT_VERSION
        assert f.attrs["complete_generations"] == 3
        assert Config.from_json(f.attrs["config"]).population == 4
        assert f["generations/seeds"].shape == (3, 4) and f["generations/seeds"].dtype == "i8"
        assert f["generations/rewards"].dtype == "f8"
        assert f["generations/prompt_ids"].shape == (3, 2)
        assert f["generations/time_total"].shape == (3,)
        np.testing.assert_array_equal(f["generations/rewards"][2], [2, 2.5, 3, 3.5])
    info = runfile.read_info(path)
    assert info.complete_generations == 3 and info.checkpoints == []
    assert info.model_fingerprint == "abcd"


def rows_of(tensors):
    from es_mpi.record import base_rows

    return base_rows(tensors)


def test_uncommitted_generation_is_ignored_then_dropped(tmp_path):
    path = tmp_path / "run.h5"
    w = _write(path, generations=2)
    w.append_generation(2, _row(4, 2, 2))           # written, flushed, never committed
    w.write_checkpoint(3, 0, {}, rows_of({}), keep=2)  # a checkpoint beyond the commit, too
    w.close()
    assert runfile.read_info(path).complete_generations == 2
    assert runfile.read_info(path).checkpoints == []
    assert len(runfile.read_generations(path)["rewards"]) == 2
    runfile.RunWriter.open_append(path).close()
    with h5py.File(path, "r") as f:
        assert f["generations/rewards"].shape == (2, 4)
        assert list(f["checkpoints"]) == []


def test_checkpoint_is_bit_exact_even_where_delta_rounds(tmp_path):
    theta0 = {"w": torch.tensor([1.0, 0.5, -3.0, 1e-3, 7.0]), "b": torch.randn(3, 4)}
    # 1.0 -> 1e-30 and 1e-3 -> -2.0: fp32(theta0 + (theta - theta0)) != theta there
    theta = {"w": torch.tensor([1e-30, 0.5000001, -3.0, -2.0, 7.25]),
             "b": theta0["b"] + 1e-4 * torch.randn(3, 4)}
    path = tmp_path / "run.h5"
    w = _write(path, generations=2)
    w.write_checkpoint(2, checksum(theta), theta, rows_of(theta0), keep=2)
    w.close()
    with h5py.File(path, "r") as f:
        group = f["checkpoints/00000002"]
        assert group.attrs["generation"] == 2
        assert "fixups" in group and "w" in group["fixups"]
        np.testing.assert_array_equal(group["w"][...], (theta["w"] - theta0["w"]).numpy())
    master = {n: t.clone() for n, t in theta0.items()}
    runfile.apply_checkpoint_(path, 2, master)
    for n in theta:
        assert torch.equal(master[n], theta[n]), n
    assert checksum(master) == runfile.checkpoint_checksum(path, 2)


def test_keep_checkpoints_drops_the_oldest(tmp_path):
    path = tmp_path / "run.h5"
    w = _write(path, generations=5)
    t = {"w": torch.zeros(1000)}
    for g in range(1, 6):
        w.write_checkpoint(g, 0, {n: v + g for n, v in t.items()}, rows_of(t), keep=2)
    w.close()
    assert runfile.read_info(path).checkpoints == [4, 5]


def test_bad_files_are_named(tmp_path):
    with pytest.raises(EsError, match="does not exist"):
        runfile.read_info(tmp_path / "nope.h5")
    text = tmp_path / "text.h5"
    text.write_text("hello")
    with pytest.raises(EsError, match="cannot be opened as HDF5"):
        runfile.read_info(text)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = 1
    with pytest.raises(EsError, match="not an es-mpi run file"):
        runfile.read_info(other)
    newer = tmp_path / "newer.h5"
    _write(newer).close()
    with h5py.File(newer, "r+") as f:
        f.attrs["format_version"] = runfile.FORMAT_VERSION + 1
    with pytest.raises(EsError, match="newer than this es-mpi"):
        runfile.read_info(newer)


def test_create_refuses_existing_file_and_missing_dir(tmp_path):
    path = tmp_path / "run.h5"
    _write(path).close()
    with pytest.raises(EsError, match="already exists"):
        runfile.RunWriter.create(path, Config(model="m"), "m", "x", "y", 1)
    with pytest.raises(EsError, match="does not exist"):
        runfile.check_writable(tmp_path / "no" / "run.h5")


def test_readers_work_while_a_run_writes_and_a_second_writer_is_refused(tmp_path):
    from conftest import run_cli

    path = tmp_path / "run.h5"
    writer = _write(path, generations=2)
    try:
        result = run_cli(["inspect", path, "--json"])
        assert result.returncode == 0, result.stderr
        assert '"generations_complete": 2' in result.stdout
        second = run_cli(["resume", path, "--generations", "5"])
        assert second.returncode == 2
        assert "is open in another process" in second.stderr
    finally:
        writer.close()


def test_checkpoint_of_tensors_larger_than_a_write_block(tmp_path):
    """Tensors written and read back a block of rows at a time (5M elements > 4M)."""
    gen = torch.Generator().manual_seed(0)
    theta0 = {"big": torch.randn(2500, 2000, generator=gen), "vec": torch.randn(7, generator=gen),
              "odd": torch.randn(3, 5, 4, generator=gen), "scalar": torch.randn((), generator=gen)}
    theta = {n: t + 1e-3 * torch.randn(t.shape, generator=gen) for n, t in theta0.items()}
    theta["big"][2499, 1999] = 1e-30  # a fix-up in the last block
    path = tmp_path / "run.h5"
    w = _write(path, generations=1)
    w.write_checkpoint(1, checksum(theta), theta, rows_of(theta0), keep=2)
    w.close()
    master = {n: t.clone() for n, t in theta0.items()}
    runfile.apply_checkpoint_(path, 1, master)
    for n in theta:
        assert torch.equal(master[n], theta[n]), n
