"""The GRPO baseline (tools/grpo.py, TRL) and the ES vs GRPO table of tools/experiments.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import cli_env, need_modules, run_cli
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))


def weights(path: Path) -> dict:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_grpo_trains_counts_its_work_and_saves_models_es_mpi_eval_scores(tiny_model, tmp_path):
    need_modules("trl", "datasets", extra="rl")  # CI installs the extra
    out = tmp_path / "grpo"
    cmd = [sys.executable, str(ROOT / "tools/grpo.py"), "--model", str(tiny_model),
           "--task", "conciseness", "--beta", "0.1", "--seed", "3", "--steps", "2",
           "--save-at", "1", "2", "--generations", "2", "--max-new-tokens", "8",
           "--lr", "1e-3", "--temperature", "20", "--threads", "1", "--out", str(out)]
    done = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "grpo.json").read_text())
    # conciseness has the paper's 2 training prompts: each step is 2 prompts x 2 completions
    # (a tiny random model is so sure of its next token that only a high temperature makes
    # the two completions of a prompt differ, and so gives GRPO an advantage to follow)
    assert record["prompts"] == 2
    assert record["saved"]["1"]["completions_generated"] == 4
    assert record["saved"]["1"]["completions_backpropagated"] == 4
    assert record["completions_generated"] == record["completions_backpropagated"] == 8
    assert [s["step"] for s in record["per_step"]] == [1, 2]
    base, one, two = weights(tiny_model), weights(out / "step-1"), weights(out / "step-2")
    assert base.keys() == one.keys() == two.keys()
    assert any(not (base[k] == one[k]).all() for k in base), "step 1 changed nothing"
    assert any(not (one[k] == two[k]).all() for k in base), "step 2 changed nothing"

    # the saved model is a model directory es-mpi scores, with KL to the base model
    result = run_cli(["eval", str(out / "step-2"), "--base", str(tiny_model), "--limit", "2",
                      "--max-new-tokens", "4", "--json"])
    assert result.returncode == 0, result.stderr[-2000:]
    scored = json.loads(result.stdout.strip().splitlines()[-1])
    assert scored["n_examples"] == 2 and scored["kl"] > 0


def test_grpo_refuses_save_steps_outside_the_run(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "tools/grpo.py"), "--steps", "3",
                           "--save-at", "5", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--save-at steps must lie in 1..--steps (3)" in done.stderr


def test_rl_table_gives_mean_and_spread_over_seeds():
    import experiments

    def point(method, setting, seed, reward, kl):
        return {"method": method, "setting": setting, "seed": seed, "reward": reward,
                "kl": kl, "seconds": 120.0, "generated": 320,
                "backpropagated": 0 if method != "GRPO" else 320, "n": 58}

    points = [point("base model", "", None, -130.0, 0.0),
              point("ES", "sigma 0.01", 0, -20.0, 0.25), point("ES", "sigma 0.01", 1, -30.0, 0.35),
              point("GRPO", "beta 0", 0, -10.0, 1.0), point("GRPO", "beta 0", 1, -14.0, 2.0)]
    lines = experiments.rl_table(points).splitlines()

    def row(start: str) -> str:
        (found,) = [line for line in lines if line.startswith(start)]
        return found

    # mean +- population std, by hand: ES (-20, -30) -> -25.0 +- 5.0; KL (0.25, 0.35)
    assert row("| ES | sigma 0.01 | 2 |").endswith(
        "| 2 | -25.0 +- 5.0 | 0.300 +- 0.050 | 2.0 min | 320 | 0 |")
    assert row("| GRPO | beta 0 | 2 |").endswith(
        "| 2 | -12.0 +- 2.0 | 1.500 +- 0.500 | 2.0 min | 320 | 320 |")
    assert "|  | -130.0 | 0.000 |" in row("| base model |")
    assert "held-out reward (58 prompts)" in lines[0]
    assert row("| GRPO | beta 0 | 1 |") == "| GRPO | beta 0 | 1 | -14.0 | 2.000 |"
