"""The scored-pairs contract: what the scoring pass adds to each tokenised pair, what policy
training reads of it, and the checks a scored file must pass before any training starts.

Scored parquet: the pair's columns (prompt, chosen, rejected, token ids, row_id, testbed gold
scores) plus SCORED_COLUMNS. MADPO's weights are computed from `margin` inside the loss, so
Tune can change c_max/tau/lam without re-scoring.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from madpo_ray.data.preference import DataValidationError
from madpo_ray.layout import RunLayout

SCORED_COLUMNS = ("ref_logp_chosen", "ref_logp_rejected", "ref_logp_mean_chosen", "ref_logp_mean_rejected",
                  "len_chosen", "len_rejected", "reward_chosen", "reward_rejected", "margin")
# What policy training reads: token ids, the row's id, reference log-probs, lengths and margin.
POLICY_VALUE_COLUMNS = ("ref_logp_chosen", "ref_logp_rejected", "len_chosen", "len_rejected", "margin")
# A margin's uncertainty (an ensemble's spread, or a dataset's own column): read by madpo_expected.
OPTIONAL_POLICY_COLUMNS = ("margin_std",)
POLICY_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "row_id") + POLICY_VALUE_COLUMNS + OPTIONAL_POLICY_COLUMNS


def read_scored(path: str | Path, limit: Optional[int] = None) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(str(path)).to_pylist()
    except Exception as e:
        raise DataValidationError(f"{path}: cannot read scored parquet: {e}") from None
    rows.sort(key=lambda r: r.get("row_id", 0))
    return rows[:limit] if limit else rows


def check_scored_rows(rows: list[dict], source: str, need_margin: bool, need_margin_std: bool = False) -> None:
    """Refuse a scored file with missing columns or non-finite values, naming the rows."""
    needed = [c for c in POLICY_VALUE_COLUMNS if c != "margin" or need_margin] + (["margin_std"] if need_margin_std else [])
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
    """Checked scored rows projected to what policy training reads, in row_id order."""
    from madpo_ray.losses import get_policy_loss

    rows = read_scored(path)
    loss = get_policy_loss(loss_name)
    check_scored_rows(rows, str(path), need_margin=loss.needs_margins, need_margin_std=loss.needs_margin_stds)
    return [{k: r[k] for k in POLICY_COLUMNS if k in r} for r in rows]  # margin is optional for non-MADPO losses


def perturb_margins(examples: list[dict], sd: float, seed: int) -> list[dict]:
    """Add N(0, sd^2) to every example's reward-model margin (in place; a simulated reward-model
    error). The draw depends on (seed, the examples' order) only, so two losses trained with the
    same seed see the same noisy margins. A margin that carries its uncertainty (margin_std, an
    ensemble's spread) has it widened by the noise it was given, sqrt(std^2 + sd^2): the noise is
    known, and an uncertainty-aware loss is told it (plain MADPO never reads it)."""
    if sd <= 0:
        return examples
    import torch

    g = torch.Generator().manual_seed(1_000_003 * seed + 17)
    noise = torch.randn(len(examples), generator=g, dtype=torch.float64) * sd
    for ex, e in zip(examples, noise.tolist()):
        ex["margin"] = float(ex["margin"]) + e
        if ex.get("margin_std") is not None:
            ex["margin_std"] = math.hypot(float(ex["margin_std"]), sd)
    return examples


def scored_split(layout: RunLayout, split: str) -> Path:
    """The scored pairs of a held-out split, or a clear error when there are none. Every run has
    validation and test splits (a dataset's own, or held out of train), so this means none of the
    split's pairs survived tokenising."""
    path = layout.scored_path(split)
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: no {split} pair was scored (all skipped when tokenised? see the "
                                "score stage's metrics.json); a report never falls back to another split")
    return path
