"""KL to the base model (es_mpi.kl): exact zero against itself, a float64 reference written
here, > 0 once the weights move, and recorded in the run file by --eval-every."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from conftest import run_cli

from es_mpi import kl, runfile
from es_mpi import model as hf


def reference_kl(logits_p: np.ndarray, logits_q: np.ndarray) -> np.ndarray:
    """sum_v p (log p - log q) per row, in float64 with NumPy (not the code under test)."""
    a = logits_p.astype(np.float64)
    b = logits_q.astype(np.float64)
    log_p = a - a.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    log_q = b - b.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def test_token_kl_is_zero_against_itself_and_matches_a_reference():
    gen = torch.Generator().manual_seed(0)
    a = 5 * torch.randn(3, 7, 50, generator=gen)
    b = a + 0.3 * torch.randn(3, 7, 50, generator=gen)
    assert torch.equal(kl.token_kl(a, a), torch.zeros(3, 7))  # exactly, not approximately
    got = kl.token_kl(a, b).numpy()
    assert (got > 0).all()
    np.testing.assert_allclose(got, reference_kl(a.numpy(), b.numpy()), rtol=1e-9)
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [0] * 7], dtype=torch.float32)
    per_row = kl.completion_kl(a, b, mask).numpy()
    ref = reference_kl(a.numpy(), b.numpy())
    np.testing.assert_allclose(per_row[:2], [ref[0].mean(), ref[1, :3].mean()], rtol=1e-9)
    assert per_row[2] == 0.0  # no completion tokens


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def hand_kl(model, base, tokenizer, prompt: str, max_new_tokens: int,
            templated: bool) -> tuple[float, str]:
    """One prompt, no padding: greedy completion by transformers' generate, then the mean
    over its tokens of the exact KL from two plain forward passes (reference_kl)."""
    from transformers import GenerationConfig

    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=not templated)["input_ids"]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        new = out[0, ids.shape[1]:].tolist()
        if tokenizer.eos_token_id in new:
            new = new[:new.index(tokenizer.eos_token_id) + 1]
        full = torch.tensor([ids[0].tolist() + new])
        start = ids.shape[1] - 1
        lp = model(full).logits[0, start:start + len(new)].numpy()
        lq = base(full).logits[0, start:start + len(new)].numpy()
    assert lp.argmax(-1).tolist() == new  # the logits are those the greedy tokens came from
    return float(reference_kl(lp, lq).mean()), tokenizer.decode(new, skip_special_tokens=True)


def test_batch_kl_on_a_tiny_model(tiny_model):
    model, tok = _load(tiny_model)
    base, _ = _load(tiny_model)
    tok.padding_side = "left"
    prompts = ["What is the capital of Italy?", "Is the sun a star? Answer yes or no."]
    batch = hf.encode_prompts(tok, prompts, torch.device("cpu"), templated=False)
    assert (batch["attention_mask"] == 0).any()  # rows of different lengths: left padding

    def measure(m):
        texts, tokens, new_ids = hf.generate(m, tok, batch, 8, return_ids=True)
        return kl.batch_kl(m, base, batch, new_ids, tokens), texts

    same, _ = measure(model)
    assert same == [0.0, 0.0]  # a second copy of the same weights: exactly 0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    moved, texts = measure(model)
    assert all(v > 0 for v in moved)
    for prompt, got, text in zip(prompts, moved, texts, strict=True):
        want, want_text = hand_kl(model, base, tok, prompt, 8, templated=False)
        assert text == want_text
        assert got == pytest.approx(want, rel=1e-4)


TRAIN = ["--population", "4", "--antithetic", "--sigma", "0.05", "--lr", "0.05",
         "--max-new-tokens", "6", "--generations", "3", "--eval-every", "2",
         "--eval-batch-size", "2", "--eval-limit", "4", "--checkpoint-every", "1", "--eval-kl"]


@pytest.fixture(scope="module")
def kl_run(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("kl") / "run.h5"
    result = run_cli(["train", "--model", tiny_model, "--run", path, *TRAIN])
    assert result.returncode == 0, result.stderr
    return path, result.stdout


def test_train_records_kl_to_the_base_model(kl_run, tiny_model, tmp_path):
    path, stdout = kl_run
    evals = runfile.read_evals(path)
    assert evals["generation"].tolist() == [0, 2, 3]
    assert evals["kl"][0] == 0.0            # the base model against itself: exactly 0
    assert (evals["kl"][1:] > 0).all()
    assert "KL to base 0 nats/token" in stdout
    # generation 3 rebuilt as a model directory, then measured by hand, one prompt at a time
    out = tmp_path / "gen3"
    assert run_cli(["export", path, out]).returncode == 0
    from tasks import get_task

    model, tok = _load(out)
    base, _ = _load(tiny_model)
    task = get_task("conciseness")
    templated = bool(tok.chat_template)
    completions = runfile.read_eval_completions(path)[2]
    hand = []
    for e, recorded in zip(task.eval_examples()[:4], completions, strict=True):
        value, text = hand_kl(model, base, tok, task.prompt(e, tok), 6, templated)
        assert text == recorded
        hand.append(value)
    assert evals["kl"][2] == pytest.approx(np.mean(hand), rel=1e-4)
    # es-mpi eval measures the same: on the run file, and on the export given --base
    for target, extra in ((f"{path}@3", []), (out, ["--base", tiny_model])):
        got = run_cli(["eval", target, "--limit", "4", "--batch-size", "2", "--max-new-tokens", "6",
                       "--json", *extra])
        assert got.returncode == 0, got.stderr
        data = json.loads(got.stdout)
        assert data["kl"] == pytest.approx(evals["kl"][2], rel=1e-6)
        np.testing.assert_allclose(data["kls"], hand, rtol=1e-4)
    plain = json.loads(run_cli(["eval", out, "--limit", "4", "--json"]).stdout)
    assert plain["kl"] is None  # a model directory without --base: no KL
    info = json.loads(run_cli(["inspect", path, "--json"]).stdout)
    assert [e["kl"] for e in info["evals"]] == evals["kl"].tolist()
    assert "KL to base" in run_cli(["inspect", path]).stdout
    from es_mpi.tooling import report

    report.write_report([path], tmp_path / "rep")
    summary = (tmp_path / "rep" / "summary.md").read_text()
    kl_row = next(ln for ln in summary.splitlines() if ln.startswith("| held-out KL"))
    assert f"{evals['kl'][2]:.4g} after 3 generations" in kl_row
    diag = next(ln for ln in summary.splitlines() if ln.startswith("| diagnostics"))
    assert diag.count("|") == 3  # one table row of two cells: no stray pipes inside


def test_eval_kl_bad_base_is_one_line(tiny_model, tmp_path):
    bad = run_cli(["eval", tiny_model, "--base", tmp_path / "none", "--limit", "1"])
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    other = tmp_path / "other_vocab"
    model, tok = _load(tiny_model)
    model.resize_token_embeddings(len(tok) + 8)
    model.save_pretrained(other)
    tok.save_pretrained(other)
    bad = run_cli(["eval", tiny_model, "--base", other, "--limit", "1", "--max-new-tokens", "2"])
    assert bad.returncode == 2 and "KL needs the same vocabulary" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def _independent_diagnostics(rewards, seeds, signs, lr):
    """From the recorded rows alone: pair gaps by seed, z-scores, coefficients by seed."""
    n = len(rewards)
    pairs = {}
    for r, s, g in zip(rewards, seeds, signs, strict=True):
        pairs.setdefault(int(s), {})[int(g)] = r
    gaps = [abs(p[1] - p[-1]) for p in pairs.values()]
    z = (rewards - rewards.mean()) / rewards.std() if rewards.std() > 0 else 0 * rewards
    coef = {}
    for zi, s, g in zip(z, seeds, signs, strict=True):
        coef[int(s)] = coef.get(int(s), 0.0) + g * zi
    return {"pair_disagree": np.mean([gap != 0 for gap in gaps]), "pair_gap": np.mean(gaps),
            "distinct_rewards": len(set(rewards.tolist())) / n,
            "update_coef_norm": lr / n * np.sqrt(sum(c * c for c in coef.values()))}


def test_generation_diagnostics_are_recorded(kl_run):
    path, _ = kl_run
    rows = runfile.read_generations(path)
    for t in range(3):
        want = _independent_diagnostics(rows["rewards"][t], rows["seeds"][t], rows["signs"][t],
                                        0.05)
        for name, value in want.items():
            assert rows[name][t] == pytest.approx(value, rel=1e-12, abs=1e-15), (name, t)


def test_files_without_kl_or_diagnostics_still_read_report_and_resume(kl_run, tmp_path):
    """A run file written before these fields existed: read as NaN, resumed with them."""
    path, _ = kl_run
    old = tmp_path / "old.h5"
    shutil.copy(path, old)
    with h5py.File(old, "r+") as f:
        for name in ("pair_disagree", "pair_gap", "distinct_rewards", "update_coef_norm"):
            del f["generations"][name]
        del f["eval/kl"]
    evals = runfile.read_evals(old)
    assert np.isnan(evals["kl"]).all() and len(evals["kl"]) == 3
    info = run_cli(["inspect", old])
    assert info.returncode == 0 and "KL to base" not in info.stdout
    from es_mpi.tooling import report

    rep = report.write_report([old], tmp_path / "rep")
    assert "diagnostics.png" not in {p.name for p in rep.files}
    assert "KL to base" not in (tmp_path / "rep" / "summary.md").read_text()
    resumed = run_cli(["resume", old, "--generations", "4"])
    assert resumed.returncode == 0, resumed.stderr
    evals = runfile.read_evals(old)
    assert evals["generation"].tolist() == [0, 2, 3, 4]
    assert np.isnan(evals["kl"][:3]).all() and evals["kl"][3] > 0
    rows = runfile.read_generations(old)
    assert np.isnan(rows["pair_disagree"][:3]).all() and np.isfinite(rows["pair_disagree"][3])


def test_lowrank_run_records_kl_too(tiny_model, tmp_path):
    path = tmp_path / "lowrank.h5"
    result = run_cli(["train", "--model", tiny_model, "--run", path, "--mode", "lowrank",
                      "--population", "4", "--sigma", "0.05", "--lr", "0.05",
                      "--max-new-tokens", "4", "--generations", "1", "--eval-every", "1",
                      "--eval-limit", "2", "--eval-kl"])
    assert result.returncode == 0, result.stderr
    evals = runfile.read_evals(path)
    assert evals["kl"][0] == 0.0 and evals["kl"][1] > 0
    rows = runfile.read_generations(path)  # no mirrored pairs: no pair diagnostics
    assert np.isnan(rows["pair_disagree"]).all() and np.isnan(rows["pair_gap"]).all()
    assert rows["distinct_rewards"][0] == len(set(rows["rewards"][0].tolist())) / 4
    off = tmp_path / "off.h5"
    result = run_cli(["train", "--model", tiny_model, "--run", off, "--population", "4",
                      "--max-new-tokens", "4", "--generations", "1", "--eval-every", "1",
                      "--eval-limit", "2"])  # off by default: no second model
    assert result.returncode == 0, result.stderr
    assert np.isnan(runfile.read_evals(off)["kl"]).all()
    assert "KL to base" not in result.stdout


@pytest.mark.parametrize("arch", sorted(__import__("tiny_model").ARCHS))
def test_completion_logits_are_those_greedy_decoding_used(arch, tmp_path):
    """On every architecture, left-padded rows: the teacher-forced logits pick exactly the
    tokens generate chose (a shift by one position does not), so the KL is taken where the
    model decoded."""
    from tiny_model import make_tiny_arch

    model, tok = _load(make_tiny_arch(tmp_path / arch, arch))
    tok.padding_side = "left"
    batch = hf.encode_prompts(tok, ["What is the capital of Italy?", "Is the sun a star?"],
                              torch.device("cpu"), templated=False)
    _, tokens, new_ids = hf.generate(model, tok, batch, 6, return_ids=True)
    logits, mask = kl.completion_logits(model, batch, new_ids, tokens)
    for row, n in enumerate(tokens):
        assert logits[row, :n].argmax(-1).tolist() == new_ids[row, :n].tolist(), row
        assert mask[row].sum() == n
