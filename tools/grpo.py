"""GRPO baseline with TRL on an es-mpi task: the RL side of docs/results.md's ES vs GRPO table.

    python tools/grpo.py --model demo/model --task conciseness --beta 0.01 --seed 0 \\
        --steps 40 --save-at 20 40 --out results/grpo/beta0.01-s0

Trains with TRL's GRPOTrainer on the same model, training prompts (the task's training
examples with the same chat template), token budget and reward function as
`es-mpi train`, and saves the model at each step in --save-at as OUT/step-N (a model
directory that `es-mpi eval DIR --base MODEL` scores with the same held-out set and the
same KL estimator as an ES run). OUT/grpo.json records the settings, the wall time, the
training reward per step, and the work done: completions generated and completions
back-propagated, counted as they pass through the trainer.

TRL is an optional extra (`pip install 'es-mpi[rl]'`), never needed by es-mpi itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "demo/model"))
    p.add_argument("--task", default="conciseness")
    p.add_argument("--beta", type=float, default=0.0, help="KL weight (TRL's beta)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps")
    p.add_argument("--save-at", type=int, nargs="+", default=None,
                   help="steps after which to save the model (default: the last)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--generations", type=int, default=8,
                   help="completions per prompt (GRPO's group; ES's population)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    save_at = sorted(set(args.save_at or [args.steps]))
    if args.steps < 1 or not all(1 <= s <= args.steps for s in save_at):
        p.error(f"--save-at steps must lie in 1..--steps ({args.steps}), got {save_at}")
    args.save_at = save_at
    return args


def main() -> None:
    args = parse()
    try:
        import torch
        import trl
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as exc:
        sys.exit(f"grpo: {exc.name} is missing; install the RL extra: "
                 "pip install 'es-mpi[rl]' (TRL and datasets)")
    from tasks import get_task

    torch.set_num_threads(args.threads)
    task = get_task(args.task)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    examples = task.train_examples()
    # The prompt text es-mpi generates from (chat template included), so both methods see
    # the same tokens; the index finds the example again in the reward function.
    data = Dataset.from_dict({"prompt": [task.prompt(e, tokenizer) for e in examples],
                              "index": list(range(len(examples)))})
    counts = {"completions_generated": 0, "completions_backpropagated": 0}

    def reward(completions: list[str], index: list[int], **_) -> list[float]:
        scores = [float(task.reward(c, examples[i]))
                  for c, i in zip(completions, index, strict=True)]
        counts["completions_generated"] += len(scores)
        return scores

    reward.__name__ = f"{task.name}_reward"
    config = GRPOConfig(
        output_dir=str(args.out / "trainer"), seed=args.seed, data_seed=args.seed,
        learning_rate=args.lr, max_steps=args.steps, beta=args.beta,
        num_generations=args.generations,
        per_device_train_batch_size=args.generations * len(examples),
        max_completion_length=args.max_new_tokens, temperature=args.temperature,
        use_cpu=not torch.cuda.is_available(), gradient_checkpointing=False,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True)

    class Counted(GRPOTrainer):
        def compute_loss(self, model, inputs, *a, **k):
            counts["completions_backpropagated"] += int(inputs["completion_ids"].shape[0])
            return super().compute_loss(model, inputs, *a, **k)

    class Saver(TrainerCallback):
        def on_step_end(self, _args, state, control, **_):
            if state.global_step in args.save_at:
                path = args.out / f"step-{state.global_step}"
                trainer.model.save_pretrained(path)
                tokenizer.save_pretrained(path)
                saved[state.global_step] = {**counts, "wall_s": time.perf_counter() - start}

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    trainer = Counted(model=model, args=config, train_dataset=data, reward_funcs=reward,
                      processing_class=tokenizer, callbacks=[Saver()])
    saved: dict[int, dict] = {}
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    per_step = [{"step": h["step"], "reward": h.get("reward"), "kl": h.get("kl")}
                for h in trainer.state.log_history if "reward" in h]
    record = {"method": "grpo", "task": task.name, "model": str(Path(args.model).resolve()),
              "beta": args.beta, "seed": args.seed, "steps": args.steps, "lr": args.lr,
              "generations": args.generations, "prompts": len(examples),
              "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
              "loss_type": config.loss_type, "trl": trl.__version__,
              "wall_s": wall, **counts, "saved": saved, "per_step": per_step}
    (args.out / "grpo.json").write_text(json.dumps(record, indent=1))
    print(f"grpo: {args.steps} steps in {wall:.0f} s; saved steps {sorted(saved)} under "
          f"{args.out}")


if __name__ == "__main__":
    main()
