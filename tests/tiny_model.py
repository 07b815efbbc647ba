"""Tiny random-weights models with a real byte-level BPE tokenizer, built offline.

`make_tiny_model` is the Llama most tests use; `make_tiny_arch` builds any of ARCHS, the
architecture matrix of tests/test_architectures.py, from its transformers config class.
"""

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


def make_tokenizer(path: Path, chat_template: bool = True, pad: bool = True):
    """The byte-level BPE tokenizer of every tiny model, saved to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    # no token_type_ids, as a decoder LM's tokenizer (transformers 4.x adds them by default,
    # and generate(**enc) then refuses them)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>" if pad else None,
                                   bos_token="<|im_start|>",
                                   model_input_names=["input_ids", "attention_mask"])
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def make_tiny_model(path: str | Path, seed: int = 0, tie: bool = False,
                    dtype: torch.dtype = torch.float32, hidden_size: int = 32,
                    layers: int = 2) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fast = make_tokenizer(path)
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


# architecture -> (transformers config class, its settings for a tiny model, chat template)
_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
ARCHS: dict[str, tuple[str, dict, bool]] = {
    "llama": ("LlamaConfig", _DECODER, True),
    "qwen2": ("Qwen2Config", {**_DECODER, "tie_word_embeddings": True}, True),  # + biases
    "qwen3": ("Qwen3Config", {**_DECODER, "head_dim": 8}, True),
    "mistral": ("MistralConfig", _DECODER, True),
    "gemma3": ("Gemma3TextConfig", {**_DECODER, "head_dim": 8}, True),  # scaled embedding
    "phi3": ("Phi3Config", _DECODER, True),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=512), False),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4), False),
    "olmo2": ("Olmo2Config", _DECODER, True),
}


def make_tiny_arch(path: str | Path, arch: str, seed: int = 0) -> Path:
    """A tiny random model of architecture `arch` (a key of ARCHS); GPT-2 and GPT-NeoX,
    base-model families, get no chat template."""
    import transformers
    from transformers import AutoModelForCausalLM

    class_name, settings, chat = ARCHS[arch]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fast = make_tokenizer(path, chat_template=chat)
    config = getattr(transformers, class_name)(
        vocab_size=len(fast), max_position_embeddings=512, initializer_range=0.2,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
        bos_token_id=fast.bos_token_id, **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # random init gives tiny logits; scale up so greedy outputs differ between members
    # (not a tied head: larger embeddings would drown the layers, and every model would
    # repeat its input token whatever the perturbation)
    if not config.tie_word_embeddings:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(20.0)
    model.save_pretrained(path)
    return path


if __name__ == "__main__":
    import sys

    print(make_tiny_model(sys.argv[1]))
