"""The architecture matrix: every common model family, in both modes, end to end.

For each tiny random model of tiny_model.ARCHS and each mode:
- a 2-rank run (mpiexec) and a 1-rank run stopped after one generation and resumed end
  bit-identical (rewards of every generation, final checkpoint), with rewards that vary;
- `export` of the last generation, loaded with plain transformers `from_pretrained`,
  generates greedily the very completions the run's held-out evaluation recorded;
- `export` of a generation between checkpoints (no checkpoint at or before it: replayed
  from the base model) writes weights whose checksum, computed here from the exported
  files by es_mpi.es.checksum's definition written out anew, is the one the run recorded
  for that generation, and which differ from the base weights; the tensors it does not
  train (lowrank: norms, biases) are the base model's, bit for bit.
The lowrank forward of every architecture against materialized weights (fp64) is in
tests/test_lowrank.py.
"""

from __future__ import annotations

import hashlib
import json

import h5py
import numpy as np
import pytest
import torch
from conftest import cli_in_process, run_cli
from tiny_model import ARCHS, make_tiny_arch

pytestmark = pytest.mark.mpi

MODES = {"full": [], "lowrank": ["--mode", "lowrank", "--member-batch", "2"]}
SETTINGS = ["--population", "4", "--sigma", "0.05", "--lr", "0.05", "--max-new-tokens", "5",
            "--checkpoint-every", "2", "--eval-every", "3", "--eval-batch-size", "8",
            "--antithetic"]


@pytest.fixture(scope="module", params=list(ARCHS))
def arch_model(request, tmp_path_factory):
    return request.param, make_tiny_arch(tmp_path_factory.mktemp(request.param), request.param)


def read_run(path):
    with h5py.File(path, "r") as f:
        done = int(f.attrs["complete_generations"])
        rewards = f["generations/rewards"][:done]
        final = f[f"checkpoints/{done:08d}"]
        delta = {name: final[name][...] for name in final if name != "fixups"}
        fixups = {name: (g["index"][...], g["value"][...])
                  for name, g in final.get("fixups", {}).items()}
    return rewards, delta, fixups


@pytest.mark.parametrize("mode", list(MODES))
def test_architecture_end_to_end(arch_model, mode, tmp_path):
    arch, model = arch_model
    two, one = tmp_path / "two.h5", tmp_path / "one.h5"
    common = ["--model", model, *SETTINGS, *MODES[mode]]
    result = run_cli(["train", "--run", two, "--generations", "3", *common], np=2)
    assert result.returncode == 0, result.stderr

    cli_in_process(["train", "--run", one, "--generations", "1", "-q", *common])
    cli_in_process(["resume", one, "--generations", "3", "-q"])
    rewards_two, delta_two, fix_two = read_run(two)
    rewards_one, delta_one, fix_one = read_run(one)
    assert rewards_two.shape == (3, 4)
    assert len(np.unique(rewards_two)) > 1, f"{arch}: rewards do not vary; the test is blind"
    np.testing.assert_array_equal(rewards_one, rewards_two)
    assert delta_one.keys() == delta_two.keys() and delta_two
    for name, delta in delta_two.items():
        np.testing.assert_array_equal(delta_one[name], delta, err_msg=f"{arch} {name}")
    assert fix_one.keys() == fix_two.keys()
    assert any(np.abs(d).max() > 0 for d in delta_two.values()), "the weights never moved"

    # the exported weights, read by plain transformers, generate what the run evaluated
    out = tmp_path / "export"
    cli_in_process(["export", two, out])
    exported, base = state_dict(out), state_dict(model)
    for name, delta in delta_two.items():  # theta_3 = fp32(theta_0 + delta), then fix-ups
        want = (base[name].float() + torch.from_numpy(delta)).view(-1)
        if name in fix_two:
            index, value = fix_two[name]
            want[torch.from_numpy(index)] = torch.from_numpy(value)
        torch.testing.assert_close(exported[name].view(-1), want, rtol=0, atol=0)
    with h5py.File(two, "r") as f:
        assert f["eval/generation"][:].tolist() == [0, 3]
        recorded = json.loads(f["eval/completions"].asstr()[1])
        config = json.loads(f.attrs["config"])
    assert recorded == completions_of(out, config), arch

    # a generation before the first checkpoint (2) is rebuilt by replaying generation 0
    # from the base weights: the exported files hold the weights the run recorded the
    # checksum of (generations/checksum[g]: the weights after generation g's update)
    with h5py.File(two, "r") as f:
        assert min(int(k) for k in f["checkpoints"]) > 1, "generation 1 is not replayed"
        want = int(f["generations/checksum"][0])
    cli_in_process(["export", two, tmp_path / "gen1", "--generation", "1"])
    gen1 = parameters(tmp_path / "gen1")
    trained = {name: gen1[name] for name in gen1 if name in delta_two}
    assert trained.keys() == delta_two.keys()
    assert weights_checksum(trained) == want, f"{arch}: exported generation 1"
    assert weights_checksum({n: base[n] for n in trained}) != want, \
        f"{arch}: generation 0 left the weights as they were; the check is blind"
    for name in gen1.keys() - trained.keys():  # never trained: the base model's bits
        torch.testing.assert_close(gen1[name], base[name], rtol=0, atol=0)


def weights_checksum(tensors: dict[str, torch.Tensor]) -> int:
    """es_mpi.es.checksum's definition, written out here in numpy: blake2b (8-byte
    digest, person "es-mpi-check") over, per tensor in model order, its name, the sum of
    its fp32 bits read as int32 (16 bytes, little-endian, signed) and its shape as the
    text of a Python tuple; the digest read little-endian, its top bit cleared."""
    h = hashlib.blake2b(digest_size=8, person=b"es-mpi-check")
    for name, t in tensors.items():
        a = t.detach().numpy()
        assert a.dtype == np.float32, (name, a.dtype)
        total = int(a.view(np.int32).sum(dtype=np.int64))
        h.update(name.encode())
        h.update(total.to_bytes(16, "little", signed=True))
        h.update(str(tuple(a.shape)).encode())
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


def parameters(model_dir) -> dict[str, torch.Tensor]:
    """The parameters in model order, each once (tied weights under their first name)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return {name: p.detach() for name, p in model.named_parameters()}


def state_dict(model_dir) -> dict[str, torch.Tensor]:
    """The weights under their in-memory names (a checkpoint may store other names)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()


def completions_of(model_dir, config: dict) -> list[str]:
    """Greedy completions of the task's held-out prompts, with transformers alone: the
    prompts batched and left-padded as es-mpi's evaluation batches them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks import get_task

    task = get_task(config["task"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    templated = bool(tok.chat_template)
    prompts = [tok.apply_chat_template([{"role": "user", "content": e["prompt"]}],
                                       tokenize=False, add_generation_prompt=True)
               if templated else e["prompt"] for e in task.eval_examples()]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=not templated)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=config["max_new_tokens"], do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
