"""Stage 2: policy training with any registered preference loss, from scored pairs.

`train_policy` is the one way a policy is trained: the pipeline's Ray Train workers, Ray Tune
trials and `madpo compare`'s tasks all launch it (launcher.py), each with its own session. Reference log-probs and
reward margins come from the scored parquet, so no reference or reward model is held in
memory; MADPO weights are computed from the stored margin inside the loss.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from madpo_ray.config import LossConfig, PipelineConfig
from madpo_ray.data.scored import perturb_margins
from madpo_ray.engine.collectives import all_gather_1d
from madpo_ray.engine.loop import FitResult, fit
from madpo_ray.losses import DataParallel, PolicyLossInputs, StepShare, get_policy_loss
from madpo_ray.models import load_causal_lm, load_tokenizer, prepare_for_training
from madpo_ray.pair_forward import pair_collator, pair_response_logprobs
from madpo_ray.stages.outputs import StageOutput, save_stage_outputs


def step_order(gathered: torch.Tensor, micro_batches: int, world_size: int) -> torch.Tensor:
    """All-gathered per-pair values of one step, [world][micro-batch][pair] as all_gather
    concatenates them, in step order: micro-batch-major, then rank (see `step_positions`)."""
    return gathered.view(world_size, micro_batches, -1).transpose(0, 1).reshape(-1)


def step_positions(micro: int, rank: int, world_size: int, size: int) -> torch.Tensor:
    """Where micro-batch `micro` of worker `rank` sits in its step's pair order. The order is the
    one in which LengthGroupedSampler cuts a step's examples (slice micro * world + rank), so a
    step's pairs come in the same order for any workers x accumulation with the same effective
    batch, and a random draw over them is the same draw."""
    start = (micro * world_size + rank) * size
    return torch.arange(start, start + size)


class PolicyStep:
    """One micro-batch: policy log-probs, the registered loss with its declared inputs, and the
    loss's own reduction. Holds the loss's training state (e.g. beta-DPO's moving averages) and,
    for a loss with a step plan, the current optimiser step's plan."""

    def __init__(self, loss: LossConfig, seed: int = 0, dp: DataParallel = DataParallel(gather=all_gather_1d)):
        self.loss = get_policy_loss(loss.name)
        self.params = loss.kwargs()
        self.state = self.loss.make_state() if self.loss.make_state else None
        self.seed, self.dp, self.calls = seed, dp, 0
        self.shares: list[StepShare] = []  # this step's plan, one share per micro-batch still to train

    def extra_state(self) -> dict:
        """What checkpoints must keep besides model and optimiser."""
        return {"loss_state": self.state} if self.state is not None else {}

    def generator(self) -> torch.Generator:
        """Every worker seeds the same generator, so a random draw over the gathered step is the
        same draw on every worker; seeded from the loss's own step count (checkpointed), so a
        resumed run draws as an uninterrupted one."""
        count = getattr(self.state, "steps", self.calls)
        return torch.Generator().manual_seed(self.seed * 1_000_003 + count)

    def runtime_args(self) -> dict:
        """The runtime inputs the loss declares."""
        available = {"state": lambda: self.state, "dp": lambda: self.dp, "generator": self.generator,
                     "share": lambda: self.shares.pop(0) if self.shares else None}
        return {k: make() for k, make in available.items() if k in self.loss.runtime}

    def begin_step(self, model, batches: list[dict]) -> None:
        """For a loss with a step plan (beta-DPO): its statistics, filter and beta over the whole
        optimiser step. A no-grad forward over the step's micro-batches (the loop runs it on a
        forked RNG, so dropout matches the gradient passes) gives h per pair; h is all-gathered
        from every worker into step order; the plan updates the loss state once and draws once;
        each micro-batch then trains with its share. The extra forward costs about a third more
        compute per step (one forward beside forward and backward), for these losses only."""
        if self.loss.plan_step is None:
            return
        local = [self.inputs(model, b).implicit_margin().float() for b in batches]
        size = local[0].numel()
        if any(h.numel() != size for h in local):
            raise ValueError(f"micro-batches of one step differ in size: {[h.numel() for h in local]}")
        world, n = self.dp.world_size, len(batches)
        margins = step_order(self.dp.gather(torch.cat(local)), n, world)
        plan = self.loss.plan(margins.cpu(), self.state, generator=self.generator(), **self.params)
        self.shares = [plan.share(step_positions(m, self.dp.rank, world, size), n) for m in range(n)]

    def inputs(self, model, batch: dict) -> PolicyLossInputs:
        chosen_lp, rejected_lp = pair_response_logprobs(model, batch)
        chosen, rejected = chosen_lp.summed, rejected_lp.summed
        return PolicyLossInputs(chosen, rejected, batch["ref_logp_chosen"], batch["ref_logp_rejected"],
                                chosen_lengths=batch["len_chosen"], rejected_lengths=batch["len_rejected"],
                                margins=batch.get("margin"), margin_stds=batch.get("margin_std"))

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        """Without `begin_step` first, a loss with a step plan plans over this batch alone."""
        x = self.inputs(model, batch)
        out = self.loss(x, **self.params, **self.runtime_args())
        self.calls += 1
        loss = self.loss.reduce(out, self.dp)
        return loss, {**batch_statistics(x), **out.metrics}


def batch_statistics(x: PolicyLossInputs) -> dict[str, float]:
    """What the curves show of a batch besides the loss's own metrics: the implicit rewards
    (log-ratios against the reference, before any beta) and, where there are margins, theirs."""
    h = x.implicit_margin().detach()
    stats = {"reward_accuracy": float((h > 0).float().mean()), "implicit_margin": float(h.mean()),
             "logratio_chosen": float((x.policy_chosen_logps - x.ref_chosen_logps).detach().mean()),
             "logratio_rejected": float((x.policy_rejected_logps - x.ref_rejected_logps).detach().mean())}
    if x.margins is not None:
        stats.update(margin_mean=float(x.margins.float().mean()), margin_abs_mean=float(x.margins.float().abs().mean()))
    return stats


def train_policy(cfg: PipelineConfig, session, *, model_dir: str, out: Optional[StageOutput] = None,
                 eval_fn: Optional[Callable] = None, label: Optional[str] = None) -> FitResult:
    """Train a policy from `model_dir` (the SFT model) on the session's "train" examples (scored
    pairs) with cfg.policy: the model is loaded in cfg.model.dtype, the loss built from the
    registry, and (with `out`) rank 0 saves the model and metrics."""
    tokenizer = load_tokenizer(model_dir)
    torch.manual_seed(cfg.policy.optim.seed)  # LoRA's initial adapters come from the seed

    def build():
        return prepare_for_training(load_causal_lm(model_dir, cfg.model.dtype), cfg.model)

    model = build()
    info = session.info
    step = PolicyStep(cfg.policy.loss, cfg.policy.optim.seed, DataParallel(info.rank, info.world_size, all_gather_1d))
    collate = pair_collator(model, tokenizer.pad_token_id, cfg.model.pair_forward)
    examples = perturb_margins(session.examples("train"), cfg.policy.margin_noise, cfg.policy.optim.seed)
    result = fit(model, examples, collate, step, cfg.policy.optim,
                 stage=label or f"policy/{cfg.policy.loss.name}", session=session, extra_state=step.extra_state(),
                 eval_fn=eval_fn)
    save_stage_outputs(result, tokenizer, out, cfg, "policy", info.rank, {"loss_name": cfg.policy.loss.name},
                       rebuild=build)
    return result
