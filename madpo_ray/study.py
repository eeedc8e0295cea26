"""`madpo study rm-noise`: how MADPO's gain over DPO holds up as the reward model gets worse,
and (with a reward ensemble, reward.ensemble) whether weighting by the margins' uncertainty
(madpo_expected) holds it up better.

The paper claims MADPO is robust to reward-model error: a wrong margin moves a pair's target by
O(|error|) and the weight stays in (0, 2). The study adds Gaussian noise of several standard
deviations to the scored margins (`policy.margin_noise`, seeded per training seed), trains MADPO
from each noisy copy and DPO once (DPO never reads margins, so every noise level would train the
same DPO model), and judges them all on the validation prompts like `madpo compare` (with
compare.final, on the sealed test split in final/):

    runs/<name>/study/rm-noise/
      madpo_noise<sd>/seed<k>/, dpo/seed<k>/    trainings (reused while their settings match)
      table.md, results.json                    the comparison's tables, then the noise table
      noise.png                                 gold reward vs noise sd, DPO as a band
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from madpo_ray.compare import Comparison
from madpo_ray.config import MethodConfig, PipelineConfig
from madpo_ray.eval.judge import bootstrap_mean
from madpo_ray.io import write_json
from madpo_ray.pipeline import Pipeline
from madpo_ray.plotting import pyplot, save

log = logging.getLogger("madpo_ray.study")

BASELINE = "dpo"
UNCERTAIN = "madpo_expected"  # MADPO with each weight averaged over its margin's uncertainty


def noise_label(sd: float, loss: str = "madpo") -> str:
    return f"{loss}_noise{sd:g}"


def noise_methods(noise_levels: Sequence[float], base_overrides: dict,
                  losses: Sequence[str] = ("madpo",)) -> list[MethodConfig]:
    """DPO once, then each margin-reading loss at every noise level (keeping the run's overrides
    of that loss)."""
    if not noise_levels or any(sd < 0 for sd in noise_levels) or len(set(noise_levels)) != len(noise_levels):
        raise ValueError(f"noise levels must be distinct and >= 0, got {list(noise_levels)}")
    return [MethodConfig(loss=BASELINE)] + [
        MethodConfig(loss=loss, label=noise_label(sd, loss), overrides={**base_overrides.get(loss, {}), "margin_noise": sd})
        for loss in losses for sd in noise_levels]


def study_config(cfg: PipelineConfig, noise_levels: Sequence[float]) -> PipelineConfig:
    """The run's config with the study's methods as the comparison (no ablations, tiers or tuning).
    With a reward ensemble (reward.ensemble) the uncertainty-aware variant joins MADPO at every
    noise level; its margin_std grows with the noise it is given (data.scored.perturb_margins)."""
    losses = ("madpo", UNCERTAIN) if cfg.reward.ensemble else ("madpo",)
    overrides: dict[str, dict] = {}
    for m in cfg.compare.methods:  # the first method of each loss, as before the variant joined
        if m.loss in losses:
            overrides.setdefault(m.loss, m.overrides)
    methods = [m.model_dump() for m in noise_methods(noise_levels, overrides, losses)]
    return cfg.derive({"compare.methods": methods, "compare.ablations": False, "compare.tiers": None})


def noise_table(rows: list[dict], column: str, prompt_ids: list[str], noise_levels: Sequence[float],
                temperatures: Sequence[float], n_boot: int) -> list[dict]:
    """Per noise level and temperature: MADPO's and DPO's mean (95% CI over seeds and prompts) and
    their paired difference (eval.stats: seeds and prompts as sources of variance)."""
    from madpo_ray.eval.report import paired_difference, prompt_means, seed_matrix

    means = prompt_means(rows, column, prompt_ids)
    variant = any(r["method"] == noise_label(noise_levels[0], UNCERTAIN) for r in rows)

    def difference(a: str, b: str, t: float) -> dict:
        return {k: v for k, v in paired_difference(means, a, b, t).items() if k != "per_seed"}

    out = []
    for sd in noise_levels:
        for t in temperatures:
            row = {"noise_sd": sd, "temperature": t,
                   "madpo": bootstrap_mean(seed_matrix(means, noise_label(sd), t), n_boot).to_dict(),
                   "dpo": bootstrap_mean(seed_matrix(means, BASELINE, t), n_boot).to_dict(),
                   "madpo_minus_dpo": difference(noise_label(sd), BASELINE, t)}
            if variant:
                label = noise_label(sd, UNCERTAIN)
                row.update({UNCERTAIN: bootstrap_mean(seed_matrix(means, label, t), n_boot).to_dict(),
                            f"{UNCERTAIN}_minus_dpo": difference(label, BASELINE, t),
                            f"{UNCERTAIN}_minus_madpo": difference(label, noise_label(sd), t)})
            out.append(row)
    return out


def render_noise_table(table: list[dict], column: str) -> list[str]:
    keys = ["madpo", "dpo", "madpo_minus_dpo"]
    heads = ["MADPO", "DPO", "MADPO - DPO"]
    if table and UNCERTAIN in table[0]:
        keys += [UNCERTAIN, f"{UNCERTAIN}_minus_dpo", f"{UNCERTAIN}_minus_madpo"]
        heads += ["MADPO-expected", "MADPO-expected - DPO", "MADPO-expected - MADPO"]
    lines = [f"## MADPO under reward-model noise ({column}; 95% CIs over seeds and prompts)", "",
             "DPO does not read margins: one DPO training serves every noise level."
             + (" MADPO-expected (madpo_expected) averages each weight over the margin's uncertainty: the reward "
                "ensemble's spread, widened by the noise added." if len(keys) > 3 else ""), "",
             "| noise sd | T | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(heads)]
    for r in table:
        cells = [f"{r[k]['mean']:.3f} [{r[k]['ci_low']:.3f}, {r[k]['ci_high']:.3f}]" for k in keys]
        lines.append(f"| {r['noise_sd']:g} | {r['temperature']:g} | " + " | ".join(cells) + " |")
    return lines


def plot_noise(table: list[dict], path: Path, column: str) -> None:
    """One panel per temperature: MADPO's mean and CI against noise sd; DPO's CI as a band."""
    plt = pyplot()

    temps = sorted({r["temperature"] for r in table})
    fig, axes = plt.subplots(1, len(temps), figsize=(3.6 * len(temps), 3.4), squeeze=False, sharey=True)
    for ax, t in zip(axes[0], temps):
        rs = sorted((r for r in table if r["temperature"] == t), key=lambda r: r["noise_sd"])
        x = [r["noise_sd"] for r in rs]
        m = [r["madpo"]["mean"] for r in rs]
        err = [[r["madpo"]["mean"] - r["madpo"]["ci_low"] for r in rs], [r["madpo"]["ci_high"] - r["madpo"]["mean"] for r in rs]]
        ax.errorbar(x, m, yerr=err, marker="o", capsize=3, label="MADPO")
        if UNCERTAIN in rs[0]:
            v = [r[UNCERTAIN] for r in rs]
            ax.errorbar(x, [e["mean"] for e in v], marker="s", capsize=3, label="MADPO-expected",
                        yerr=[[e["mean"] - e["ci_low"] for e in v], [e["ci_high"] - e["mean"] for e in v]])
        d = rs[0]["dpo"]
        ax.axhspan(d["ci_low"], d["ci_high"], color="tab:orange", alpha=0.25, label="DPO (95% CI)")
        ax.axhline(d["mean"], color="tab:orange")
        ax.set(title=f"T={t:g}", xlabel="margin noise sd")
    axes[0][0].set_ylabel(column)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    save(fig, path, dpi=110)


def run_rm_noise(cfg: PipelineConfig, noise_levels: Sequence[float]) -> dict:
    """The study: a comparison of DPO and MADPO-at-each-noise-level, then the noise table and plot."""
    p = Pipeline(study_config(cfg, noise_levels))
    if not p.is_testbed:
        log.warning("no gold reward outside the testbed: the study judges by the reward model's score")
    out_dir = p.layout.study_dir("rm-noise")
    comparison = Comparison(p, out_dir=out_dir, command="madpo study rm-noise --final")
    results = comparison.run()
    column = results["column"]
    table = noise_table(comparison.rows, column, comparison.prompt_ids, noise_levels, cfg.eval.temperatures,
                        cfg.eval.bootstrap_samples)
    results["noise"] = table
    report_dir = comparison.report_dir  # out_dir, or out_dir/final for the sealed test split
    write_json(report_dir / "results.json", results)
    with open(report_dir / "table.md", "a") as f:
        f.write("\n" + "\n".join(render_noise_table(table, column)) + "\n")
    plot_noise(table, report_dir / "noise.png", column)
    return results
