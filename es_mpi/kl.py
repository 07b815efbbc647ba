"""KL divergence of a fine-tuned policy from its base model, on the policy's own tokens.

The estimator (one for every method, ES or RL, so their figures compare):

    KL_x = 1/T_x * sum_{t < T_x} sum_v p_theta(v | x, y_<t) * (log p_theta(v | x, y_<t)
                                                             - log p_base(v | x, y_<t))
    KL   = mean over held-out prompts x of KL_x                  (nats per token)

where y is the policy's greedy completion of prompt x and T_x its length in tokens (up to
and including its EOS, if it made one). This is the exact KL(p_theta || p_base) over the
whole vocabulary at each position the policy decoded, not a sampled estimate: decoding is
greedy, so the completion is one deterministic sequence and the single-token estimators
(k1 = log p_theta(y_t) - log p_base(y_t)) would measure the log-ratio of the argmax token
only, which says nothing about the rest of the distribution. Per token, so a run that
shortens its answers (conciseness) is not credited with a smaller KL for having fewer
tokens. Computed in float64 from the two models' logits: early in a run the KL per token
is ~1e-6 and less, below what fp32 log-probabilities of ~10 resolve, and in chunks of
positions, so memory stays at a few (positions x vocabulary) blocks.
"""

from __future__ import annotations

import torch

POSITIONS = 256  # positions per float64 block of (positions x vocabulary)


def token_kl(logits_theta: torch.Tensor, logits_base: torch.Tensor) -> torch.Tensor:
    """sum_v p log(p / q) over the last axis (the vocabulary), in float64: one value per
    position. Two equal logit tensors give exactly 0."""
    logp = torch.log_softmax(logits_theta.double(), dim=-1)
    logq = torch.log_softmax(logits_base.double(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(dim=-1)


def completion_kl(logits_theta: torch.Tensor, logits_base: torch.Tensor,
                  completion_mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean of token_kl over the completion positions (mask 1), shape (rows,).

    logits_*: (rows, T, V) predicting completion token t at position t; completion_mask:
    (rows, T). A row without completion tokens gives 0.
    """
    mask = completion_mask.double()
    total = torch.zeros(mask.shape[0], dtype=torch.float64, device=mask.device)
    for row in range(mask.shape[0]):
        for t0 in range(0, mask.shape[1], POSITIONS):
            part = token_kl(logits_theta[row, t0:t0 + POSITIONS],
                            logits_base[row, t0:t0 + POSITIONS])
            total[row] += (part * mask[row, t0:t0 + POSITIONS]).sum()
    return total / mask.sum(dim=1).clamp(min=1)


@torch.no_grad()
def completion_logits(model, batch: dict[str, torch.Tensor], new_ids: torch.Tensor,
                      lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits predicting each completion token, completion mask) of one teacher-forced
    forward pass over prompt + completion.

    batch: the left-padded prompts as `generate` got them; new_ids: (rows, T) the tokens
    it made (padding after an EOS); lengths: each row's completion length. Position ids
    follow the attention mask, as in generate, so the logits are those it decoded with.
    """
    prompt_ids, prompt_mask = batch["input_ids"], batch["attention_mask"]
    new_ids = new_ids.to(prompt_ids.device)
    steps = new_ids.shape[1]
    mask_new = (torch.arange(steps, device=prompt_ids.device)[None, :]
                < torch.tensor(lengths, device=prompt_ids.device)[:, None]).to(prompt_mask.dtype)
    ids = torch.cat([prompt_ids, new_ids], dim=1)
    mask = torch.cat([prompt_mask, mask_new], dim=1)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    start = prompt_ids.shape[1] - 1  # the last prompt position predicts completion token 0
    return logits[:, start:start + steps], mask_new


@torch.no_grad()
def batch_kl(model, base_model, batch: dict[str, torch.Tensor], new_ids: torch.Tensor,
             lengths: list[int]) -> list[float]:
    """Each row's per-token KL(model || base_model) along its completion (see above)."""
    logits, mask = completion_logits(model, batch, new_ids, lengths)
    logits_base, _ = completion_logits(base_model, batch, new_ids, lengths)
    return completion_kl(logits, logits_base.to(logits.device), mask).tolist()
