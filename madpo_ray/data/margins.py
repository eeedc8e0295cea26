"""Where scored pairs' margins fall, and what MADPO makes of them.

MADPO only differs from DPO where the weighting engages: c(|m|) > 1 amplifies the target margin
of pairs with |m| < tau, c < 1 damps it for |m| > tau, and pairs with m <= -tau are capped at
weight 1. If every margin lies well inside (-tau, tau), MADPO is its `madpo_amplify` ablation.
These diagnostics say which regime a run is in: the reward model's agreement with the labels
and (testbed) with the true margins, the share of pairs beyond +-tau, the weights, and how well
an ensemble's disagreement finds its errors; as numbers (the score stage's metrics, the eval
stage at the run's own weighting), tables and plots.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from madpo_ray.losses import DEFAULT_TAU, get_policy_loss, madpo_scale, madpo_weights
from madpo_ray.plotting import pyplot, save


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


def weighting_params(loss_cfg) -> dict:
    """c_max, lam, tau of the run's loss when it is a MADPO variant, else MADPO's defaults (so a
    DPO run still says what MADPO would have done with its margins)."""
    params = loss_cfg.resolved() if loss_cfg.name.startswith("madpo") else {}
    defaults = get_policy_loss("madpo").params
    return {k: float(params.get(k, defaults[k])) for k in ("c_max", "lam", "tau")}


def plot_margins(rows: list[dict], path: Path, c_max: float = 4.0, lam: float = 1.0, tau: float = DEFAULT_TAU,
                 title: Optional[str] = None) -> Path:
    """Two histograms: reward-model margins (and true margins on the testbed) with +-tau marked,
    and the MADPO weights they give."""
    import numpy as np

    plt = pyplot()

    m = torch.tensor([float(r["margin"]) for r in rows], dtype=torch.float64)
    w = madpo_weights(m, c_max, lam, tau)
    fig, (ax_m, ax_w) = plt.subplots(1, 2, figsize=(11, 4))
    true = [float(r["true_margin"]) for r in rows] if rows and "true_margin" in rows[0] else []
    bins = np.histogram_bin_edges(np.concatenate([m.numpy(), np.asarray(true), [-tau, tau]]), bins=60)
    ax_m.hist(m.numpy(), bins=bins, alpha=0.7, label="reward-model margin m")  # shared bins: widths compare
    if true:
        ax_m.hist(true, bins=bins, alpha=0.5, label="true margin")
    for x in (-tau, tau):
        ax_m.axvline(x, color="k", linestyle="--", linewidth=1)
    ax_m.set(xlabel="margin (chosen minus rejected)", ylabel="pairs",
             title=f"margins: {float((m.abs() > tau).double().mean()):.1%} beyond +-tau={tau:.2f}")
    ax_m.legend()
    ax_w.hist(w.numpy(), bins=50, color="tab:green")
    ax_w.axvline(1.0, color="k", linestyle="--", linewidth=1)
    ax_w.set(xlabel=f"MADPO weight w(m) (c_max={c_max:g}, lam={lam:g})", ylabel="pairs", title="weights")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save(fig, path, dpi=110)
    return path


def plot_calibration(calibration: dict, path: Path, title: Optional[str] = None) -> Path:
    """The ensemble's disagreement against its actual error (data.margins.uncertainty_calibration):
    per margin_std bin, the mean absolute error of the margin and the share of pairs it orders
    against the true margin. Rising lines: the disagreement knows where the margins are wrong."""
    plt = pyplot()
    x = [b["std_mean"] for b in calibration["bins"]]
    fig, (ax_e, ax_s) = plt.subplots(1, 2, figsize=(10, 4))
    ax_e.plot(x, [b["abs_error_mean"] for b in calibration["bins"]], marker="o")
    ax_e.set(xlabel="ensemble disagreement (margin std, bin mean)", ylabel="mean |m - a t|",
             title=f"error (Spearman {format_rho(calibration['spearman_std_vs_abs_error'])})")
    ax_s.plot(x, [b["sign_error_rate"] for b in calibration["bins"]], marker="o", color="tab:red")
    ax_s.set(xlabel="ensemble disagreement (margin std, bin mean)", ylabel="share ordered against the truth",
             title=f"sign errors (Spearman {format_rho(calibration['spearman_std_vs_sign_error'])})")
    fig.suptitle(title or f"ensemble calibration on {calibration['pairs']} validation pairs")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save(fig, path, dpi=110)
    return path


MARGIN_TABLE = (("pairs", "pairs", "d"), ("rm_accuracy_vs_labels", "RM agrees with label", ".3f"),
                ("rm_accuracy_vs_true_margin", "RM agrees with true margin", ".3f"),
                ("spearman_rm_vs_true", "Spearman(RM margin, true margin)", ".3f"),
                ("margin_std_mean", "ensemble margin std, mean", ".3f"),
                ("share_abs_margin_above_tau", "share |m| > tau", ".1%"),
                ("share_margin_below_minus_tau", "share m < -tau (capped)", ".1%"),
                ("true_share_abs_margin_above_tau", "share |true margin| > tau", ".1%"),
                ("margin_p05", "margin p5", ".2f"), ("margin_median", "margin median", ".2f"),
                ("margin_p95", "margin p95", ".2f"), ("share_amplified", "share amplified (c > 1)", ".1%"),
                ("share_damped", "share damped (c < 1)", ".1%"), ("weight_min", "weight min", ".3f"),
                ("weight_median", "weight median", ".3f"), ("weight_max", "weight max", ".3f"))


def margin_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """(splits, rows of [label, value per split]) of a `reward_margin_report`, for the terminal
    and summary.md alike; metrics a run does not have (no true margins) are left out."""
    splits = [s for s in ("train", "validation", "test") if s in report]
    rows = []
    for key, label, fmt in MARGIN_TABLE:
        if any(key in report[s] for s in splits):
            rows.append([label] + [format(report[s][key], fmt) if key in report[s] else "-" for s in splits])
    return splits, rows
