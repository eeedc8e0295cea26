"""Stage 1: a scalar reward model trained with the Bradley-Terry loss on the preference pairs,
scored from the last real token through a linear head (AutoModelForSequenceClassification)."""

from __future__ import annotations

from typing import Optional

import torch

from madpo_ray.engine.loop import FitResult, fit
from madpo_ray.losses import bradley_terry_loss
from madpo_ray.models import load_reward_model, load_tokenizer, prepare_for_training
from madpo_ray.pair_forward import pair_collator, pair_rewards
from madpo_ray.stages.worker import StageOutput, save_stage_outputs


def reward_step(model, batch: dict) -> tuple[torch.Tensor, dict]:
    chosen, rejected = pair_rewards(model, batch)
    loss = bradley_terry_loss(chosen, rejected).mean()
    return loss, {"accuracy": float((chosen > rejected).float().mean()),
                  "margin_mean": float((chosen - rejected).mean())}


def train_reward(cfg, session, *, model_dir: str, out: Optional[StageOutput] = None) -> FitResult:
    """The reward model from `model_dir` (the SFT model) on the session's "train" pairs."""
    tokenizer = load_tokenizer(model_dir)
    torch.manual_seed(cfg.reward.optim.seed)  # the new score head (and any LoRA) is initialised from the seed
    model = load_reward_model(model_dir, cfg.model.dtype, pad_token_id=tokenizer.pad_token_id)
    model = prepare_for_training(model, cfg.model, task="reward")
    result = fit(model, session.examples("train"), pair_collator(model, tokenizer.pad_token_id, cfg.model.pair_forward),
                 reward_step,
                 cfg.reward.optim, stage="reward", session=session)
    save_stage_outputs(result, tokenizer, out, cfg, "reward", session.info.rank)
    return result
