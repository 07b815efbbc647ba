"""The task interface: examples, prompts and a scalar reward on the completion only."""

from __future__ import annotations

from typing import Any

from es_mpi.errors import EsError

Example = dict[str, Any]


class Task:
    """A reward task. Subclasses give examples and `reward`; prompts come from `user_text`.

    `reward(completion, example)` sees the model's completion only (never the prompt), so a
    model cannot earn reward by having the answer in its input.
    """

    name: str = "task"
    # chat: through the tokenizer's chat template; raw: the text as is (the paper's);
    # auto: chat where the tokenizer has a template. Set from the run's --prompt-format.
    prompt_format: str = "auto"
    # an example counts as solved when its reward >= this (None: report mean reward only)
    solved_reward: float | None = None

    def train_examples(self) -> list[Example]:
        raise NotImplementedError

    def eval_examples(self) -> list[Example]:
        raise NotImplementedError

    def user_text(self, example: Example) -> str:
        return example["prompt"]

    def templated(self, tokenizer) -> bool:
        """Whether prompts go through the tokenizer's chat template."""
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if self.prompt_format == "chat" and not has_template:
            raise EsError("--prompt-format chat: the tokenizer has no chat template; "
                          "use --prompt-format raw")
        return self.prompt_format != "raw" and has_template

    def prompt(self, example: Example, tokenizer) -> str:
        """The model's input text: through the chat template, or the raw text."""
        text = self.user_text(example)
        if self.templated(tokenizer):
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        return text

    def reward(self, completion: str, example: Example) -> float:
        raise NotImplementedError

    def rewards(self, completions: list[str], examples: list[Example]) -> list[float]:
        """Score a batch; override where batching helps (e.g. a reward model)."""
        return [self.reward(c, e) for c, e in zip(completions, examples, strict=True)]
