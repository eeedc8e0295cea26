"""Stage 1: a scalar reward model trained with the Bradley-Terry loss on the preference pairs,
scored from the last real token through a linear head (AutoModelForSequenceClassification)."""

from __future__ import annotations

from pathlib import Path

import torch

from madpo_ray.data.collate import PairCollator
from madpo_ray.losses import bradley_terry_loss
from madpo_ray.models import load_reward_model, load_tokenizer, reward_scores
from madpo_ray.stages._worker import load_examples, setup_worker, write_json
from madpo_ray.stages.common import fit, save_model_atomically


def reward_step(model, batch: dict) -> tuple[torch.Tensor, dict]:
    rewards = reward_scores(model, batch["input_ids"], batch["attention_mask"])
    chosen, rejected = rewards.chunk(2)
    loss = bradley_terry_loss(chosen, rejected).mean()
    return loss, {"accuracy": float((chosen > rejected).float().mean()),
                  "margin_mean": float((chosen - rejected).mean())}


def train_loop_per_worker(config: dict) -> None:
    cfg = setup_worker(config)
    tokenizer = load_tokenizer(config["model_dir"])
    model = load_reward_model(config["model_dir"], cfg.model.dtype, pad_token_id=tokenizer.pad_token_id)
    result = fit(model, load_examples(config["examples_path"]), PairCollator(tokenizer.pad_token_id), reward_step,
                 cfg.reward.optim, stage="reward", fail_at_step=config.get("fail_at_step"),
                 marker_dir=config.get("marker_dir"), checkpoint_root=config.get("checkpoint_root"))
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        save_model_atomically(result.model, tokenizer, Path(config["out_dir"]),
                              meta={"stage": "reward", "prompt_template": cfg.data.prompt_template})
        write_json(Path(config["metrics_path"]), {"steps": result.steps, "loss_history": result.loss_history, **result.metrics})
