"""Greedy decoding that nothing in a model's generation_config.json can change."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from conftest import cli_in_process, run_cli

pytestmark = pytest.mark.mpi

# everything a checkpoint's generation_config.json can ask for that would change decoding
HOSTILE = {
    "do_sample": True, "temperature": 0.3, "top_k": 3, "top_p": 0.5, "typical_p": 0.9,
    "repetition_penalty": 5.0, "encoder_repetition_penalty": 2.0,
    "no_repeat_ngram_size": 1, "min_length": 40, "min_new_tokens": 4,
    "bad_words_ids": [[5], [6], [7], [8]], "forced_bos_token_id": 9, "forced_eos_token_id": 10,
    "suppress_tokens": [11, 12, 13], "begin_suppress_tokens": [14, 15],
    "sequence_bias": [[[16], 5.0]], "num_beams": 3, "length_penalty": -2.0,
    "exponential_decay_length_penalty": [2, 1.5], "renormalize_logits": True,
}
TRAIN = ["--population", "4", "--sigma", "0.05", "--lr", "0.05", "--max-new-tokens", "6",
         "--generations", "2", "--eval-every", "2", "--antithetic"]


@pytest.fixture(scope="module")
def hostile_model(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "model"
    shutil.copytree(tiny_model, path)
    config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**config, **HOSTILE}))
    return path


def test_the_hostile_config_would_change_plain_generate(tiny_model, hostile_model):
    """The guard: without es-mpi's handling, transformers does apply these settings."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model, padding_side="left")
    enc = tok(["What is the capital of France?", "hello"], return_tensors="pt", padding=True)
    outs = []
    for path in (tiny_model, hostile_model):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        torch.manual_seed(0)
        outs.append(model.generate(**enc, max_new_tokens=6)[:, enc["input_ids"].shape[1]:])
    assert outs[0].shape != outs[1].shape or not torch.equal(outs[0], outs[1])


def read(path):
    with h5py.File(path, "r") as f:
        return (f["generations/rewards"][...], f["generations/checksum"][...],
                [json.loads(t) for t in f["eval/completions"].asstr()[...]])


def test_a_hostile_generation_config_scores_as_the_same_weights_without_it(
        tiny_model, hostile_model, tmp_path):
    results = {}
    for name, model in (("clean", tiny_model), ("hostile", hostile_model)):
        one, two = tmp_path / f"{name}1.h5", tmp_path / f"{name}2.h5"
        cli_in_process(["train", "--model", model, "--run", one, "-q", *TRAIN])
        result = run_cli(["train", "--model", model, "--run", two, *TRAIN], np=2)
        assert result.returncode == 0, result.stderr
        results[name, 1], results[name, 2] = read(one), read(two)
    rewards, checksums, completions = results["clean", 1]
    assert len(np.unique(rewards)) > 1, "rewards do not vary: the comparison is blind"
    for key, (r, c, texts) in results.items():
        np.testing.assert_array_equal(r, rewards, err_msg=str(key))
        np.testing.assert_array_equal(c, checksums, err_msg=str(key))
        assert texts == completions, key
