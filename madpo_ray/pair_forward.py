"""One forward per preference pair: `[prompt, chosen, rejected]` in a single sequence.

The rejected tokens attend to the prompt and to themselves, never to the chosen ones, and their
position ids continue from the prompt's end as if the chosen were not there, so every token sees
exactly what it would see in its own two-sequence forward (arXiv:2410.20305). A pair then costs
P + C + R tokens instead of 2P + C + R: with the default's 192-token prompts and ~24-token
responses, about 1.8x fewer.

On CPU (and any backend taking a dense mask, e.g. SDPA or eager attention) the mask is an
explicit boolean [B, 1, L, L]; attention implementations that cannot take a custom mask
(flash-attention) use the two-sequence path instead (`uses_shared_prompt`).

Sliding-window attention (Mistral, Phi-3, Qwen2's lower layers, Gemma-2/3's local layers) is
part of the mask: transformers passes a custom 4-D mask through unchanged, so a window the mask
does not carry is never applied. A windowed layer's key is visible when the pair mask allows it
and it lies within the window counted in *logical* positions, along the query's own sequence (a
rejected token counts the prompt as directly before it). Models that mix full and windowed
layers get one mask per layer type (transformers' {layer type: mask} mapping) where their
decoder takes it; any other attention layout falls back to two sequences, with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from madpo_ray.data.collate import FLOAT_COLUMNS, PairCollator
from madpo_ray.logprobs import SequenceLogProbs, sequence_logprobs, token_logprobs
from madpo_ray.models import per_position_scores, reward_scores

log = logging.getLogger(__name__)
MASKABLE_ATTENTION = ("sdpa", "eager")  # both tested equal to the two-sequence forward
FULL_LAYER, WINDOWED_LAYER = "full_attention", "sliding_attention"  # transformers' layer type names
# Decoders (transformers 5.x) that take {layer type: mask} for models mixing full and windowed
# layers; each is in the architecture matrix of tests/models/test_model_families.py.
MASK_MAPPING_MODELS = ("qwen2", "qwen3", "gemma2", "gemma3", "gemma3_text")


@dataclass(frozen=True)
class AttentionLayout:
    """What the pair mask must carry for a model: its layer types and the sliding window."""
    model_type: str
    layer_types: tuple[str, ...]  # the distinct types of its layers
    window: Optional[int]  # tokens a windowed layer attends to (None: no windowed layer)

    @property
    def per_layer_type(self) -> bool:
        return len(self.layer_types) > 1


def attention_layout(model) -> AttentionLayout:
    """From the config: `layer_types` where the model declares them (Qwen2, Gemma-2/3); a window
    with no layer types windows every layer (Mistral, Phi-3)."""
    cfg = getattr(model, "config", None)
    window = getattr(cfg, "sliding_window", None) or None
    types = tuple(dict.fromkeys(getattr(cfg, "layer_types", None) or ()))
    if not types:
        types = (WINDOWED_LAYER,) if window else (FULL_LAYER,)
    return AttentionLayout(getattr(cfg, "model_type", "?"), types, window if WINDOWED_LAYER in types else None)


def shared_prompt_problem(model) -> Optional[str]:
    """Why the shared-prompt mask cannot express this model's attention, or None."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa") or "sdpa"
    if impl not in MASKABLE_ATTENTION:
        return f"attention {impl!r} cannot take the shared-prompt mask"
    layout = attention_layout(model)
    unknown = [t for t in layout.layer_types if t not in (FULL_LAYER, WINDOWED_LAYER)]
    if unknown:
        return f"layer types {unknown} of {layout.model_type!r} are neither full nor sliding-window attention"
    if layout.per_layer_type and layout.model_type not in MASK_MAPPING_MODELS:
        return (f"{layout.model_type!r} mixes full and sliding-window layers and is not known to take one mask "
                f"per layer type (known: {', '.join(MASK_MAPPING_MODELS)})")
    return None


def uses_shared_prompt(model, wanted: str) -> bool:
    """Whether to run the shared-prompt forward: asked for, and the mask can express the model's attention."""
    if wanted != "shared_prompt":
        return False
    problem = shared_prompt_problem(model)
    if problem:
        log.warning("%s: using two sequences per pair (model.pair_forward=shared_prompt falls back)", problem)
        return False
    return True


def pair_attention_mask(prompt: int, chosen: int, rejected: int, width: int) -> torch.Tensor:
    """[width, width] boolean: causal, rejected blind to chosen, padding attending only to itself."""
    length = prompt + chosen + rejected
    idx = torch.arange(width)
    causal = idx[None, :] <= idx[:, None]
    q_rejected = (idx >= prompt + chosen) & (idx < length)
    k_chosen = (idx >= prompt) & (idx < prompt + chosen)
    real = idx < length
    allowed = causal & real[:, None] & real[None, :] & ~(q_rejected[:, None] & k_chosen[None, :])
    return allowed | torch.eye(width, dtype=torch.bool)


class SharedPairCollator:
    """B pairs as B sequences `[prompt, chosen, rejected]` (right-padded), with the pair mask,
    position ids, response masks and each part's boundaries. `attention_mask` ([B, L], 1 on real
    tokens) is for counting; the model gets `pair_mask`."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        parts = [(len(ex["prompt_ids"]), len(ex["chosen_ids"]), len(ex["rejected_ids"])) for ex in examples]
        width = max(p + c + r for p, c, r in parts)
        b = len(examples)
        ids = torch.full((b, width), self.pad_token_id, dtype=torch.long)
        real, pos = torch.zeros((b, width), dtype=torch.long), torch.zeros((b, width), dtype=torch.long)
        chosen_mask, rejected_mask = torch.zeros_like(real), torch.zeros_like(real)
        mask = torch.zeros((b, 1, width, width), dtype=torch.bool)
        for i, (ex, (p, c, r)) in enumerate(zip(examples, parts)):
            ids[i, :p + c + r] = torch.tensor(ex["prompt_ids"] + ex["chosen_ids"] + ex["rejected_ids"])
            real[i, :p + c + r] = 1
            pos[i, :p + c] = torch.arange(p + c)
            pos[i, p + c:p + c + r] = torch.arange(p, p + r)
            chosen_mask[i, p:p + c], rejected_mask[i, p + c:p + c + r] = 1, 1
            mask[i, 0] = pair_attention_mask(p, c, r, width)
        batch = {"input_ids": ids, "attention_mask": real, "position_ids": pos, "pair_mask": mask,
                 "chosen_mask": chosen_mask, "rejected_mask": rejected_mask,
                 "prompt_len": torch.tensor([p for p, _, _ in parts]),
                 "rejected_start": torch.tensor([p + c for p, c, _ in parts]),
                 "logical_tokens": torch.tensor(sum(2 * p + c + r for p, c, r in parts))}
        for col in FLOAT_COLUMNS:
            if all(col in ex for ex in examples):
                batch[col] = torch.tensor([ex[col] for ex in examples], dtype=torch.float32)
        batch["index"] = torch.tensor([ex.get("index", -1) for ex in examples], dtype=torch.long)
        return batch


def within_window(position_ids: torch.Tensor, window: int) -> torch.Tensor:
    """[B, 1, L, L]: the key lies fewer than `window` logical positions before the query (as
    transformers' sliding window: q - k < window), along the query's own sequence."""
    distance = position_ids[:, :, None] - position_ids[:, None, :]
    return (distance < window)[:, None]


def attention_input(model, allowed: torch.Tensor):
    """SDPA takes the boolean mask as it is; eager attention *adds* a 4-D mask to its scores, so it
    gets 0 where allowed and the dtype's minimum elsewhere (a boolean would add 1 and mask nothing)."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa") or "sdpa"
    if impl == "sdpa":
        return allowed
    dtype = next(model.parameters()).dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def model_mask(model, batch: dict):
    """The attention mask the model gets: the pair mask, windowed for windowed layers; one mask per
    layer type for models that mix them."""
    layout = attention_layout(model)
    allowed = batch["pair_mask"]
    masks = {FULL_LAYER: allowed}
    if layout.window:
        masks[WINDOWED_LAYER] = allowed & within_window(batch["position_ids"], layout.window)
    if not layout.per_layer_type:
        return attention_input(model, masks[layout.layer_types[0]])
    return {t: attention_input(model, masks[t]) for t in layout.layer_types}


def shared_forward(model, batch: dict):
    return model(input_ids=batch["input_ids"], attention_mask=model_mask(model, batch),
                 position_ids=batch["position_ids"])


def shared_pair_logprobs(model, batch: dict) -> tuple[SequenceLogProbs, SequenceLogProbs]:
    """Chosen and rejected response log-probs from one shared-prompt forward.

    Shifted log-probs are right for every token but the first rejected one, whose predecessor in
    its own stream is the prompt's last token, not the chosen's: that one is recomputed."""
    logits = shared_forward(model, batch).logits
    per_token = token_logprobs(logits, batch["input_ids"])  # [B, L-1]: entry t scores token t+1
    rows = torch.arange(logits.shape[0], device=logits.device)
    start = batch["rejected_start"]
    first = -F.cross_entropy(logits[rows, batch["prompt_len"] - 1].float(), batch["input_ids"][rows, start],
                             reduction="none")
    fix = F.one_hot(start - 1, per_token.shape[1]).bool()
    per_token = torch.where(fix, first[:, None], per_token)
    out = []
    for key in ("chosen_mask", "rejected_mask"):
        m = batch[key][:, 1:].to(per_token.dtype)
        out.append(SequenceLogProbs(summed=(per_token * m).sum(-1), n_tokens=m.sum(-1)))
    return out[0], out[1]


def shared_pair_rewards(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A reward model's scores of the chosen and the rejected response (each at its last token)."""
    scores = per_position_scores(model, input_ids=batch["input_ids"], attention_mask=model_mask(model, batch),
                                 position_ids=batch["position_ids"])  # [B, L]
    rows = torch.arange(scores.shape[0], device=scores.device)
    chosen_last = batch["rejected_start"] - 1
    rejected_last = batch["attention_mask"].sum(-1) - 1
    return scores[rows, chosen_last], scores[rows, rejected_last]


# --------------------------------------------------------------------------- either layout
def pair_collator(model, pad_token_id: int, wanted: str):
    """The collator for `model.pair_forward`: shared prompt where the attention allows it."""
    return SharedPairCollator(pad_token_id) if uses_shared_prompt(model, wanted) else PairCollator(pad_token_id)


def pair_response_logprobs(model, batch: dict) -> tuple[SequenceLogProbs, SequenceLogProbs]:
    """Chosen and rejected response log-probs of a batch from either collator."""
    if "pair_mask" in batch:
        return shared_pair_logprobs(model, batch)
    lp = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    (cs, rs), (cn, rn) = lp.summed.chunk(2), lp.n_tokens.chunk(2)
    return SequenceLogProbs(cs, cn), SequenceLogProbs(rs, rn)


def pair_rewards(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A reward model's chosen and rejected scores of a batch from either collator."""
    if "pair_mask" in batch:
        return shared_pair_rewards(model, batch)
    chosen, rejected = reward_scores(model, batch["input_ids"], batch["attention_mask"]).chunk(2)
    return chosen, rejected
