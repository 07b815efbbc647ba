"""A tiny random-weights Llama with a real byte-level BPE tokenizer, built offline."""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "What is the capital of France? Paris is the capital of France.",
    "What is 7 times 8? The answer is 56.",
    "Which planet is the largest in the solar system? Jupiter.",
    "What color is a clear daytime sky? Blue. Answer in one word.",
    "user assistant system hello world the a an of to in is it",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_model(path: str | Path, seed: int = 0, tie: bool = False,
                    dtype: torch.dtype = torch.float32, hidden_size: int = 32,
                    layers: int = 2) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", bos_token="<|im_start|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)

    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=tie, initializer_range=0.2, eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    # random init gives tiny logits; scale up so greedy outputs differ between members
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(path)
    return path


if __name__ == "__main__":
    import sys

    print(make_tiny_model(sys.argv[1]))
