"""Stage 2: policy training with any registered preference loss, from scored pairs.

Reference log-probs and reward margins come from the scored parquet, so no reference or
reward model is held in memory; MADPO weights are computed from the stored margin inside
the loss, so c_max / tau / lam can change without re-scoring.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from madpo_ray.config import LossConfig
from madpo_ray.data.collate import PairCollator
from madpo_ray.losses import BetaDPOState, PolicyLossInputs, get_policy_loss
from madpo_ray.logprobs import sequence_logprobs
from madpo_ray.models import load_causal_lm, load_tokenizer
from madpo_ray.stages._worker import setup_worker, train_and_save

SCORED_COLUMNS = ("ref_logp_chosen", "ref_logp_rejected", "len_chosen", "len_rejected", "margin")


def all_gather_1d(local: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-sized 1-D tensors from every worker (identity without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts)


class PolicyStep:
    """Callable step holding the loss config and beta-DPO's synchronised state."""

    def __init__(self, loss: LossConfig, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.loss_cfg = loss
        self.loss_fn = get_policy_loss(loss.name)
        self.beta_state = BetaDPOState()
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.calls = 0

    def inputs(self, model, batch: dict) -> PolicyLossInputs:
        lp = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        chosen, rejected = lp.summed.chunk(2)
        return PolicyLossInputs(chosen, rejected, batch["ref_logp_chosen"], batch["ref_logp_rejected"],
                                chosen_lengths=batch["len_chosen"], rejected_lengths=batch["len_rejected"],
                                margins=batch.get("margin"))

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        x = self.inputs(model, batch)
        extra = {}
        if self.loss_cfg.name == "beta_dpo":
            # Same seed on every worker -> the same multinomial draw over the gathered batch.
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.calls)
            extra = {"state": self.beta_state, "gather": all_gather_1d, "rank": self.rank, "generator": gen}
        self.calls += 1
        out = self.loss_fn(x, **self.loss_cfg.kwargs(), **extra)
        if self.loss_cfg.name == "beta_dpo":
            # Normalise by the *global* kept count so DDP's gradient mean equals the kept-pair mean.
            kept_global = float(all_gather_1d(out.keep).sum())
            loss = (out.losses * out.keep).sum() * self.world_size / max(kept_global, 1.0)
        else:
            loss = out.losses.mean()
        h = x.implicit_margin().detach()
        return loss, {"reward_accuracy": float((h > 0).float().mean()), "implicit_margin": float(h.mean()),
                      **out.metrics}


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    cfg = setup_worker(config)
    ctx = ray.train.get_context()
    tokenizer = load_tokenizer(config["model_dir"])
    model = load_causal_lm(config["model_dir"], cfg.model.dtype)
    step = PolicyStep(cfg.policy.loss, cfg.policy.optim.seed, ctx.get_world_rank(), ctx.get_world_size())
    train_and_save(config, cfg, f"policy/{cfg.policy.loss.name}", model, tokenizer, PairCollator(tokenizer.pad_token_id),
                   step, cfg.policy.optim, extra_state={"beta_dpo": step.beta_state},
                   extra_metrics={"loss_name": cfg.policy.loss.name})


def check_scored_rows(rows: list[dict], source: str, need_margin: bool) -> None:
    """Refuse a scored file with missing columns or non-finite values, naming the rows."""
    import math

    from madpo_ray.data.preference import DataValidationError

    needed = [c for c in SCORED_COLUMNS if c != "margin" or need_margin]
    if rows:
        missing = [c for c in needed if c not in rows[0]]
        if missing:
            raise DataValidationError(f"{source}: missing column(s) {missing}; run `madpo score` first")
    bad: dict[str, list] = {}
    for i, r in enumerate(rows):
        for c in needed:
            try:
                ok = math.isfinite(float(r.get(c)))
            except (TypeError, ValueError):  # None, or not a number at all
                ok = False
            if not ok:
                bad.setdefault(c, []).append(r.get("row_id", i))
    if bad:
        detail = "; ".join(f"{c}: rows {ids[:10]}{'...' if len(ids) > 10 else ''} ({len(ids)} total)"
                           for c, ids in bad.items())
        raise DataValidationError(f"{source}: non-finite or missing values: {detail}")


def load_policy_examples(path: str | Path, loss_name: str) -> list[dict]:
    """Checked scored rows projected to what policy training reads (token ids + scored columns)."""
    rows = read_scored(path)
    check_scored_rows(rows, str(path), need_margin=loss_name.startswith("madpo"))
    cols = ("prompt_ids", "chosen_ids", "rejected_ids", "row_id") + SCORED_COLUMNS
    return [{k: r[k] for k in cols if k in r} for r in rows]  # margin is optional for the non-MADPO losses


def read_scored(path: str | Path, limit: Optional[int] = None) -> list[dict]:
    import pyarrow.parquet as pq

    from madpo_ray.data.preference import DataValidationError

    try:
        rows = pq.read_table(str(path)).to_pylist()
    except Exception as e:
        raise DataValidationError(f"{path}: cannot read scored parquet: {e}") from None
    rows.sort(key=lambda r: r.get("row_id", 0))
    return rows[:limit] if limit else rows
