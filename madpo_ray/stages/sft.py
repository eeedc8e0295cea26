"""Stage 0: supervised fine-tuning on reference summaries (or chosen responses).
The result is both the reference policy pi_ref and the policy's starting point."""

from __future__ import annotations

from pathlib import Path

import torch

from madpo_ray.data.collate import SFTCollator
from madpo_ray.logprobs import position_ids_from_mask, token_logprobs
from madpo_ray.models import load_causal_lm, load_tokenizer
from madpo_ray.stages._worker import load_examples, setup_worker, write_json
from madpo_ray.stages.common import fit, save_model_atomically


def sft_step(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Token-mean negative log-likelihood of the response tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=position_ids_from_mask(batch["attention_mask"])).logits
    logp = token_logprobs(logits, batch["input_ids"])
    mask = batch["response_mask"][:, 1:].to(logp.dtype)
    loss = -(logp * mask).sum() / mask.sum().clamp_min(1)
    return loss, {}


def train_loop_per_worker(config: dict) -> None:
    cfg = setup_worker(config)
    tokenizer = load_tokenizer(config["model_dir"])
    model = load_causal_lm(config["model_dir"], cfg.model.dtype)
    result = fit(model, load_examples(config["examples_path"]), SFTCollator(tokenizer.pad_token_id), sft_step,
                 cfg.sft.optim, stage="sft", fail_at_step=config.get("fail_at_step"),
                 marker_dir=config.get("marker_dir"), checkpoint_root=config.get("checkpoint_root"))
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        save_model_atomically(result.model, tokenizer, Path(config["out_dir"]),
                              meta={"stage": "sft", "prompt_template": cfg.data.prompt_template})
        write_json(Path(config["metrics_path"]), {"steps": result.steps, "loss_history": result.loss_history, **result.metrics})
