"""Stage 1: a scalar reward model trained with the Bradley-Terry loss on the preference pairs,
scored from the last real token through a linear head (AutoModelForSequenceClassification),
or (reward.ensemble: K) K such heads on one backbone, each on its own bootstrap resample.
A "validation" split, where the session has one, drives early stopping on its held-out loss
(an ensemble's: the heads' mean loss, and the accuracy of their mean margin)."""

from __future__ import annotations

import logging
import math
from typing import Callable, Optional

import torch

from madpo_ray.engine.batching import example_length
from madpo_ray.engine.collectives import global_sum
from madpo_ray.engine.loop import FitResult, fit
from madpo_ray.engine.sessions import WorkerInfo
from madpo_ray.losses import bradley_terry_loss
from madpo_ray.models import load_reward_model, load_tokenizer, prepare_for_training
from madpo_ray.pair_forward import pair_collator, pair_rewards
from madpo_ray.stages.outputs import StageOutput, save_stage_outputs

log = logging.getLogger("madpo_ray.train")


def reward_step(model, batch: dict) -> tuple[torch.Tensor, dict]:
    chosen, rejected = pair_rewards(model, batch)
    loss = bradley_terry_loss(chosen, rejected).mean()
    return loss, {"accuracy": float((chosen > rejected).float().mean()),
                  "margin_mean": float((chosen - rejected).detach().mean())}


def bootstrap_weights(examples: int, heads: int, seed: int) -> torch.Tensor:
    """[examples, heads] Poisson(1) counts: how often each head sees each pair in its resample
    (the online bootstrap). A pure function of the seed, so a resumed training draws the same."""
    g = torch.Generator().manual_seed(7919 * seed + heads)
    return torch.poisson(torch.ones(examples, heads, dtype=torch.float64), generator=g).float()


class EnsembleStep:
    """The step of K score heads on one backbone: each head's Bradley-Terry loss on its own
    bootstrap resample (pair i counts w[i, k] times for head k; E[w] = 1, so the mean loss has the
    plain model's scale), averaged over heads. The heads differ by their resamples and initial
    weights; their spread over a pair's margin is the ensemble's uncertainty about it."""

    def __init__(self, weights: torch.Tensor):
        self.weights = weights

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        chosen, rejected = pair_rewards(model, batch)  # [B, K]
        if self.weights.device != chosen.device:  # once: no host round trip per micro-batch
            self.weights = self.weights.to(chosen.device)
        w = self.weights[batch["index"].to(chosen.device)]
        loss = (w * bradley_terry_loss(chosen, rejected)).mean()
        margins = (chosen - rejected).detach()
        return loss, {"accuracy": float((margins.mean(-1) > 0).float().mean()), "margin_mean": float(margins.mean()),
                      "head_disagreement": float(margins.std(-1).mean())}


def per_pair(values: torch.Tensor) -> torch.Tensor:
    """One value per pair: an ensemble's [B, K] averaged over its heads."""
    return values.mean(-1) if values.dim() == 2 else values


def reward_validator(examples: list[dict], collate, batch_size: int, info: WorkerInfo) -> Callable:
    """Bradley-Terry loss and accuracy of the reward model on the held-out pairs: what early
    stopping watches (`fit` calls it in eval mode, under no_grad).

    Each worker scores its share of the pairs (every world_size-th) and the sums are added over
    workers, so N workers score the split once, not N times each; a share is batched by length, as
    training is, so little of it is padding. Every worker runs the same number of forwards (a
    sharded model gathers its weights in each one): a worker with a batch fewer scores one more
    that it does not count."""
    share = sorted(examples[info.rank::info.world_size], key=example_length)
    batches = [share[start:start + batch_size] for start in range(0, len(share), batch_size)]
    rounds = math.ceil(math.ceil(len(examples) / info.world_size) / batch_size)
    uncounted = [examples[:batch_size]] * (rounds - len(batches))

    def scores(model, pairs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        return pair_rewards(model, {k: v.to(info.device) for k, v in collate(pairs).items()})

    def evaluate(model) -> dict:
        totals = torch.zeros(3, dtype=torch.float64, device=info.device)  # loss sum, correct, pairs
        for pairs in batches:
            chosen, rejected = scores(model, pairs)
            totals[0] += per_pair(bradley_terry_loss(chosen.float(), rejected.float())).sum().double()
            totals[1] += (per_pair(chosen - rejected) > 0).sum().double()
            totals[2] += len(pairs)
        for pairs in uncounted:
            scores(model, pairs)
        loss_sum, correct, count = global_sum(totals).tolist()
        return {"eval_loss": loss_sum / count, "eval_accuracy": correct / count}

    return evaluate


def train_reward(cfg, session, *, model_dir: str, out: Optional[StageOutput] = None) -> FitResult:
    """The reward model from `model_dir` (the SFT model) on the session's "train" pairs; with a
    "validation" split and reward.optim.eval_every, early stopping on its held-out loss keeps
    the best evaluation's weights (the reference recipe: every 20 updates, patience 3)."""
    tokenizer = load_tokenizer(model_dir)
    torch.manual_seed(cfg.reward.optim.seed)  # the new score head (and any LoRA) is initialised from the seed

    heads = cfg.reward.ensemble or 1

    def build():
        model = load_reward_model(model_dir, cfg.model.dtype, pad_token_id=tokenizer.pad_token_id, heads=heads)
        return prepare_for_training(model, cfg.model, task="reward")

    model = build()
    collate = pair_collator(model, tokenizer.pad_token_id, cfg.model.pair_forward)
    validation = session.optional_examples("validation")
    validate = None
    if validation:
        validate = reward_validator(validation, collate, cfg.reward.optim.per_device_batch_size, session.info)
        if cfg.reward.optim.eval_every is None and session.info.rank == 0:
            log.warning("[reward] a validation split is given but reward.optim.eval_every is not set: "
                        "no held-out evaluation, no early stopping")
    examples = session.examples("train")
    step = reward_step if heads == 1 else EnsembleStep(bootstrap_weights(len(examples), heads, cfg.reward.optim.seed))
    result = fit(model, examples, collate, step, cfg.reward.optim, stage="reward", session=session, validate=validate)
    save_stage_outputs(result, tokenizer, out, cfg, "reward", session.info.rank, rebuild=build)
    return result
