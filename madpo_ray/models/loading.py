"""Loading a causal LM or a reward model (a one-label sequence classifier) by hub name or local
folder, and reading the reward model's score head."""

from __future__ import annotations

from typing import Optional

import torch

from madpo_ray.logprobs import position_ids_from_mask
from madpo_ray.models.folders import ModelLoadError, check_model_files


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def load_causal_lm(name_or_path: str, dtype: str = "float32"):
    """Any HF causal LM by hub name (needs a network) or local folder."""
    from transformers import AutoModelForCausalLM

    check_model_files(name_or_path)
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype(dtype))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load causal LM from {name_or_path!r}: {e}") from e


def saved_heads(name_or_path: str) -> int:
    """How many score heads a saved reward model has (an ensemble's K); 1 for a causal LM's folder."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path)
    classifier = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    return int(config.num_labels) if classifier else 1


def load_reward_model(name_or_path: str, dtype: str = "float32", pad_token_id: Optional[int] = None,
                      heads: Optional[int] = None):
    """An AutoModelForSequenceClassification with `heads` outputs (default: as saved, one from an
    LM folder, whose score head is then new). Several heads are a reward ensemble on one backbone:
    the scoring functions below then return one score per head ([B, K] instead of [B])."""
    from transformers import AutoModelForSequenceClassification

    check_model_files(name_or_path)
    try:
        labels = heads or saved_heads(name_or_path)
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=labels,
                                                                   dtype=torch_dtype(dtype))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load reward model from {name_or_path!r}: {e}") from e
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id  # the head scores the last non-pad token
    return model


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def score_head(model) -> torch.nn.Module:
    """The linear head of a sequence-classification model (`score` in Llama, Qwen, Mistral...;
    with LoRA, peft's wrapper around it)."""
    for name, module in model.named_modules():
        if name.split(".")[-1] == "score":
            return module
    raise ModelLoadError(f"{type(model).__name__} has no `score` head; not a reward model this project can read")


def per_position_scores(model, **inputs) -> torch.Tensor:
    """[B, L] head outputs at every position ([B, L, K] with K heads), before the model pools them
    at one token: what scoring several responses packed into one sequence needs."""
    captured: dict = {}
    handle = score_head(model).register_forward_hook(lambda module, args, out: captured.update(scores=out))
    try:
        model(**inputs)
    finally:
        handle.remove()
    return captured["scores"].squeeze(-1).float()


def mean_over_heads(scores: torch.Tensor) -> torch.Tensor:
    """One reward per sequence: a reward ensemble's [B, K] head scores averaged ([B] as they are).
    The heads are linear on the same features, so this is the reward of the heads' mean."""
    return scores.mean(-1) if scores.dim() == 2 else scores


def reward_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar reward per sequence ([B, K] with K heads), from the last real token's hidden state (right padding). The
    last token is found from the attention mask, so a tokenizer whose pad token is its EOS
    (SmolLM2, Qwen) still scores the response's final token."""
    scores = per_position_scores(model, input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids_from_mask(attention_mask))
    last = attention_mask.long().sum(-1) - 1
    return scores[torch.arange(scores.shape[0], device=scores.device), last]
