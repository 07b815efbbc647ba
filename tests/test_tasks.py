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


def test_prompt_uses_the_chat_template_or_raw_text(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    task = Conciseness()
    example = task.train_examples()[0]
    prompt = task.prompt(example, tok)
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")
    assert example["prompt"] in prompt and task.templated(tok)
    task.use_chat_template = False
    assert task.prompt(example, tok) == example["prompt"] and not task.templated(tok)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(EsError, match="known tasks: " + ", ".join(sorted(TASKS))):
        get_task("countdwn")
