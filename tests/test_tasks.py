import pytest
from transformers import AutoTokenizer

from es_mpi.errors import EsError
from tasks import TASKS, get_task
from tasks.conciseness import Conciseness


def test_conciseness_reward_is_length_gap_of_the_completion():
    task = get_task("conciseness")
    example = {"prompt": "What is 7 times 8?", "answer": "56"}
    assert task.reward("56", example) == 0.0
    assert task.reward("  56\n", example) == 0.0
    assert task.reward("The answer is 56.", example) == -15.0
    assert task.reward("", example) == -2.0
    assert task.train_examples() and task.eval_examples()
    train = {e["prompt"] for e in task.train_examples()}
    assert not train & {e["prompt"] for e in task.eval_examples()}


def test_conciseness_correct_ranks_every_right_answer_above_every_wrong_one():
    task = get_task("conciseness-correct")
    assert task.train_examples() == get_task("conciseness").train_examples()
    lion = {"prompt": "Which animal is known as the king of the jungle?", "answer": "Lion"}
    right = ["Lion", "lion.", "The king of the jungle is the lion.", "(lion) " + "x" * 500]
    wrong = ["Tiger", "Lio", "Lions", "The jaguar.", "", "xlion", "Li-on"]
    assert task.reward("Lion", lion) == 1.5 and task.reward("  LION\n", lion) == 1.5
    assert task.reward("lion.", lion) == 1.0 + 0.5 * 4 / 5
    assert task.reward("", lion) == 0.0 and task.reward("Lio", lion) == 0.5 * 3 / 4
    assert min(task.reward(c, lion) for c in right) > task.solved_reward
    assert max(task.reward(c, lion) for c in wrong) <= 0.5 < task.solved_reward
    # shorter is better among right answers, and among wrong ones
    assert task.reward("It is the lion.", lion) > task.reward(right[2], lion)
    assert task.reward("Tiger", lion) > task.reward("The jaguar, clearly.", lion)
    number = {"prompt": "What is 9 plus 6?", "answer": "15"}
    assert task.reward("9 plus 6 is 15.", number) > 1 > task.reward("9 plus 6 is 150.", number)


def test_prompt_uses_the_chat_template_or_raw_text(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    task = Conciseness()
    example = task.train_examples()[0]
    prompt = task.prompt(example, tok)
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")
    assert example["prompt"] in prompt and task.templated(tok)
    task.prompt_format = "chat"
    assert task.prompt(example, tok) == prompt
    task.prompt_format = "raw"
    assert task.prompt(example, tok) == example["prompt"] and not task.templated(tok)
    tok.chat_template = None  # a base model's tokenizer
    task.prompt_format = "auto"
    assert task.prompt(example, tok) == example["prompt"] and not task.templated(tok)
    task.prompt_format = "chat"
    with pytest.raises(EsError, match="the tokenizer has no chat template; use "
                                      "--prompt-format raw"):
        task.prompt(example, tok)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(EsError, match="known tasks: " + ", ".join(sorted(TASKS))):
        get_task("countdwn")


def test_conciseness_held_out_set_and_the_larger_training_set():
    """The shipped files read with json alone: >= 50 held-out questions with short answers,
    the former 6 first, none of them trained on; the defaults stay the paper's 2 prompts."""
    import json
    from pathlib import Path

    import tasks as tasks_pkg
    from es_mpi import presets

    def read(path):
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line]

    held = read(Path(tasks_pkg.__file__).with_name("conciseness_heldout.jsonl"))
    assert len(held) >= 50
    assert all(set(e) == {"prompt", "answer"} and 0 < len(e["answer"]) <= 12 for e in held)
    assert len({e["prompt"] for e in held}) == len(held)
    assert held[:2] == [{"prompt": "What is the capital of Italy?", "answer": "Rome"},
                        {"prompt": "What is 9 plus 6?", "answer": "15"}]
    task = get_task("conciseness")
    assert task.eval_examples() == held
    assert [e["prompt"] for e in task.train_examples()] == [
        "Solve: 3 + 5 =", "If all birds can fly and penguins are birds, can penguins fly?"]
    large = read(presets.PRESET_DIR / "conciseness_large.jsonl")
    train = [{"prompt": e["prompt"], "answer": e["answer"]} for e in large
             if e["split"] == "train"]
    evals = [{"prompt": e["prompt"], "answer": e["answer"]} for e in large
             if e["split"] == "eval"]
    assert len(train) >= 50 and evals == held
    assert train[:2] == [{"prompt": p["prompt"], "answer": p["answer"]}
                         for p in task.train_examples()]
    trained = {e["prompt"] for e in train} | {e["prompt"] for e in read(
        presets.PRESET_DIR / "conciseness_qa.jsonl") if e["split"] == "train"}
    assert not trained & {e["prompt"] for e in held}
    from_file = get_task("conciseness", data=str(presets.PRESET_DIR / "conciseness_large.jsonl"))
    assert len(from_file.train_examples()) == len(train)
    assert [e["prompt"] for e in from_file.eval_examples()] == [e["prompt"] for e in held]
