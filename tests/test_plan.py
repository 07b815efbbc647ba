"""es-mpi plan: estimates against peaks measured on the CPU, the shipped configs, the CLI.

The measured cases run one ES generation each, in a fresh process with one thread (two
processes at a time), and compare the peak RSS above the process's baseline taken after
its imports with the plan for a CPU rank, phase by phase: the evaluation phase's peak
(the engine's peak_mem_eval) with the plan's resident and evaluation terms, the update
phase's (peak_mem_update) with its resident and update terms. Run with `-s` to see the
figures.
Run as a script, this file is that worker: `python tests/test_plan.py '{...}'`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from es_mpi import sizing  # the generate terms plan builds on (no torch at import)

sys.path.insert(0, str(Path(__file__).parent))

MIB = 2**20
TOLERANCE = 0.15


def measure(opts: dict) -> dict:
    """One ES generation of `opts`; its peak memory above the post-import baseline.

    CPU: peak RSS (VmHWM) of each phase, as the engine measures them (its row's
    peak_mem_eval and peak_mem_update), less the baseline. CUDA: torch's peak
    allocations, plus what else the device and the host hold (CUDA context, allocator
    reserve, the process's RSS).
    """
    import torch

    torch.set_num_threads(1)
    from es_mpi.dist import Dist, return_freed_memory

    return_freed_memory()
    import numpy as np
    import transformers.generation.utils  # noqa: F401  (imported before the baseline)
    from transformers import AutoConfig, AutoModelForCausalLM

    from es_mpi import loop, memory
    from es_mpi import model as hf
    from es_mpi.config import Config
    from es_mpi.loop import run_generation
    from es_mpi.session import check_task, open_session, prompt_ids_for

    cuda = opts["device"] == "cuda"
    # distinct scores: a random model's equal rewards would give z = 0, an update that
    # adds no noise and allocates none of its work space
    loop.shape = lambda rewards_n, method: np.linspace(-1.0, 1.0, len(rewards_n))
    with torch.device("meta"):  # imports the model's code, also before the baseline
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(opts["model"]))
    if cuda:  # one peak over the whole generation
        memory.reset_peak = lambda devices: None
        torch.cuda.init()
    else:
        # glibc keeps generate's freed small blocks in its heap (8-23 MiB here), which
        # the update phase's peak would count; the plan prices what the engine
        # allocates, not the C library's retention: trim the heap where the engine
        # starts a phase's peak
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        reset_peak = memory.reset_peak

        def trim_and_reset(devices):
            libc.malloc_trim(0)
            reset_peak(devices)

        memory.reset_peak = trim_and_reset
    base = memory.rss_bytes()
    cfg = Config(model=opts["model"], task="conciseness", task_data=opts["task_data"],
                 population=opts["population"], batch_size=opts["prompts"],
                 max_new_tokens=opts["max_new_tokens"], mode=opts["mode"],
                 dtype=opts["dtype"], member_batch=opts.get("member_batch", 4),
                 rank=opts.get("rank", 1), master=opts.get("master", "device"),
                 decay_to=opts.get("decay_to", "zero"), antithetic=opts.get("antithetic", False),
                 generate_batch=opts.get("generate_batch", 0), generations=10,
                 credit=opts.get("credit", "realized"),
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
    else:  # run_generation resets the peak at its start and between its phases
        row, _ = run_generation(s, 0)
        result.update(eval=int(row["peak_mem_eval"]) - base,
                      update=int(row["peak_mem_update"]) - base)
        result["peak"] = max(result["eval"], result["update"])
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


def qa_file(path: Path, words: int = 0) -> Path:
    """144 question/answer examples (115 for training): short, plentiful prompts, or with
    `words` > 0 long ones (the question after about that many words of preamble)."""
    preamble = " ".join(["Paris is the capital of France."] * (words // 6))
    with path.open("w") as fh:
        for a in range(2, 14):
            for b in range(2, 14):
                question = f"What is {a} times {b}?"
                fh.write(json.dumps({"prompt": f"{preamble} {question}".strip(),
                                     "answer": str(a * b)}) + "\n")
    return path


# name -> (model, settings): weights (58M parameters, 222 MiB in fp32, a 32000 vocab), kv
# (6M parameters, 2 x 8 layers x 256 values of cache per token: 16 KiB in fp32), mlp (2
# layers with an intermediate size of 4096: a prefill holds 13312 values per prompt token
# beside 1024 of cache) or vocab (two 16384 x 256 embeddings, 9.7M parameters: a tensor
# fills a noise chunk, so the update's two fresh chunks are a quarter of its phase); data
# "long": prompts of a few hundred tokens
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
    "full fp32, activations dominate": (
        "mlp", dict(mode="full", dtype="float32", population=2, antithetic=True, prompts=8,
                    max_new_tokens=2, data="long")),
    "full fp32, update transients": (
        "vocab", dict(mode="full", dtype="float32", population=2, antithetic=True,
                      prompts=1, max_new_tokens=2)),
    "lowrank fp32, kept draws": (
        "kv", dict(mode="lowrank", dtype="float32", population=32, member_batch=4, rank=64,
                   prompts=1, max_new_tokens=2)),
}
# the environment's own share: a generation so small that the libraries' first-use
# allocations (thread pools, kernels' caches) are nearly all of it; they differ between
# installations of the same versions (measured 24 to ~50 MiB), so each run measures them
# (per dtype and mode: 16-bit kernels and the full-mode path have their own first uses)
RUNTIME_CASES = {(dtype, mode): ("kv", dict(mode=mode, dtype=dtype, population=2,
                                            member_batch=2, prompts=1, max_new_tokens=2))
                 for dtype in ("float32", "bfloat16") for mode in ("full", "lowrank")}
PHASES = ("eval", "update")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plan")
    return {"weights": make_model(root / "weights", 32000, 512, 1376, 8, 8),
            "kv": make_model(root / "kv", 2000, 256, 512, 8, 8),
            "mlp": make_model(root / "mlp", 2000, 256, 4096, 2, 8),
            "vocab": make_model(root / "vocab", 16384, 256, 512, 2, 8),
            "short": qa_file(root / "qa.jsonl"),
            "long": qa_file(root / "qa-long.jsonl", words=240)}


@pytest.fixture(scope="module")
def measured(models) -> dict[str, dict]:
    """Every case's measurement, two processes at a time (one thread each)."""
    def one(model_settings):
        model, settings = model_settings
        return run_worker({**settings, "model": str(models[model]), "device": "cpu",
                           "task_data": str(models[settings.get("data", "short")])})

    cases = {**CASES, **RUNTIME_CASES}
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(cases, pool.map(one, cases.values()), strict=True))


def plan_phases(p) -> dict[str, int]:
    """A plan's two phases, each with the resident terms: the evaluation phase (generate)
    and the update phase, as the engine's peak_mem_eval and peak_mem_update measure them."""
    from es_mpi.tooling.plan import EVALUATION, TERMS

    resident = sum(p.device[k] for k in TERMS if k not in (*EVALUATION, "update"))
    return {"eval": resident + sum(p.device[k] for k in EVALUATION),
            "update": resident + p.device["update"]}


def runtime_bytes(models, measured, dtype: str, mode: str) -> dict[str, int]:
    """The libraries' first-use memory here, per phase: the tiny case's peak beyond its
    planned model-dependent terms."""
    model, settings = RUNTIME_CASES[dtype, mode]
    got = measured[dtype, mode]
    p = cpu_plan(models[model], settings, got["prompt_tokens"])
    planned = plan_phases(p)
    return {ph: got[ph] - (planned[ph] - p.device["runtime"]) for ph in PHASES}


def cpu_plan(model: Path, settings: dict, prompt_tokens: int):
    """The plan of a CPU rank for a case's settings, at the prompt length measured."""
    from es_mpi.tooling import plan

    keys = ("mode", "dtype", "master", "decay_to", "credit", "population", "member_batch",
            "rank", "antithetic", "prompts", "max_new_tokens", "generate_batch")
    return plan.plan(plan.shape_of(str(model)),
                     plan.Settings(**{k: settings[k] for k in keys if k in settings},
                                   prompt_tokens=prompt_tokens, device="cpu"))


@pytest.mark.parametrize("case", list(CASES))
def test_plan_within_15_percent_of_the_measured_cpu_peak_in_each_phase(case, models,
                                                                       measured):
    from es_mpi.tooling.plan import TERMS

    model, settings = CASES[case]
    got = measured[case]
    p = cpu_plan(models[model], settings, got["prompt_tokens"])
    runtime = runtime_bytes(models, measured, settings["dtype"], settings["mode"])
    planned = {ph: v - p.device["runtime"] + runtime[ph] for ph, v in plan_phases(p).items()}
    ratios = {ph: got[ph] / planned[ph] for ph in PHASES}
    terms = ", ".join(f"{k} {v / MIB:.0f}" for k, v in p.device.items()
                      if v and k != "total")
    print(f"\n{case}: " + "; ".join(
        f"{ph} measured {got[ph] / MIB:.0f} MiB, planned {planned[ph] / MIB:.0f} MiB, "
        f"ratio {ratios[ph]:.3f}" for ph in PHASES)
        + f" ({terms}; runtime measured here {runtime['eval'] / MIB:.0f} / "
        f"{runtime['update'] / MIB:.0f}; prompt {got['prompt_tokens']} tokens)")
    # the case tests what its name says
    named = [term for words, term in (("KV cache", "kv_cache"), ("activations", "activations"),
                                      ("kept draws", "kept_draws")) if words in case]
    if named:
        assert max(TERMS, key=lambda k: p.device[k]) == named[0], p.device
    elif "update" in case:
        assert p.device["update"] > planned["update"] / 5
    else:
        assert p.device["weights"] + p.device["master"] + p.device["anchor"] > \
            max(planned.values()) / 2
    if "micro-batches" in case:
        assert p.generate_batch == 32 and got["generate_batch"] == 32
    for ph in PHASES:
        assert abs(ratios[ph] - 1) <= TOLERANCE, (ph, got[ph], planned[ph])


# -- shipped configs -----------------------------------------------------------------------

# published parameter counts (billions, as the model cards round them)
PUBLISHED = {"qwen2.5-0.5b": 0.49, "qwen2.5-1.5b": 1.54, "qwen2.5-3b": 3.09,
             "qwen2.5-7b": 7.62, "llama-3.1-8b": 8.03}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_shipped_configs_have_the_published_parameter_counts(name):
    from es_mpi.tooling import plan

    shape = plan.shape_of(name)
    assert round(shape.params / 1e9, 2) == PUBLISHED[name]
    assert plan.shape_of(shape.name).params == shape.params  # the full name selects it too


def test_shapes_counted_exactly():
    from es_mpi.tooling import plan

    small = plan.shape_of("Qwen2.5-0.5B-Instruct")
    # tied embedding counted once: 151936 x 896 + 24 layers (q 896x896+896, k and v
    # 128x896+128, o 896x896, MLP 3 x 896x4864, two norms of 896) + the final norm
    layer = 896 * 896 + 896 + 2 * (128 * 896 + 128) + 896 * 896 + 3 * 896 * 4864 + 2 * 896
    assert small.params == 151936 * 896 + 24 * layer + 896 == 494_032_768
    # lowrank trains the matrices: no biases, no norms
    assert small.matrix_params == 494_032_768 - 24 * (896 + 2 * 128 + 2 * 896) - 896
    # KV cache per token, bf16: 2 (keys, values) x layers x KV heads x head dim x 2 bytes
    assert sizing.kv_cache_bytes(plan.shape_of("qwen2.5-7b"), "bfloat16", 1, 1) == \
        2 * 28 * 4 * 128 * 2
    assert sizing.kv_cache_bytes(plan.shape_of("llama-3.1-8b"), "bfloat16", 1, 1) == \
        2 * 32 * 8 * 128 * 2


def test_model_dir_and_config_file_give_the_same_shape(tiny_model):
    from es_mpi.tooling import plan

    by_dir = plan.shape_of(str(tiny_model))
    by_file = plan.shape_of(str(tiny_model / "config.json"))
    assert by_dir.params == by_file.params > 0
    assert by_dir.dims == by_file.dims


def test_rows_that_fit_takes_a_transformers_config():
    import torch
    from transformers import AutoConfig

    from es_mpi.tooling import plan

    config = AutoConfig.from_pretrained(plan.resolve("qwen2.5-7b")[1])
    one = plan.generate_bytes(config, torch.bfloat16, 1, 100, 1024)["total"]
    # on a GPU a row also costs the caching allocator's reserve
    row = one * (1 + plan.ALLOCATOR_RESERVE)
    assert plan.rows_that_fit(config, torch.bfloat16, 100, 1024, 0) == 1
    assert plan.rows_that_fit(config, torch.bfloat16, 100, 1024, int(row) - 1) == 1
    assert plan.rows_that_fit(config, "bfloat16", 100, 1024, int(37 * row) + 1) == 37
    assert plan.rows_that_fit(config, "bfloat16", 100, 1024, int(37 * row) - 2**20) == 36
    assert plan.rows_that_fit(config, "bfloat16", 100, 1024, 37 * one) == int(37 / 1.25)
    many = plan.generate_bytes(config, torch.bfloat16, 37, 100, 1024)["total"]
    assert many <= 37 * one and plan.rows_that_fit(config, torch.bfloat16, 100, 1024,
                                                   int(many * 1.25) + 1) == 37
    # a 7B model's cache alone: 57344 bytes per token, 1123 tokens a row
    assert one > 57344 * 1123


def test_the_allocator_reserve_is_a_quarter_of_the_evaluation_phase_on_a_gpu_only():
    from es_mpi.tooling import plan

    shape = plan.shape_of("qwen2.5-0.5b")
    for mode in ("full", "lowrank"):
        gpu = plan.plan(shape, plan.Settings(mode=mode, generate_batch=16))
        evaluation = (gpu.device["kv_cache"] + gpu.device["activations"]
                      + gpu.device["lowrank_factors"])
        assert gpu.device["allocator_reserve"] == int(evaluation / 4) > 0
        # it counts in the total, as part of the evaluation phase (the larger one here)
        without = dict(gpu.device, allocator_reserve=0)
        assert gpu.device["total"] - plan._total(without) == evaluation // 4
        cpu = plan.plan(shape, plan.Settings(mode=mode, generate_batch=16, device="cpu"))
        assert cpu.device["allocator_reserve"] == 0


def test_a_cuda_plan_does_no_torch_work(monkeypatch):
    from es_mpi.tooling import plan

    def probe(dtype):
        raise AssertionError("a GPU plan ran the CPU's LM-head probe")

    monkeypatch.setattr(sizing, "head_copies_per_row", probe)
    shape = plan.shape_of("qwen2.5-0.5b")
    for dtype in ("bfloat16", "float16", "float32"):
        plan.plan(shape, plan.Settings(dtype=dtype))
        plan.rows_that_fit(shape, dtype, 100, 64, 10**10, "cuda")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_lm_head_probe_counts_whole_copies(dtype):

    # a kernel copies the head's weights for each row or it does not: a fraction far from
    # a whole number would be the probe measuring something else (first-use allocations)
    copies = sizing.head_copies_per_row(dtype)
    assert copies in (0.0, 1.0) or abs(copies - round(copies)) <= 0.05, copies


def test_the_lm_head_probe_leaves_this_process_peak_alone():
    import torch

    from es_mpi import memory

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("no peak RSS to reset here (not Linux)")
    sizing.head_copies_per_row.cache_clear()
    torch.ones(2**26).sum()  # 256 MiB, freed: this process's peak, as a phase's would be
    peak = memory.peak_rss_bytes()
    sizing.head_copies_per_row("bfloat16")  # ~100 MiB where it runs: not here
    assert memory.peak_rss_bytes() >= peak


def test_held_out_prompts_size_generate_and_kl_adds_a_copy_of_the_weights():
    from es_mpi.tooling import plan

    shape = plan.shape_of("qwen2.5-0.5b")  # 24 layers, 2 KV heads of 64 values
    per_token = 2 * 24 * 2 * 64 * 2  # keys and values, bf16
    train = plan.plan(shape, plan.Settings(prompts=4, prompt_tokens=100, max_new_tokens=64))
    assert train.generate_batch == 4
    assert train.device["kv_cache"] == 4 * (100 + 63) * per_token
    assert train.device["kl_model"] == 0
    held = plan.plan(shape, plan.Settings(prompts=4, prompt_tokens=100, max_new_tokens=64,
                                          eval_batch_size=32, eval_prompt_tokens=300,
                                          eval_kl=True))
    assert held.generate_batch == 32
    assert held.device["kv_cache"] == 32 * (300 + 63) * per_token
    assert held.device["kl_model"] == 2 * 494_032_768  # the published count, in bf16
    # held-out prompts shorter than the training ones: the training ones size generate
    short = plan.plan(shape, plan.Settings(prompts=4, prompt_tokens=100, max_new_tokens=64,
                                           eval_batch_size=2, eval_prompt_tokens=50))
    assert short.device["kv_cache"] == train.device["kv_cache"]


def test_a_gpus_per_rank_suggestion_is_never_absurd():
    from es_mpi.tooling import plan

    shape = plan.shape_of("qwen2.5-7b")
    # the replica alone (15.2 GB) does not fit in 12 GB: splitting it is the suggestion,
    # across a few GPUs (the fp32 master and the replica: 45.7 GB, in 90% of 12 GB each)
    tips = plan.suggestions(shape, plan.plan(shape, plan.Settings(gpu_memory=12 * 10**9)))
    assert any(f"--gpus-per-rank {math.ceil(45.7 / 10.8)}," in t for t in tips), tips
    for size in (80 * 10**6, 80):
        tips = plan.suggestions(shape, plan.plan(shape, plan.Settings(gpu_memory=size)))
        assert not any("--gpus-per-rank" in t for t in tips), tips
        assert any("nothing fits" in t for t in tips), tips


@pytest.mark.parametrize("text,size", [
    ("80GB", 80 * 10**9), ("80GiB", 80 * 2**30), ("80G", 80 * 2**30), ("141GB", 141 * 10**9),
    ("512MiB", 512 * 2**20), ("1.5TB", 1.5 * 10**12), ("4096B", 4096), ("80 gb", 80 * 10**9)])
def test_parse_size(text, size):
    from es_mpi.tooling import plan

    assert plan.parse_size(text) == size


@pytest.mark.parametrize("text", ["80", "141", "0.5", "4096"])
def test_a_size_without_a_unit_is_refused(text):
    from es_mpi.errors import EsError
    from es_mpi.tooling import plan

    # '--gpu-memory 80' meant 80 GB and planned 80 bytes
    with pytest.raises(EsError, match=f"--gpu-memory {text}: give a unit, e.g. {text}GB"):
        plan.parse_size(text)


# -- the command ---------------------------------------------------------------------------

def test_bad_input_is_one_error_line_before_any_heavy_work():
    from conftest import one_error_line, run_cli

    one_error_line(run_cli(["plan", "--model", "qwen9-70b"]), "qwen9-70b",
                   "qwen2.5-7b")
    one_error_line(run_cli(["plan", "--model", "qwen2.5-7b", "--gpu-memory", "80 gigs"]),
                   "--gpu-memory", "80GB")
    one_error_line(run_cli(["plan", "--model", "qwen2.5-7b", "--gpu-memory", "0GB"]),
                   "--gpu-memory")
    one_error_line(run_cli(["plan", "--model", "qwen2.5-7b", "--gpu-memory", "80"]),
                   "--gpu-memory 80: give a unit", "80GB", "80GiB")
    one_error_line(run_cli(["plan", "--model", "qwen2.5-7b", "--eval-kl"]),
                   "--eval-kl", "--eval-batch-size")
    one_error_line(run_cli(["plan", "--model", "qwen2.5-7b", "--population", "3",
                            "--antithetic"]), "even")


def test_json_has_every_term_in_bytes():
    from conftest import run_cli

    from es_mpi.tooling.plan import TERMS

    result = run_cli(["plan", "--model", "qwen2.5-0.5b", "--json", "--mode", "full",
                      "--decay-to", "init", "--eval-kl", "--eval-batch-size", "16"])
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert {"kl_model", "allocator_reserve", "kept_draws", "kv_cache", "activations",
            "update", "cuda_context"} <= set(TERMS)
    for side in ("device", "host"):
        assert set(out[side]) == {*TERMS, "total"}
        assert all(isinstance(v, int) and v >= 0 for v in out[side].values())
    n = 494_032_768  # the published count, in bf16 and in fp32
    assert out["device"]["weights"] == out["device"]["kl_model"] == 2 * n
    assert out["device"]["master"] == out["device"]["anchor"] == 4 * n
    assert out["device"]["allocator_reserve"] > 0
    assert out["settings"]["eval_kl"] and out["settings"]["eval_batch_size"] == 16
    assert out["dtype"] == "bfloat16" and out["fits"] is True and out["suggestions"] == []


def test_a_plan_that_does_not_fit_says_what_to_change():
    from conftest import run_cli

    # 8.03 B parameters: 16 GB of bf16 weights and 32 GB of fp32 master exceed 40 GB
    result = run_cli(["plan", "--model", "llama-3.1-8b", "--gpu-memory", "40GB"])
    assert result.returncode == 0, result.stderr
    assert "does not fit in 37.3 GiB" in result.stdout
    assert "--master host" in result.stdout
    assert "allocator reserve (assumed 25%)" in result.stdout
    host = run_cli(["plan", "--model", "llama-3.1-8b", "--gpu-memory", "40GB",
                    "--master", "host", "--json"])
    out = json.loads(host.stdout)
    assert out["fits"] and out["host"]["master"] == 4 * 8_030_261_248
    assert out["device"]["staging"] == 4 * 128256 * 4096  # the largest tensor: embeddings


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
