"""Statistics of scored pairs' margins: the reward model's agreement with the labels and (testbed)
with the true margins, the margin distribution, and what MADPO's weighting makes of it. Computed
by the score stage for its metrics and by the run summary at the run's own weighting parameters
(the plots and tables are eval/margins.py's)."""

from __future__ import annotations

import math
from typing import Optional

import torch

from madpo_ray.losses import DEFAULT_TAU, madpo_scale, madpo_weights


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks with ties sharing their mean rank (what Spearman's rho needs)."""
    x = x.double()
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    ranks = torch.empty_like(x)
    start = 0
    n = len(x)
    while start < n:
        end = start
        while end + 1 < n and sorted_x[end + 1] == sorted_x[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def spearman(x, y) -> float:
    """Spearman's rank correlation: Pearson's correlation of the average ranks."""
    rx, ry = average_ranks(torch.as_tensor(x)), average_ranks(torch.as_tensor(y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float((rx.norm() * ry.norm()))
    return float((rx * ry).sum()) / denom if denom > 0 else float("nan")


def quantiles(values: torch.Tensor, prefix: str) -> dict:
    q = torch.quantile(values.double(), torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
    return {f"{prefix}_min": float(values.min()), f"{prefix}_p05": float(q[0]), f"{prefix}_median": float(q[1]),
            f"{prefix}_p95": float(q[2]), f"{prefix}_max": float(values.max())}


def margin_diagnostics(rows: list[dict], c_max: float = 4.0, lam: float = 1.0, tau: float = DEFAULT_TAU) -> dict:
    """Reward-model agreement, margin distribution and MADPO weight distribution of scored rows."""
    if not rows:
        return {"pairs": 0}
    m = torch.tensor([float(r["margin"]) for r in rows], dtype=torch.float64)
    out = {"pairs": len(rows), "rm_accuracy_vs_labels": float((m > 0).double().mean()),
           "share_abs_margin_above_tau": float((m.abs() > tau).double().mean()),
           "share_margin_below_minus_tau": float((m < -tau).double().mean()),
           "share_margin_above_tau": float((m > tau).double().mean()), **quantiles(m, "margin")}
    if "true_margin" in rows[0]:
        t = torch.tensor([float(r["true_margin"]) for r in rows], dtype=torch.float64)
        out.update(rm_accuracy_vs_true_margin=float(((m > 0) == (t > 0)).double().mean()),
                   spearman_rm_vs_true=spearman(m, t),
                   true_share_abs_margin_above_tau=float((t.abs() > tau).double().mean()))
    stds = [float(r["margin_std"]) for r in rows if r.get("margin_std") is not None]
    if stds:  # a reward ensemble (or a dataset's own margin_std): how uncertain the margins are
        out.update(margin_std_mean=sum(stds) / len(stds), pairs_with_margin_std=len(stds))
    c = madpo_scale(m.abs(), c_max, lam, tau)
    w = madpo_weights(m, c_max, lam, tau)
    out.update(share_amplified=float(((c > 1) & (m > -tau)).double().mean()),
               share_damped=float(((c < 1) & (m > -tau)).double().mean()),
               share_capped=float((m <= -tau).double().mean()), **quantiles(w, "weight"),
               weight_mean=float(w.mean()))
    return out


def spearman_or_none(x, y) -> Optional[float]:
    """Spearman's rho, or None where there is nothing to rank (a constant side): JSON has no NaN."""
    value = spearman(x, y)
    return None if math.isnan(value) else value


def format_rho(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def uncertainty_calibration(rows: list[dict], bins: int = 5) -> dict:
    """Does an ensemble's disagreement (margin_std) say where its margin is wrong? Against the
    testbed's true margins: the reward margin's error is m - a t, with a the least-squares scale
    from true margins to reward margins (the reward model's units are its own); a sign error is a
    pair the ensemble orders against the truth. Pairs are binned by margin_std quantile; in a
    calibrated ensemble the error and the sign-error rate grow with the bin. Only pairs with both
    columns count ("pairs"); empty when none has them. A correlation with nothing to rank (no
    sign error at all) is None, not NaN."""
    rows = [r for r in rows if r.get("margin_std") is not None and r.get("true_margin") is not None]
    if not rows:
        return {}
    m = torch.tensor([float(r["margin"]) for r in rows], dtype=torch.float64)
    s = torch.tensor([float(r["margin_std"]) for r in rows], dtype=torch.float64)
    t = torch.tensor([float(r["true_margin"]) for r in rows], dtype=torch.float64)
    scale = float((m * t).sum() / (t * t).sum().clamp_min(1e-12))
    error = (m - scale * t).abs()
    wrong = ((m > 0) != (t > 0)).double()
    order = torch.argsort(s, stable=True)
    table = []
    for part in torch.tensor_split(order, min(bins, len(rows))):
        table.append({"pairs": len(part), "std_mean": float(s[part].mean()), "abs_error_mean": float(error[part].mean()),
                      "sign_error_rate": float(wrong[part].mean())})
    return {"pairs": len(rows), "scale_true_to_rm": scale, "std_mean": float(s.mean()),
            "spearman_std_vs_abs_error": spearman_or_none(s, error),
            "spearman_std_vs_sign_error": spearman_or_none(s, wrong), "bins": table}
