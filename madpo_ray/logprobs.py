"""Sequence log-probs of a response given its prompt: the one implementation used by
scoring, training and evaluation, so reference and policy log-probs can never disagree
on masking or position conventions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SequenceLogProbs:
    summed: torch.Tensor  # [B] sum of log p(token) over response tokens
    n_tokens: torch.Tensor  # [B] number of response tokens

    @property
    def mean(self) -> torch.Tensor:
        """Per-token average (IPO's length normalisation)."""
        return self.summed / self.n_tokens.clamp_min(1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over real tokens whatever the padding side, so left padding does not shift RoPE."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t] | input_ids[:, :t]) for t >= 1, shape [B, T-1].

    Uses cross_entropy (a fused log-softmax + gather) instead of materialising the full
    [B, T, V] log-softmax a second time.
    """
    shifted_logits = logits[:, :-1, :]
    targets = input_ids[:, 1:]
    b, t, v = shifted_logits.shape
    nll = F.cross_entropy(shifted_logits.reshape(b * t, v).float(), targets.reshape(b * t), reduction="none")
    return -nll.view(b, t)


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_mask: torch.Tensor) -> SequenceLogProbs:
    """Sum of response-token log-probs; `response_mask[b, t] = 1` where token t is a response token."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask)).logits
    return sequence_logprobs_from_logits(logits, input_ids, response_mask)


def sequence_logprobs_from_logits(logits: torch.Tensor, input_ids: torch.Tensor,
                                  response_mask: torch.Tensor) -> SequenceLogProbs:
    per_token = token_logprobs(logits, input_ids)
    mask = response_mask[:, 1:].to(per_token.dtype)  # token 0 is never predicted
    return SequenceLogProbs(summed=(per_token * mask).sum(-1), n_tokens=mask.sum(-1))
