"""The end-of-run summary: reward-model accuracy, policy preference accuracy and implicit
margins on held-out pairs, and the gold reward of greedy summaries (SFT vs trained policy)."""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

import torch

from madpo_ray.config import PipelineConfig
from madpo_ray.data.margins import format_rho, margin_diagnostics, uncertainty_calibration
from madpo_ray.data.scored import read_scored
from madpo_ray.data.testbed import document_gold
from madpo_ray.eval.heldout import scored_split
from madpo_ray.eval.measures import greedy_gold_reward, mean_gold_reward, pair_logprobs, preference_metrics
from madpo_ray.eval.margins import margin_table, plot_calibration, plot_margins, weighting_params
from madpo_ray.io import read_jsonl, write_json, write_text_atomically
from madpo_ray.layout import BEFORE_POLICY, DEVELOPMENT_SPLIT, SPLITS, RunLayout, is_testbed
from madpo_ray.models import load_causal_lm, load_tokenizer
from madpo_ray.plotting import pyplot, save
from madpo_ray.stages.score import ComputePolicy

log = logging.getLogger(__name__)


def pair_compositions(layout: RunLayout) -> dict:
    """Each split's testbed pairs by design and kind, with duplicates, off-design pairs and skipped
    draws, as the pairs stage recorded them."""
    metrics = layout.read_metrics("pairs") if layout.metrics_path("pairs").exists() else {}
    return {split: m["composition"] for split, m in metrics.items() if isinstance(m, dict) and "composition" in m}


def evaluate_run(cfg: PipelineConfig, layout: RunLayout) -> dict:
    """The run summary, a development figure on the validation split (the sealed test split is read
    only by `madpo compare --final`): held-out preference metrics of the policy, the reward model's
    accuracy, and (testbed) the gold reward of greedy and of sampled summaries of the SFT policy and
    the policy."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    tok = load_tokenizer(str(layout.model_dir("sft")))
    policy_model = load_causal_lm(str(layout.model_dir("policy")), cfg.model.dtype)  # as the references were scored
    rows = read_scored(scored_split(layout, DEVELOPMENT_SPLIT))
    pol_c, pol_r = pair_logprobs(policy_model, rows, tok.pad_token_id, policy=ComputePolicy.of(cfg))
    summary = {"loss": cfg.policy.loss.name, "split": DEVELOPMENT_SPLIT, "pairs": len(rows),
               "margins": reward_margin_report(cfg, layout),
               **preference_metrics(rows, pol_c, pol_r)}
    if is_testbed(cfg):
        summary["pair_composition"] = pair_compositions(layout)
        summary.update(greedy_examples(cfg, layout, tok, policy_model))
    write_summary(layout, summary)
    return summary


def reward_margin_report(cfg: PipelineConfig, layout: RunLayout) -> dict:
    """Margin diagnostics of every scored split at the run's weighting parameters, and the
    histograms of the training pairs (what MADPO weights) in margins.png."""
    params = weighting_params(cfg.policy.loss)
    report = {"weighting": params, "margins_from": cfg.score.margins_from}
    for split in SPLITS[:2]:  # train and validation: development figures never read the sealed split
        path = layout.scored_path(split)
        if path.exists():
            rows = read_scored(path)
            report[split] = margin_diagnostics(rows, **params)
            calibration = uncertainty_calibration(rows) if split == DEVELOPMENT_SPLIT else {}
            if calibration:
                report["calibration"] = calibration
                report["calibration_plot"] = str(plot_calibration(report["calibration"], layout.calibration_plot,
                                                                  title=f"{cfg.name}: reward ensemble on validation"))
            if split == "train":
                report["plot"] = str(plot_margins(rows, layout.margins_plot, **params,
                                                  title=f"{cfg.name}: training pairs"))
    return report


def greedy_examples(cfg: PipelineConfig, layout: RunLayout, tok, policy_model) -> dict:
    """Mean gold reward of greedy summaries (SFT, policy, the references) and three examples, and
    of one summary per document sampled at the hottest of eval.temperatures: a policy can gain
    greedy and still ramble when sampled, which the greedy figure alone would hide."""
    docs = read_jsonl(layout.docs_path(DEVELOPMENT_SPLIT))[:cfg.eval.num_prompts]
    hottest = max(cfg.eval.temperatures)
    out: dict = {"examples": {}}
    for label, model in (("sft", load_causal_lm(str(layout.model_dir("sft")))), ("policy", policy_model)):
        out[f"{label}_greedy_gold_reward"], texts = greedy_gold_reward(model, tok, docs, cfg)
        out["examples"][label] = texts[:3]
        if hottest > 0:
            out[f"{label}_sampled_gold_reward_t{hottest:g}"] = mean_gold_reward(model, tok, docs, cfg, hottest)[0]
    out["reference_gold_reward"] = sum(document_gold(d["reference"], d) for d in docs) / len(docs)
    out["example_references"] = [d["reference"] for d in docs[:3]]
    return out


def write_summary(layout: RunLayout, summary: dict) -> None:
    timings, fixed = {}, {}
    for stage in BEFORE_POLICY + ("policy",):
        f = layout.metrics_path(stage)
        if f.exists():
            m = json.loads(f.read_text())
            timings[stage] = m.get("wall_seconds")
            if m.get("wall_seconds") is not None and m.get("train_seconds") is not None:
                fixed[stage] = m["wall_seconds"] - m["train_seconds"]
            for key in ("tokens_per_s", "padding_share"):  # logical tokens/s (2P+C+R per pair); padded/computed
                if key in m:
                    summary[f"{stage}_{key}"] = m[key]
    summary["stage_seconds"] = timings
    # What a training stage pays beyond its training loop: workers, imports, model loading, the final
    # save: the cost a long-lived worker group would remove.
    summary["stage_fixed_seconds"] = fixed
    summary["curves_plot"] = plot_training_curves(layout, layout.curves_plot)
    write_json(layout.summary_json, summary)
    lines = ["| metric | value |", "| --- | --- |"]
    for k, v in summary.items():
        if isinstance(v, float):
            lines.append(f"| {k} | {v:.4f} |")
        elif isinstance(v, (int, str)):
            lines.append(f"| {k} | {v} |")
    if "margins" in summary:
        splits, rows = margin_table(summary["margins"])
        w = summary["margins"]["weighting"]
        lines += ["", f"Reward-model margins and MADPO weights (c_max {w['c_max']:g}, lam {w['lam']:g}, "
                      f"tau {w['tau']:.3f}); histograms: margins.png", "",
                  "| | " + " | ".join(splits) + " |", "| --- |" + " --- |" * len(splits)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += calibration_lines((summary.get("margins") or {}).get("calibration"))
    lines += composition_lines(summary.get("pair_composition") or {})
    lines += ["", "| stage | seconds | of which outside the training loop |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v:.1f} | {fixed[k]:.1f} |" if k in fixed else f"| {k} | {v:.1f} | |"
              for k, v in timings.items() if v is not None]
    write_text_atomically(layout.summary_md, "\n".join(lines) + "\n")


def calibration_lines(calibration: Optional[dict]) -> list[str]:
    """The reward ensemble's disagreement against its error on validation, by disagreement bin."""
    if not calibration:
        return []
    lines = ["", f"Reward ensemble on {calibration['pairs']} validation pairs: does its disagreement find its errors? "
                 f"Spearman(margin std, |error|) {format_rho(calibration['spearman_std_vs_abs_error'])}, "
                 f"(margin std, sign error) {format_rho(calibration['spearman_std_vs_sign_error'])}; plot: calibration.png", "",
             "| margin std (bin mean) | pairs | mean abs. error | ordered against the truth |", "| --- | --- | --- | --- |"]
    return lines + [f"| {b['std_mean']:.3f} | {b['pairs']} | {b['abs_error_mean']:.3f} | {b['sign_error_rate']:.1%} |"
                    for b in calibration["bins"]]


def composition_lines(compositions: dict) -> list[str]:
    """The testbed pairs of each split by design, and what the designs could not fill."""
    if not compositions:
        return []
    lines = ["", "Testbed pairs by design (skipped: draws with no new distinct pair of their design, never "
                 "replaced by another kind):", "", "| split | pairs | by design | duplicates | off design | skipped |",
             "| --- | --- | --- | --- | --- | --- |"]
    for split, c in compositions.items():
        designs = ", ".join(f"{k} {v}" for k, v in sorted(c["by_design"].items()))
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(c["skipped"].items())) or "0"
        lines.append(f"| {split} | {c['pairs']} | {designs} | {c['duplicates']} | {c['off_design']} | {skipped} |")
    return lines


def plot_training_curves(layout: RunLayout, path) -> Optional[str]:
    """One panel per training stage: the loss of every optimiser step (global mean), and the
    held-out evaluations where the stage has them (the reward model's early stopping)."""
    plt = pyplot()

    stages = [s for s in ("sft", "reward", "policy") if layout.metrics_path(s).exists()]
    curves = {s: json.loads(layout.metrics_path(s).read_text()) for s in stages}
    curves = {s: m for s, m in curves.items() if m.get("loss_history")}
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), squeeze=False)
    for ax, (stage, m) in zip(axes[0], curves.items()):
        ax.plot(range(1, len(m["loss_history"]) + 1), m["loss_history"], linewidth=1, label="train loss")
        evals = m.get("eval_history") or []
        if evals:
            ax.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="validation loss")
        if m.get("best_step"):
            ax.axvline(m["best_step"], color="k", linestyle="--", linewidth=1, label=f"best (step {m['best_step']})")
        ax.set(title=stage if stage != "policy" else f"policy ({layout.loss})", xlabel="optimiser step")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("loss")
    fig.tight_layout()
    save(fig, path, dpi=110)
    return str(path)
