"""GPU binding: each rank takes its GPU(s) by local rank. Skipped without CUDA."""

from __future__ import annotations

import textwrap

import pytest
import torch
from conftest import run_python_mpi

pytestmark = pytest.mark.cuda

needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@needs_two_gpus
def test_each_rank_binds_its_own_gpu(tmp_path):
    script = tmp_path / "bind.py"
    script.write_text(textwrap.dedent("""
        from es_mpi.dist import Dist, select_devices
        import torch
        d = Dist()
        devices = select_devices(d, 1)
        print(f"rank {d.rank} local {d.local_rank} device {devices[0]} "
              f"current {torch.cuda.current_device()}", flush=True)
    """))
    result = run_python_mpi(script, [], np=2)
    assert result.returncode == 0, result.stderr
    lines = sorted(ln for ln in result.stdout.splitlines() if ln.startswith("rank"))
    assert lines == ["rank 0 local 0 device cuda:0 current 0",
                     "rank 1 local 1 device cuda:1 current 1"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_too_many_ranks_per_node_is_a_clear_error(tmp_path):
    from es_mpi.dist import Dist, select_devices
    from es_mpi.errors import EsError

    d = Dist.serial()
    d.local_rank = torch.cuda.device_count()
    with pytest.raises(EsError, match="lower --gpus-per-rank"):
        select_devices(d, 1)
