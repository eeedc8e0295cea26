"""Stage 0: supervised fine-tuning on reference summaries (or chosen responses).
The result is both the reference policy pi_ref and the policy's starting point."""

from __future__ import annotations

from typing import Optional

import torch

from madpo_ray.data.collate import SFTCollator
from madpo_ray.engine.loop import FitResult, fit
from madpo_ray.logprobs import position_ids_from_mask, token_logprobs
from madpo_ray.models import load_causal_lm, load_tokenizer, prepare_for_training
from madpo_ray.stages.outputs import StageOutput, save_stage_outputs


def sft_step(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Token-mean negative log-likelihood of the response tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=position_ids_from_mask(batch["attention_mask"])).logits
    logp = token_logprobs(logits, batch["input_ids"])
    mask = batch["response_mask"][:, 1:].to(logp.dtype)
    loss = -(logp * mask).sum() / mask.sum().clamp_min(1)
    return loss, {}


def train_sft(cfg, session, *, model_dir: str, out: Optional[StageOutput] = None) -> FitResult:
    """SFT from `model_dir` on the session's "train" examples (prompt/response token ids)."""
    tokenizer = load_tokenizer(model_dir)
    torch.manual_seed(cfg.sft.optim.seed)  # LoRA's initial adapters come from the seed

    def build():
        return prepare_for_training(load_causal_lm(model_dir, cfg.model.dtype), cfg.model)

    result = fit(build(), session.examples("train"), SFTCollator(tokenizer.pad_token_id), sft_step, cfg.sft.optim,
                 stage="sft", session=session)
    save_stage_outputs(result, tokenizer, out, cfg, "sft", session.info.rank, rebuild=build)
    return result
