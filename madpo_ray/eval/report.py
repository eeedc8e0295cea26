"""Reports of `madpo compare` and `madpo eval`: results.json, a markdown table with CIs, and a
plot of each method's mean reward against decoding temperature."""

from __future__ import annotations

import json
from pathlib import Path

from madpo_ray.config import PipelineConfig
from madpo_ray.eval.heldout import SFT_LABEL
from madpo_ray.layout import is_testbed


def write_report(c: PipelineConfig, out_dir: Path, judged: dict, **extra) -> dict:
    """results.json, table.md and the plot, for `madpo compare` and `madpo eval` alike.
    `extra` must include `prompts` (how many were judged) and `seeds`."""
    results = {"tier": c.data.tier if is_testbed(c) else None, "source": c.data.source,
               "temperatures": c.eval.temperatures,
               "samples_per_prompt": c.eval.samples_per_prompt, "backend": c.eval.backend, **extra, **judged}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "table.md").write_text(render_markdown(results))
    plot_comparison(results, out_dir / f"{judged['column']}_vs_temperature.png")
    return results


def render_markdown(results: dict) -> str:
    col = results["column"]
    name = {"gold": "gold reward (testbed)", "rm": "reward-model score"}[col]
    temps = results["temperatures"]
    lines = [f"# madpo compare: mean {name} by decoding temperature", "",
             f"source `{results['source']}`" + (f", data-quality tier **{results['tier']}**" if results["tier"] else "")
             + f"; {results['prompts']} held-out prompts; {results['samples_per_prompt']} samples per prompt at "
             f"temperature > 0 (1 greedy at 0); "
             + ("one model per row; 95% bootstrap CIs over prompts." if results["seeds"] == [-1] else
                f"training seeds {results['seeds']}; 95% bootstrap CIs over seeds and prompts."),
             ""]
    if col in results["reference"]:
        lines.append(f"Reference summaries score {results['reference'][col]:.3f}.")
        lines.append("")
    lines.append("| method | " + " | ".join(f"T={t:g}" for t in temps) + " |")
    lines.append("|---|" + "---|" * len(temps))
    by = {(r["method"], r["temperature"]): r for r in results["table"]}
    methods = list(dict.fromkeys(r["method"] for r in results["table"]))
    best = {t: max((by[(m, t)][col]["mean"], m) for m in methods if m != SFT_LABEL and (m, t) in by)[1] for t in temps}
    for m in methods:
        cells = []
        for t in temps:
            e = by.get((m, t))
            if e is None:
                cells.append("")
                continue
            s = f"{e[col]['mean']:.3f} [{e[col]['ci_low']:.2f}, {e[col]['ci_high']:.2f}]"
            cells.append(f"**{s}**" if best[t] == m else s)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    win = f"win_vs_{SFT_LABEL}_{col}"
    if any(win in r for r in results["table"]):
        lines += ["", f"Win rate against the SFT_LABEL policy (by {name}; sample j vs sample j of the same prompt):", "",
                  "| method | " + " | ".join(f"T={t:g}" for t in temps) + " |", "|---|" + "---|" * len(temps)]
        for m in methods:
            if m == SFT_LABEL:
                continue
            lines.append(f"| {m} | " + " | ".join(f"{by[(m, t)][win]['mean']:.3f}" if (m, t) in by and win in by[(m, t)]
                                                   else "" for t in temps) + " |")
    if results.get("madpo_minus"):
        lines += ["", f"MADPO minus each baseline ({name}, paired by prompt and seed, 95% CI):", "",
                  "| baseline | " + " | ".join(f"T={t:g}" for t in temps) + " |", "|---|" + "---|" * len(temps)]
        for b, diffs in results["madpo_minus"].items():
            lines.append(f"| {b} | " + " | ".join(f"{d['mean']:+.3f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"
                                                  for d in diffs) + " |")
        ahead = [t for t in temps if best[t] == "madpo"]
        lines += ["", f"MADPO has the highest mean at {len(ahead)} of {len(temps)} temperatures"
                  + (f" ({', '.join(f'{t:g}' for t in ahead)})." if ahead else ".")]
    return "\n".join(lines) + "\n"


def plot_comparison(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    col = results["column"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = list(dict.fromkeys(r["method"] for r in results["table"]))
    for i, m in enumerate(methods):
        rows = sorted((r for r in results["table"] if r["method"] == m), key=lambda r: r["temperature"])
        xs = [r["temperature"] + (i - len(methods) / 2) * 0.006 for r in rows]  # dodge the error bars
        ys = [r[col]["mean"] for r in rows]
        err = [[y - r[col]["ci_low"] for y, r in zip(ys, rows)], [r[col]["ci_high"] - y for y, r in zip(ys, rows)]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=m, linestyle="--" if m == SFT_LABEL else "-")
    if col in results["reference"]:
        ax.axhline(results["reference"][col], color="grey", linewidth=0.8, linestyle=":", label="reference")
    ax.set_xlabel("decoding temperature")
    ax.set_ylabel({"gold": "mean gold reward", "rm": "mean reward-model score"}[col])
    tier = f", tier {results['tier']}" if results.get("tier") else ""
    ax.set_title(f"{len(results['seeds'])} seeds x {results['prompts']} prompts{tier} (95% CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
