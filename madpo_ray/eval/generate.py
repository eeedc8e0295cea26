"""Batch generation of summaries. The transformers backend is here; it is also the fallback
when vLLM is not installed."""

from __future__ import annotations

from typing import Sequence

import torch

from madpo_ray.data.collate import encode_prompt


@torch.no_grad()
def generate_transformers(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 24,
                          temperature: float = 0.0, batch_size: int = 32, seed: int = 0,
                          max_prompt_length: int = 192) -> list[str]:
    """Left-padded batched `generate`; temperature 0 is greedy. Returns decoded completions."""
    model.eval()
    torch.manual_seed(seed)
    pad = tokenizer.pad_token_id
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [encode_prompt(tokenizer, p)[-max_prompt_length:] for p in prompts[start:start + batch_size]]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk])
        attn = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
        kwargs = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=pad,
                      eos_token_id=tokenizer.eos_token_id)
        if temperature > 0:
            kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
        gen = model.generate(input_ids=ids, attention_mask=attn, **kwargs)
        for row in gen[:, width:]:
            out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return out
