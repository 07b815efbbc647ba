"""Rank -> GPU binding, device placement and the hardware identity, on a faked CUDA.

No GPU is needed: `FakeNode` stands in for a node's GPUs behind torch.cuda (device count,
properties with UUIDs, set_device), honouring CUDA_VISIBLE_DEVICES as the CUDA runtime
does. Each rank's view is made with the variables the launchers set (mpiexec: none, every
rank sees the node's GPUs; srun --gpus-per-task: each task's own CUDA_VISIBLE_DEVICES),
and every rank's binding is computed from all the views, as the allgather gives them.
The last test runs the same code under a real `mpiexec -n 2`.
"""

from __future__ import annotations

import os
import textwrap
from types import SimpleNamespace

import pytest
import torch
from conftest import run_python_mpi

from es_mpi import devices
from es_mpi.errors import EsError

H100 = dict(name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132,
            total_memory=80 * 10**9)


def node_uuids(host: str, n: int) -> list[str]:
    return [f"GPU-{host}-{i:04d}" for i in range(n)]


class FakeNode:
    """A host with GPUs (UUID -> properties) behind torch.cuda, for this process."""

    def __init__(self, monkeypatch, host: str, uuids: list[str], props: dict | None = None):
        self.host, self.uuids, self.props = host, uuids, props or H100
        self.current = 0
        self.mp = monkeypatch
        mp = monkeypatch
        mp.setattr(torch.cuda, "is_available", lambda: True)
        mp.setattr(torch.cuda, "device_count", lambda: len(self.visible()))
        mp.setattr(torch.cuda, "get_device_properties", self.properties)
        mp.setattr(torch.cuda, "set_device", self.set_device)
        mp.setattr(torch.cuda, "current_device", lambda: self.current)
        mp.setattr(devices.socket, "gethostname", lambda: self.host)

    def visible(self) -> list[str]:
        """CUDA_VISIBLE_DEVICES: indices or UUIDs, in the order given; unset: all."""
        env = os.environ.get("CUDA_VISIBLE_DEVICES")
        if env is None:
            return list(self.uuids)
        out = []
        for item in filter(None, env.split(",")):
            out.append(self.uuids[int(item)] if item.isdigit() else item)
        return out

    def properties(self, i):
        d = i.index if isinstance(i, torch.device) else i
        return SimpleNamespace(uuid=self.visible()[d], **self.props)

    def set_device(self, d):
        self.current = d.index if isinstance(d, torch.device) else d


class FakeDist:
    def __init__(self, rank: int, seen: list):
        self.rank, self.seen = rank, seen

    def allgather(self, obj):
        assert obj == self.seen[self.rank]  # each rank contributes its own view
        return list(self.seen)


def bind_all(monkeypatch, ranks: list[tuple[str, dict]], gpus_per_rank: int = 1,
             share: bool = False, gpus_per_host: int = 2) -> list[list[str]]:
    """Every rank's bound GPUs (as UUIDs), ranks given as (host, launcher variables)."""
    def view(host, env):
        with monkeypatch.context() as m:
            FakeNode(m, host, node_uuids(host, gpus_per_host))
            m.delenv("CUDA_VISIBLE_DEVICES", raising=False)
            for k, v in env.items():
                m.setenv(k, v)
            return host, devices.visible_gpus()

    seen = [view(h, e) for h, e in ranks]
    out = []
    for rank, (host, env) in enumerate(ranks):
        with monkeypatch.context() as m:
            node = FakeNode(m, host, node_uuids(host, gpus_per_host))
            m.delenv("CUDA_VISIBLE_DEVICES", raising=False)
            for k, v in env.items():
                m.setenv(k, v)
            bound = devices.bind(FakeDist(rank, seen), gpus_per_rank, share)
            assert node.current == bound[0].index  # the rank's first GPU is made current
            out.append([node.visible()[d.index] for d in bound])
    return out


def mpiexec_rank(rank: int, size: int) -> dict:
    """What MPICH's mpiexec sets: ranks, nothing about GPUs."""
    return {"PMI_RANK": str(rank), "PMI_SIZE": str(size)}


def srun_task(local: int, gpus: str) -> dict:
    """srun --gpus-per-task with device cgroups: each task sees its own GPUs, renumbered
    from 0 (CUDA_VISIBLE_DEVICES=0 in every task), but they are different GPUs."""
    return {"SLURM_LOCALID": str(local), "SLURM_PROCID": str(local),
            "CUDA_VISIBLE_DEVICES": gpus}


def test_mpiexec_ranks_take_the_node_gpus_in_turn(monkeypatch):
    got = bind_all(monkeypatch, [("a", mpiexec_rank(r, 2)) for r in range(2)])
    assert got == [["GPU-a-0000"], ["GPU-a-0001"]]
    got = bind_all(monkeypatch, [("a", mpiexec_rank(r, 2)) for r in range(2)],
                   gpus_per_rank=2, gpus_per_host=4)
    assert got == [["GPU-a-0000", "GPU-a-0001"], ["GPU-a-0002", "GPU-a-0003"]]


def test_ranks_bound_by_the_launcher_keep_their_own_gpu(monkeypatch):
    """srun with device cgroups: every task sees "GPU 0", each a different one. A rank
    per host on two hosts: each takes its host's GPU."""
    tasks = [("a", srun_task(0, "GPU-a-0000")), ("a", srun_task(1, "GPU-a-0001"))]
    assert bind_all(monkeypatch, tasks) == [["GPU-a-0000"], ["GPU-a-0001"]]
    hosts = [("a", mpiexec_rank(0, 2)), ("b", mpiexec_rank(1, 2))]
    assert bind_all(monkeypatch, hosts, gpus_per_host=1) == [["GPU-a-0000"], ["GPU-b-0000"]]


def test_two_ranks_on_one_gpu_are_refused_unless_asked_for(monkeypatch):
    """`visible == gpus_per_rank` took every GPU a rank saw: on a one-GPU node two ranks
    both took GPU 0, with mpiexec (or ES_MPI_LAUNCHER=mpiexec in a job that got one GPU)."""
    two = [("a", mpiexec_rank(r, 2)) for r in range(2)]
    with pytest.raises(EsError, match=r"2 ranks on a share its 1 visible GPU.*--share-gpus"):
        bind_all(monkeypatch, two, gpus_per_host=1)
    shared = bind_all(monkeypatch, two, gpus_per_host=1, share=True)
    assert shared == [["GPU-a-0000"], ["GPU-a-0000"]]


def test_two_gpus_per_rank_on_a_two_gpu_box_is_one_rank(monkeypatch):
    """mpiexec -n 2 --gpus-per-rank 2 on a 2-GPU node: both ranks saw 2 == k GPUs and
    took both."""
    two = [("a", mpiexec_rank(r, 2)) for r in range(2)]
    with pytest.raises(EsError, match="start at most 1 rank"):
        bind_all(monkeypatch, two, gpus_per_rank=2)


def test_overlapping_bindings_are_refused(monkeypatch):
    """A launcher that handed two ranks overlapping GPU sets (GPU 1 in both)."""
    tasks = [("a", srun_task(0, "1")), ("a", srun_task(1, "1,0"))]
    with pytest.raises(EsError, match="ranks 0 and 1 on a would both compute on GPU "
                                      "GPU-a-0001"):
        bind_all(monkeypatch, tasks)


def test_too_few_gpus_per_rank_and_gpu_less_ranks(monkeypatch):
    with pytest.raises(EsError, match=r"sees 1 GPU.*needs 2"):
        bind_all(monkeypatch, [("a", srun_task(0, "0"))], gpus_per_rank=2)
    with pytest.raises(EsError, match="sees no GPU while other ranks do"):
        bind_all(monkeypatch, [("a", mpiexec_rank(0, 2)), ("b", srun_task(0, ""))])


def test_a_device_without_index_loads_onto_the_current_gpu(monkeypatch):
    """bench built torch.device("cuda") (no index): from_pretrained got device_map
    {"": None} and left the weights on the CPU while the batch went to the GPU."""
    node = FakeNode(monkeypatch, "a", node_uuids("a", 2))
    node.current = 1
    assert devices.load_kwargs([torch.device("cuda")]) == {"device_map": {"": 1}}
    assert devices.load_kwargs([torch.device("cpu")]) == {}
    with pytest.raises(EsError, match="not on both"):
        devices.load_kwargs([torch.device("cuda", 0), torch.device("cpu")])


def test_bench_binds_its_inference_model_to_an_indexed_gpu(monkeypatch, tiny_model):
    from es_mpi import model as hf
    from es_mpi.tooling import bench

    FakeNode(monkeypatch, "a", node_uuids("a", 1))
    placed = []

    def fake_load(path, dtype, devs):
        placed.extend(devs)
        raise RuntimeError("stop here: no real GPU")

    monkeypatch.setattr(hf, "load_model", fake_load)
    opts = dict(model=str(tiny_model), task="conciseness", task_data="", population=2,
                prompts=0, max_new_tokens=2, sigma=0.01, lr=0.01, rank=1, antithetic=False,
                dtype="auto")
    with pytest.raises(RuntimeError, match="stop here"):
        bench.Runner("inference", opts)
    assert placed == [torch.device("cuda", 0)]


def test_identity_names_what_changes_the_bits(monkeypatch):
    """The GPU name alone does not say how many SMs compute (H100 SXM 132, PCIe 114, a
    MIG slice fewer); the CPU's instruction set picks kernels."""
    sxm = {**H100}
    cut = {**H100, "multi_processor_count": 114}
    FakeNode(monkeypatch, "a", node_uuids("a", 1), sxm)
    a = devices.describe([torch.device("cuda", 0)], torch.bfloat16)
    FakeNode(monkeypatch, "a", node_uuids("a", 1), cut)
    b = devices.describe([torch.device("cuda", 0)], torch.bfloat16)
    FakeNode(monkeypatch, "a", ["MIG-0b1c"], sxm)
    mig = devices.describe([torch.device("cuda", 0)], torch.bfloat16)
    assert a["gpu"] == b["gpu"] and (a["sms"], b["sms"]) == (132, 114)
    assert a["capability"] == "9.0" and not a["mig"] and mig["mig"]
    assert not devices.same_arithmetic(a, b) and not devices.same_arithmetic(a, mig)
    assert "132 SMs" in devices.label(a) and "MIG" in devices.label(mig)
    with pytest.raises(EsError, match="rank 1 computes on"):
        devices.check_uniform([a, b])
    # a record from before these keys existed is compared on what both have
    old = {k: v for k, v in a.items() if k not in ("capability", "sms", "mig", "cpu_isa")}
    assert devices.same_arithmetic(old, a)


def test_cpu_identity_is_the_instruction_set_torch_dispatches_on():
    here = devices.describe([torch.device("cpu")], torch.float32)
    assert here["cpu_isa"].split()[0] == torch.backends.cpu.get_cpu_capability()
    other = {**here, "cpu_isa": "AVX2 avx2 fma"}
    if here["cpu_isa"] != other["cpu_isa"]:
        assert not devices.same_arithmetic(here, other)


def test_a_run_pins_tf32_off(tiny_model, tmp_path):
    """A user's set_float32_matmul_precision('high') would let fp32 matmuls run in TF32 on
    a GPU, which changes the bits of fp32 work; a run pins them back to full fp32."""
    import h5py
    from conftest import cli_in_process

    torch.set_float32_matmul_precision("high")
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        cli_in_process(["train", "--model", tiny_model, "--run", tmp_path / "r.h5",
                        "--generations", "1", "--population", "2", "--max-new-tokens", "2",
                        "-q"])
        assert torch.get_float32_matmul_precision() == "highest"
        assert torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False
    import json

    with h5py.File(tmp_path / "r.h5", "r") as f:
        assert json.loads(f.attrs["hardware"])[0]["tf32"] is False


@pytest.mark.mpi
def test_binding_under_a_real_mpiexec(tmp_path):
    """Two real ranks on one faked 1-GPU node: refused; with sharing asked for, both on
    it. The views travel through MPI's own allgather."""
    script = tmp_path / "bind.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        import pytest
        from test_binding import FakeNode, node_uuids
        from es_mpi import devices
        from es_mpi.dist import Dist
        from es_mpi.errors import EsError

        mp = pytest.MonkeyPatch()
        FakeNode(mp, "a", node_uuids("a", 1))
        d = Dist()
        share = sys.argv[1] == "share"
        try:
            text = f"got {{devices.bind(d, 1, share)[0]}}"
        except EsError as exc:
            text = f"error {{exc}}"
        with open(f"{{sys.argv[2]}}.{{d.rank}}", "w") as fh:  # mpiexec may merge stdout lines
            fh.write(text)
    """))
    for mode, want in (("share", "got cuda:0"), ("alone", "error 2 ranks on a share")):
        out = tmp_path / mode
        result = run_python_mpi(script, [mode, out], np=2)
        assert result.returncode == 0, result.stderr
        texts = [(tmp_path / f"{mode}.{r}").read_text() for r in range(2)]
        assert all(t.startswith(want) for t in texts), texts


@pytest.mark.parametrize("script", ["es_mpi_gpu.sbatch", "es_mpi_multinode.sbatch"])
def test_gpu_job_scripts_ask_for_expandable_segments(script, tmp_path):
    """The line of the job script that sets the allocator, run by bash: the default where
    the user set nothing, the user's value where they did."""
    from pathlib import Path

    text = (Path(__file__).parent.parent / "slurm" / script).read_text()
    lines = [ln for ln in text.splitlines() if "PYTORCH_CUDA_ALLOC_CONF" in ln
             and not ln.lstrip().startswith("#")]
    assert lines, f"{script} does not set PYTORCH_CUDA_ALLOC_CONF"
    probe = tmp_path / "probe.sh"
    probe.write_text("\n".join([*lines, 'echo "$PYTORCH_CUDA_ALLOC_CONF"']) + "\n")
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    out = subprocess.run(["bash", str(probe)], capture_output=True, text=True, env=env,
                         check=True).stdout.strip()
    assert out == "expandable_segments:True"
    mine = subprocess.run(["bash", str(probe)], capture_output=True, text=True, check=True,
                          env={**env, "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64"})
    assert mine.stdout.strip() == "max_split_size_mb:64"


# -- the memory budget of the automatic batch ---------------------------------------------

def test_the_gpu_budget_is_what_the_allocator_can_hand_out(monkeypatch):
    """Free memory (the driver's) plus what torch reserved and does not use, of the
    fullest GPU, 90% of it (numbers written out by hand)."""
    FakeNode(monkeypatch, "a", node_uuids("a", 2))
    free = {0: 30 * 2**30, 1: 20 * 2**30}
    reserved = {0: 4 * 2**30, 1: 6 * 2**30}
    allocated = {0: 3 * 2**30, 1: 2 * 2**30}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (free[d.index], 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: reserved[d.index])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: allocated[d.index])
    gpus = [torch.device("cuda", 0), torch.device("cuda", 1)]
    # GPU 0: 30 + 4 - 3 = 31 GiB; GPU 1: 20 + 6 - 2 = 24 GiB: the smaller, x 0.9
    assert devices.generation_budget(gpus, 4) == int(0.9 * 24 * 2**30)


def test_the_batch_is_sized_after_the_kl_model_and_for_the_held_out_prompts(
        monkeypatch, tiny_model, tmp_path):
    """The automatic generate batch is decided once everything resident is loaded (with
    --eval-kl, a second copy of the model) and for the longest prompt the run generates
    from: here a held-out question far longer than the training ones."""
    import json as json_

    from transformers import AutoTokenizer

    from es_mpi import session, sizing
    from es_mpi.config import Config
    from es_mpi.dist import Dist

    data = tmp_path / "qa.jsonl"
    long_q = "Why " + "is the sky blue and " * 30 + "why?"
    rows = [{"prompt": "What is 2+2?", "answer": "4"},
            {"prompt": "Name a colour.", "answer": "red"},
            {"prompt": long_q, "answer": "light", "split": "eval"}]
    data.write_text("".join(json_.dumps(r) + "\n" for r in rows))
    seen = {}

    def fake_rows_that_fit(config, dtype, prompt_tokens, max_new_tokens, budget, device):
        seen.update(prompt_tokens=prompt_tokens, kl_loaded=s.kl_base is not None)
        return 3

    monkeypatch.setattr(sizing, "rows_that_fit", fake_rows_that_fit)
    cfg = Config(model=str(tiny_model), task="conciseness", task_data=str(data),
                 population=2, max_new_tokens=4, eval_every=1, eval_kl=True,
                 run=str(tmp_path / "r.h5"))
    task, train = session.check_task(cfg)
    s = session.open_session(cfg, Dist.serial(), task, train)
    session.decide_batches(s)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    want = len(tok(task.prompt(rows[2], tok))["input_ids"])  # the held-out prompt
    assert want > max(len(tok(task.prompt(r, tok))["input_ids"]) for r in rows[:2])
    assert seen == {"prompt_tokens": want, "kl_loaded": True}
    assert s.cfg.generate_batch == 3
