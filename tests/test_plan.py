"""es-mpi plan: estimates against peaks measured on the CPU, the shipped configs, the CLI.

The measured cases run one ES generation each, in a fresh process with one thread (two
processes at a time), and compare the peak RSS above the process's baseline taken after
its imports with the plan's total for a CPU rank. Run with `-s` to see the figures.
Run as a script, this file is that worker: `python tests/test_plan.py '{...}'`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

MIB = 2**20
TOLERANCE = 0.15


def measure(opts: dict) -> dict:
    """One ES generation of `opts`; its peak memory above the post-import baseline.

    CPU: peak RSS (VmHWM). CUDA: torch's peak allocations, plus what else the device and
    the host hold (CUDA context, allocator reserve, the process's RSS).
    """
    import torch

    torch.set_num_threads(1)
    from es_mpi.dist import Dist, return_freed_memory

    return_freed_memory()
    import transformers.generation.utils  # noqa: F401  (imported before the baseline)
    from transformers import AutoConfig, AutoModelForCausalLM

    from es_mpi import memory
    from es_mpi import model as hf
    from es_mpi.config import Config
    from es_mpi.loop import run_generation
    from es_mpi.session import check_task, open_session, prompt_ids_for

    cuda = opts["device"] == "cuda"
    with torch.device("meta"):  # imports the model's code, also before the baseline
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(opts["model"]))
    # one peak over the whole generation (the engine measures its phases apart)
    memory.reset_peak = lambda devices: None
    if cuda:
        torch.cuda.init()
    base = memory.rss_bytes()
    cfg = Config(model=opts["model"], task="conciseness", task_data=opts["task_data"],
                 population=opts["population"], batch_size=opts["prompts"],
                 max_new_tokens=opts["max_new_tokens"], mode=opts["mode"],
                 dtype=opts["dtype"], member_batch=opts.get("member_batch", 4),
                 rank=opts.get("rank", 1), master=opts.get("master", "device"),
                 decay_to=opts.get("decay_to", "zero"), antithetic=opts.get("antithetic", False),
                 generate_batch=opts.get("generate_batch", 0), generations=10,
                 run=str(Path(tempfile.mkdtemp()) / "unused.h5"))
    task, train = check_task(cfg)
    s = open_session(cfg, Dist.serial(), task, train)
    s.ignore_eos = True  # every row makes max_new_tokens
    examples = [train[j] for j in prompt_ids_for(cfg, 0, len(train))]
    batch = hf.encode_prompts(s.tokenizer, [task.prompt(e, s.tokenizer) for e in examples],
                              s.device, task.templated(s.tokenizer))
    members = cfg.member_batch if cfg.mode == "lowrank" else 1
    for rows in sorted({1, members}):  # warm-up: kernels and their caches, as bench does
        hf.generate(s.model, s.tokenizer, {k: v.repeat(rows, 1) for k, v in batch.items()}, 2)
    result = {"prompt_tokens": int(batch["input_ids"].shape[1]),
              "generate_batch": s.cfg.generate_batch}
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        memory.reset_peak_rss()
        run_generation(s, 0)
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        result.update(peak=torch.cuda.max_memory_allocated(),
                      reserved_peak=torch.cuda.max_memory_reserved(),
                      context=total - free - torch.cuda.memory_reserved(),
                      host_peak=memory.peak_rss_bytes())
    else:
        memory.reset_peak_rss()
        run_generation(s, 0)
        result["peak"] = memory.peak_rss_bytes() - base
    return result


def run_worker(opts: dict, timeout: float = 600) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, __file__, json.dumps(opts)], capture_output=True,
                          text=True, env=env, timeout=timeout, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1])


def make_model(path: Path, vocab: int, hidden: int, intermediate: int, layers: int,
               heads: int) -> Path:
    """A random Llama (full multi-head attention) with tests' tiny tokenizer."""
    import torch
    from tiny_model import make_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    path.mkdir(parents=True, exist_ok=True)
    fast = make_tokenizer(path)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=1024, initializer_range=0.2, eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def qa_file(path: Path) -> Path:
    """144 short question/answer examples (115 for training): short, plentiful prompts."""
    with path.open("w") as fh:
        for a in range(2, 14):
            for b in range(2, 14):
                fh.write(json.dumps({"prompt": f"What is {a} times {b}?",
                                     "answer": str(a * b)}) + "\n")
    return path


# name -> (model, settings): weights (58M parameters, 222 MiB in fp32, a 32000 vocab) or
# kv (6M parameters, 2 x 8 layers x 256 values of cache per token: 16 KiB in fp32)
CASES = {
    "full fp32, weights dominate": (
        "weights", dict(mode="full", dtype="float32", population=2, antithetic=True,
                        prompts=2, max_new_tokens=4)),
    "full bf16, decay anchor": (
        "weights", dict(mode="full", dtype="bfloat16", decay_to="init", population=2,
                        antithetic=True, prompts=1, max_new_tokens=4)),
    "lowrank fp32, master on host": (
        "weights", dict(mode="lowrank", dtype="float32", master="host", population=4,
                        member_batch=4, prompts=2, max_new_tokens=8)),
    "lowrank fp32, KV cache dominates": (
        "kv", dict(mode="lowrank", dtype="float32", population=8, member_batch=8,
                   prompts=8, max_new_tokens=64)),
    "lowrank fp32, KV cache in micro-batches": (
        "kv", dict(mode="lowrank", dtype="float32", population=8, member_batch=8, rank=2,
                   prompts=8, max_new_tokens=48, generate_batch=32)),
    "full bf16, KV cache dominates": (
        "kv", dict(mode="full", dtype="bfloat16", population=2, antithetic=True, prompts=64,
                   max_new_tokens=64)),
}
# the environment's own share: a generation so small that the libraries' first-use
# allocations (thread pools, kernels' caches) are nearly all of it; they differ between
# installations of the same versions (measured 24 to ~50 MiB), so each run measures them
# (per dtype and mode: 16-bit kernels and the full-mode path have their own first uses)
RUNTIME_CASES = {(dtype, mode): ("kv", dict(mode=mode, dtype=dtype, population=2,
                                            member_batch=2, prompts=1, max_new_tokens=2))
                 for dtype in ("float32", "bfloat16") for mode in ("full", "lowrank")}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plan")
    return {"weights": make_model(root / "weights", 32000, 512, 1376, 8, 8),
            "kv": make_model(root / "kv", 2000, 256, 512, 8, 8),
            "task_data": qa_file(root / "qa.jsonl")}


@pytest.fixture(scope="module")
def measured(models) -> dict[str, dict]:
    """Every case's measurement, two processes at a time (one thread each)."""
    def one(case):
        model, settings = CASES[case]
        return run_worker({**settings, "model": str(models[model]), "device": "cpu",
                           "task_data": str(models["task_data"])})

    with ThreadPoolExecutor(max_workers=2) as pool:
        out = dict(zip(CASES, pool.map(one, CASES), strict=True))
    for key, (model, settings) in RUNTIME_CASES.items():
        out[key] = run_worker({**settings, "model": str(models[model]), "device": "cpu",
                               "task_data": str(models["task_data"])})
    return out


def runtime_bytes(models, measured, dtype: str, mode: str) -> int:
    """The libraries' first-use memory here: the tiny case's peak beyond its planned
    model-dependent terms."""
    model, settings = RUNTIME_CASES[dtype, mode]
    got = measured[dtype, mode]
    p = cpu_plan(models[model], settings, got["prompt_tokens"])
    return got["peak"] - (p.device["total"] - p.device["runtime"])


def cpu_plan(model: Path, settings: dict, prompt_tokens: int):
    """The plan of a CPU rank for a case's settings, at the prompt length measured."""
    from es_mpi import plan

    keys = ("mode", "dtype", "master", "decay_to", "population", "member_batch", "rank",
            "antithetic", "prompts", "max_new_tokens", "generate_batch")
    return plan.plan(plan.shape_of(str(model)),
                     plan.Settings(**{k: settings[k] for k in keys if k in settings},
                                   prompt_tokens=prompt_tokens, device="cpu"))


@pytest.mark.parametrize("case", list(CASES))
def test_plan_within_15_percent_of_the_measured_cpu_peak(case, models, measured):
    from es_mpi.plan import TERMS

    model, settings = CASES[case]
    got = measured[case]
    p = cpu_plan(models[model], settings, got["prompt_tokens"])
    runtime = runtime_bytes(models, measured, settings["dtype"], settings["mode"])
    planned = p.device["total"] - p.device["runtime"] + runtime
    peak = got["peak"]
    terms = ", ".join(f"{k} {v / MIB:.0f}" for k, v in p.device.items()
                      if v and k != "total")
    print(f"\n{case}: measured {peak / MIB:.0f} MiB, planned {planned / MIB:.0f} MiB, "
          f"ratio {peak / planned:.3f} ({terms}; runtime measured here {runtime / MIB:.0f}; "
          f"prompt {got['prompt_tokens']} tokens)")
    # the case tests what its name says
    if "KV cache" in case:
        assert p.device["kv_cache"] == max(p.device[k] for k in TERMS)
    else:
        assert p.device["weights"] + p.device["master"] + p.device["anchor"] > planned / 2
    if "micro-batches" in case:
        assert p.generate_batch == 32 and got["generate_batch"] == 32
    assert abs(peak / planned - 1) <= TOLERANCE, (peak, planned)


# -- shipped configs -----------------------------------------------------------------------

# published parameter counts (billions, as the model cards round them)
PUBLISHED = {"qwen2.5-0.5b": 0.49, "qwen2.5-1.5b": 1.54, "qwen2.5-3b": 3.09,
             "qwen2.5-7b": 7.62, "llama-3.1-8b": 8.03}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_shipped_configs_have_the_published_parameter_counts(name):
    from es_mpi import plan

    shape = plan.shape_of(name)
    assert round(shape.params / 1e9, 2) == PUBLISHED[name]
    assert plan.shape_of(shape.name).params == shape.params  # the full name selects it too


def test_shapes_counted_exactly():
    from es_mpi import plan

    small = plan.shape_of("Qwen2.5-0.5B-Instruct")
    # tied embedding counted once: 151936 x 896 + 24 layers (q 896x896+896, k and v
    # 128x896+128, o 896x896, MLP 3 x 896x4864, two norms of 896) + the final norm
    layer = 896 * 896 + 896 + 2 * (128 * 896 + 128) + 896 * 896 + 3 * 896 * 4864 + 2 * 896
    assert small.params == 151936 * 896 + 24 * layer + 896 == 494_032_768
    # lowrank trains the matrices: no biases, no norms
    assert small.matrix_params == 494_032_768 - 24 * (896 + 2 * 128 + 2 * 896) - 896
    # KV cache per token, bf16: 2 (keys, values) x layers x KV heads x head dim x 2 bytes
    assert plan.kv_cache_bytes(plan.shape_of("qwen2.5-7b"), "bfloat16", 1, 1) == \
        2 * 28 * 4 * 128 * 2
    assert plan.kv_cache_bytes(plan.shape_of("llama-3.1-8b"), "bfloat16", 1, 1) == \
        2 * 32 * 8 * 128 * 2


def test_model_dir_and_config_file_give_the_same_shape(tiny_model):
    from es_mpi import plan

    by_dir = plan.shape_of(str(tiny_model))
    by_file = plan.shape_of(str(tiny_model / "config.json"))
    assert by_dir.params == by_file.params > 0
    assert by_dir.dims == by_file.dims


def test_rows_that_fit_takes_a_transformers_config():
    import torch
    from transformers import AutoConfig

    from es_mpi import plan

    config = AutoConfig.from_pretrained(plan.resolve("qwen2.5-7b")[1])
    one = plan.generate_bytes(config, torch.bfloat16, 1, 100, 1024)["total"]
    assert plan.rows_that_fit(config, torch.bfloat16, 100, 1024, 0) == 1
    assert plan.rows_that_fit(config, torch.bfloat16, 100, 1024, one - 1) == 1
    assert plan.rows_that_fit(config, "bfloat16", 100, 1024, 37 * one) == 37
    many = plan.generate_bytes(config, torch.bfloat16, 37, 100, 1024)["total"]
    assert many <= 37 * one and plan.rows_that_fit(config, torch.bfloat16, 100, 1024,
                                                   many) == 37
    # a 7B model's cache alone: 57344 bytes per token, 1123 tokens a row
    assert one > 57344 * 1123


@pytest.mark.parametrize("text,size", [
    ("80GB", 80 * 10**9), ("80GiB", 80 * 2**30), ("80G", 80 * 2**30), ("141GB", 141 * 10**9),
    ("512MiB", 512 * 2**20), ("1.5TB", 1.5 * 10**12), ("4096", 4096), ("80 gb", 80 * 10**9)])
def test_parse_size(text, size):
    from es_mpi import plan

    assert plan.parse_size(text) == size


# -- the command ---------------------------------------------------------------------------

def test_bad_input_is_one_error_line_before_any_heavy_work():
    from conftest import one_error_line, run_cli

    one_error_line(run_cli(["plan", "--model", "qwen9-70b"]), "qwen9-70b",
                   "qwen2.5-7b")
    one_error_line(run_cli(["plan", "--model", "qwen2.5-7b", "--gpu-memory", "80 gigs"]),
                   "--gpu-memory", "80GB")
    one_error_line(run_cli(["plan", "--model", "qwen2.5-7b", "--gpu-memory", "0GB"]),
                   "--gpu-memory")
    one_error_line(run_cli(["plan", "--model", "qwen2.5-7b", "--population", "3",
                            "--antithetic"]), "even")


def test_json_has_every_term_in_bytes():
    from conftest import run_cli

    from es_mpi.plan import TERMS

    result = run_cli(["plan", "--model", "qwen2.5-0.5b", "--json", "--mode", "full",
                      "--decay-to", "init"])
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    for side in ("device", "host"):
        assert set(out[side]) == {*TERMS, "total"}
        assert all(isinstance(v, int) and v >= 0 for v in out[side].values())
    n = 494_032_768  # the published count, in bf16 and in fp32
    assert out["device"]["weights"] == 2 * n
    assert out["device"]["master"] == out["device"]["anchor"] == 4 * n
    assert out["dtype"] == "bfloat16" and out["fits"] is True and out["suggestions"] == []


def test_a_plan_that_does_not_fit_says_what_to_change():
    from conftest import run_cli

    # 8.03 B parameters: 16 GB of bf16 weights and 32 GB of fp32 master exceed 40 GB
    result = run_cli(["plan", "--model", "llama-3.1-8b", "--gpu-memory", "40GB"])
    assert result.returncode == 0, result.stderr
    assert "does not fit in 37.3 GiB" in result.stdout
    assert "--master host" in result.stdout
    host = run_cli(["plan", "--model", "llama-3.1-8b", "--gpu-memory", "40GB",
                    "--master", "host", "--json"])
    out = json.loads(host.stdout)
    assert out["fits"] and out["host"]["master"] == 4 * 8_030_261_248
    assert out["device"]["staging"] == 4 * 128256 * 4096  # the largest tensor: embeddings


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
