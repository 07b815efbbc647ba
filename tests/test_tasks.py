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
