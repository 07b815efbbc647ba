"""Odd models: no pad token, no chat template, non-causal models, damaged weight files."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import one_error_line, run_cli
from tiny_model import make_tokenizer


def eval_json(target, extra=()):
    result = run_cli(["eval", target, "--max-new-tokens", "5", "--batch-size", "6", "--json",
                      *extra])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_tokenizer_without_pad_token_evaluates_as_with_one(tiny_model, tmp_path):
    nopad = tmp_path / "nopad"
    shutil.copytree(tiny_model, nopad)
    tok = make_tokenizer(nopad, pad=False)
    assert tok.pad_token is None
    # the batch of 6 prompts of different lengths needs padding; padding is masked out
    assert eval_json(nopad)["completions"] == eval_json(tiny_model)["completions"]


def test_chat_format_without_a_chat_template_is_refused_before_loading(tiny_model, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        (base / name).unlink(missing_ok=True)
    make_tokenizer(base, chat_template=False)
    result = run_cli(["train", "--model", base, "--run", tmp_path / "r.h5",
                      "--prompt-format", "chat"])
    one_error_line(result, "has no chat template", "--prompt-format raw")
    assert not (tmp_path / "r.h5").exists()


@pytest.mark.parametrize(("config", "needle"), [
    ({"model_type": "t5", "is_encoder_decoder": True,
      "architectures": ["T5ForConditionalGeneration"]}, "is an encoder-decoder (t5)"),
    ({"model_type": "vit", "architectures": ["ViTModel"]},
     "(ViTModel) is not a causal language model"),
])
def test_non_causal_models_are_refused_from_their_config(tiny_model, tmp_path, config, needle):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "config.json").write_text(json.dumps(config))
    for args in (["train", "--model", model, "--run", tmp_path / "r.h5"], ["eval", model]):
        one_error_line(run_cli(args), needle)


@pytest.mark.parametrize("keep", [4, 100, -1000])
def test_a_truncated_weights_file_is_named_in_one_line(tiny_model, tmp_path, keep):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep])  # an interrupted copy: the header, or part of the data
    for args in (["train", "--model", model, "--run", tmp_path / "r.h5"], ["eval", model],
                 ["bench", "--model", model]):
        one_error_line(run_cli(args), f"weights file {weights} is damaged", "copy the model")


def test_a_missing_shard_is_named(tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    one_error_line(run_cli(["eval", model]),
                   f"weights file {model / 'model-00002-of-00002.safetensors'} is missing")
