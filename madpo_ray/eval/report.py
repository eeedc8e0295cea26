"""Reports of `madpo compare` and `madpo eval`: results.json, a markdown table with CIs, and a
plot of each method's mean reward against decoding temperature, beside (compare) each method's
paired difference from the SFT policy.

Paired statistics (`paired_analysis`): the unit is the prompt. Each prompt's samples and the
method's training seeds are averaged first, then the SFT policy's (or a baseline's) value on the
same prompt is subtracted, so prompt difficulty, which dominates the spread of raw rewards,
cancels out. The differences get a bootstrap CI over prompts; MADPO-vs-baseline differences
also get a two-sided sign-flip permutation test, Holm-corrected across every (baseline,
temperature) of one comparison: with 3 baselines x 5 temperatures, 15 uncorrected tests at 5%
would report a false "win" about half the time (1 - 0.95**15 = 0.54).
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from madpo_ray.config import PipelineConfig
from madpo_ray.eval.heldout import SFT_LABEL
from madpo_ray.eval.judge import bootstrap_mean, per_prompt
from madpo_ray.layout import is_testbed
from madpo_ray.plotting import pyplot, save

ALPHA = 0.05  # family-wise error rate of the Holm-corrected MADPO-vs-baseline tests
PERMUTATIONS = 10_000  # Monte Carlo sign flips: the smallest p is 1/10,001, far below 0.05 / a 30-test family
EXACT_MAX_PROMPTS = 16  # up to 2**16 sign patterns are enumerated: an exact p
REFERENCE_METHOD = "madpo"
DISPLAY = {"madpo": "MADPO", "dpo": "DPO", "ipo": "IPO", "beta_dpo": "beta-DPO", SFT_LABEL: "SFT"}
TEST_NAME = "two-sided sign-flip permutation test on per-prompt differences (samples and seeds averaged)"


def display(method: str) -> str:
    """The name a reader knows a method by (DPO, beta-DPO); other labels as they are."""
    return DISPLAY.get(method, method)


# --------------------------------------------------------------------------- paired statistics
def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order.

    The i-th smallest p (i from 1) is multiplied by (m - i + 1), capped at 1, and made monotone
    with a running maximum so a larger raw p never gets a smaller adjusted one. It controls the
    family-wise error rate like Bonferroni (every p times m) but rejects more often."""
    p = [float(x) for x in pvalues]
    m = len(p)
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda k: p[k])):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def sign_flip_pvalue(diffs: Sequence[float], n_resamples: int = PERMUTATIONS, seed: int = 0) -> float:
    """Two-sided paired randomisation test of mean(diffs) = 0.

    Under the null each prompt's difference is as likely negative as positive, so flipping signs
    draws from the null distribution of the mean. Exact (all 2**n sign patterns) for at most
    EXACT_MAX_PROMPTS prompts, else Monte Carlo with the +1 correction (p is never 0). Needs
    neither normal per-prompt differences nor scipy's t distribution (scipy is no dependency)."""
    d = np.asarray(diffs, dtype=float)
    d = d[~np.isnan(d)]
    n = len(d)
    if n == 0:
        return 1.0
    observed = abs(d.sum())
    tol = 1e-9 * (np.abs(d).sum() + 1e-300)  # the identity pattern must count, whatever the rounding
    if n <= EXACT_MAX_PROMPTS:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
        return float(np.mean(np.abs(signs @ d) >= observed - tol))
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_resamples, n))
    return float((1 + np.sum(np.abs(signs @ d) >= observed - tol)) / (1 + n_resamples))


def prompt_means(rows: list[dict], column: str, prompt_ids: Sequence[str]) -> dict[tuple, np.ndarray]:
    """Per-prompt mean of `column` (over a prompt's samples) for every (method, temperature, seed)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["temperature"], r["seed"])].append(r)
    return {key: per_prompt(g, column, prompt_ids) for key, g in groups.items()}


def seed_average(means: dict[tuple, np.ndarray], method: str, temperature: float) -> np.ndarray:
    """A method's per-prompt values at one temperature, averaged over its training seeds."""
    mats = [v for (m, t, _), v in means.items() if m == method and t == temperature]
    if not mats:
        raise ValueError(f"no judged samples of {method!r} at temperature {temperature:g}")
    with warnings.catch_warnings():  # a prompt no seed answered stays NaN, and is dropped by the callers
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.stack(mats), axis=0)


def paired_difference(means: dict[tuple, np.ndarray], method: str, base: str, temperature: float,
                      n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean over prompts of (method's seed-averaged value - base's), with a bootstrap CI over
    prompts, and each seed's own mean difference (a collapsed seed shows here)."""
    b = seed_average(means, base, temperature)
    d = seed_average(means, method, temperature) - b
    d = d[~np.isnan(d)]
    per_seed = [{"seed": s, "mean": float(np.nanmean(v - b))}
                for (m, t, s), v in sorted(means.items(), key=lambda kv: kv[0][2]) if m == method and t == temperature]
    return {"temperature": temperature, **bootstrap_mean(d, n_boot, seed).to_dict(), "prompts": int(len(d)),
            "per_seed": per_seed, "diffs": d}


def verdict(reference: str, baseline: str, temperature: float, mean: float, p_adj: float,
            alpha: float = ALPHA) -> str:
    """One line a reader can quote: who is ahead at this temperature, or that the test cannot tell."""
    a, b = display(reference), display(baseline)
    if p_adj < alpha:
        return f"{a} {'>' if mean > 0 else '<'} {b} at T={temperature:g} (p_adj={p_adj:.2g})"
    return f"{a} vs {b} at T={temperature:g}: not significant (p_adj={p_adj:.2g})"


def baseline_tests(means: dict[tuple, np.ndarray], methods: list[str], temps: list[float], n_boot: int = 2000,
                   seed: int = 0, reference: str = REFERENCE_METHOD, alpha: float = ALPHA) -> dict:
    """`reference` (MADPO) against every other compared method at every temperature: the paired
    difference, its raw p, and Holm's adjusted p over that whole family."""
    others = [m for m in methods if m not in (reference, SFT_LABEL)]
    if reference not in methods or not others:
        return {}
    rows = []
    for b in others:
        for t in temps:
            d = paired_difference(means, reference, b, t, n_boot, seed)
            rows.append({"baseline": b, **{k: v for k, v in d.items() if k not in ("per_seed", "diffs")},
                         "p": sign_flip_pvalue(d["diffs"], seed=seed)})
    for r, p_adj in zip(rows, holm([r["p"] for r in rows])):
        r["p_adj"] = p_adj
        r["verdict"] = verdict(reference, r["baseline"], r["temperature"], r["mean"], p_adj, alpha)
    return {"reference": reference, "family": len(rows), "alpha": alpha, "test": TEST_NAME,
            "correction": "holm", "rows": rows}


def paired_analysis(rows: list[dict], column: str, prompt_ids: Sequence[str], n_boot: int = 2000,
                    seed: int = 0) -> dict:
    """Every method's paired difference from the SFT policy, and MADPO's Holm-corrected tests
    against the other methods, from judged rows (method, seed, temperature, prompt_id, column)."""
    means = prompt_means(rows, column, prompt_ids)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    temps = sorted({r["temperature"] for r in rows})
    vs_sft = {}
    if SFT_LABEL in methods:
        for m in methods:
            if m != SFT_LABEL:
                vs_sft[m] = [{k: v for k, v in paired_difference(means, m, SFT_LABEL, t, n_boot, seed).items()
                              if k != "diffs"} for t in temps]
    return {"column": column, "vs_sft": vs_sft, "tests": baseline_tests(means, methods, temps, n_boot, seed)}


# --------------------------------------------------------------------------- one comparison
def write_report(c: PipelineConfig, out_dir: Path, judged: dict, **extra) -> dict:
    """results.json, table.md and the plot, for `madpo compare` and `madpo eval` alike.
    `extra` must include `prompts` (how many were judged) and `seeds`; `paired` (from
    `paired_analysis`) adds the difference-from-SFT panel and the Holm-corrected tests."""
    results = {"tier": c.data.tier if is_testbed(c) else None, "source": c.data.source,
               "temperatures": c.eval.temperatures,
               "samples_per_prompt": c.eval.samples_per_prompt, "backend": c.eval.backend, **extra, **judged}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "table.md").write_text(render_markdown(results))
    plot_comparison(results, out_dir / f"{judged['column']}_vs_temperature.png")
    return results


def column_name(col: str) -> str:
    return {"gold": "gold reward (testbed)", "rm": "reward-model score"}[col]


def temperature_header(temps: list[float], first: str) -> list[str]:
    return [f"| {first} | " + " | ".join(f"T={t:g}" for t in temps) + " |", "|---|" + "---|" * len(temps)]


def sft_draws_note(results: dict) -> str:
    """Where the SFT policy drew more samples than each method's model (`madpo compare`), say so."""
    n = results.get("sft_samples_per_prompt")
    if not n or n == results["samples_per_prompt"]:
        return ""
    return (f", {n} for the {SFT_LABEL} policy (as many as a method's seeds together, so both sides of a "
            f"difference average the same number of draws)")


def render_markdown(results: dict, heading: str = "#") -> str:
    """The table of one comparison; `heading` "##" nests it in the tiers report."""
    col, temps = results["column"], results["temperatures"]
    lines = [f"{heading} madpo compare: mean {column_name(col)} by decoding temperature", "",
             f"source `{results['source']}`" + (f", data-quality tier **{results['tier']}**" if results["tier"] else "")
             + f"; {results['prompts']} held-out prompts; {results['samples_per_prompt']} samples per prompt at "
             f"temperature > 0 (1 greedy at 0){sft_draws_note(results)}; "
             + ("one model per row; 95% bootstrap CIs over prompts." if results["seeds"] == [-1] else
                f"training seeds {results['seeds']}; 95% bootstrap CIs over seeds and prompts."),
             ""]
    if col in results["reference"]:
        lines += [f"Reference summaries score {results['reference'][col]:.3f}.", ""]
    lines += level_table(results) + win_table(results)
    paired = results.get("paired") or {}
    lines += vs_sft_table(results, paired.get("vs_sft") or {}) + tests_section(paired.get("tests") or {})
    lines += minus_table(results) + settings_section(results.get("method_settings") or [])
    return "\n".join(lines) + "\n"


def by_cell(results: dict) -> tuple[dict, list[str]]:
    by = {(r["method"], r["temperature"]): r for r in results["table"]}
    return by, list(dict.fromkeys(r["method"] for r in results["table"]))


def best_method(results: dict) -> dict[float, str]:
    """The trained method with the highest mean at each temperature."""
    col, (by, methods) = results["column"], by_cell(results)
    return {t: max((by[(m, t)][col]["mean"], m) for m in methods if m != SFT_LABEL and (m, t) in by)[1]
            for t in results["temperatures"] if any(m != SFT_LABEL and (m, t) in by for m in methods)}


def level_table(results: dict) -> list[str]:
    col, temps = results["column"], results["temperatures"]
    (by, methods), best = by_cell(results), best_method(results)
    lines = temperature_header(temps, "method")
    for m in methods:
        cells = []
        for t in temps:
            e = by.get((m, t))
            s = "" if e is None else f"{e[col]['mean']:.3f} [{e[col]['ci_low']:.2f}, {e[col]['ci_high']:.2f}]"
            cells.append(f"**{s}**" if e is not None and best.get(t) == m else s)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def win_table(results: dict) -> list[str]:
    col, temps = results["column"], results["temperatures"]
    by, methods = by_cell(results)
    win = f"win_vs_{SFT_LABEL}_{col}"
    if not any(win in r for r in results["table"]):
        return []
    lines = ["", f"Win rate against the {SFT_LABEL} policy (by {column_name(col)}; each sample against one of the "
             f"{SFT_LABEL} policy's on the same prompt, each training seed against its own share of them; ties count "
             "half):", ""] + temperature_header(temps, "method")
    for m in methods:
        if m != SFT_LABEL:
            lines.append(f"| {m} | " + " | ".join(f"{by[(m, t)][win]['mean']:.3f}" if (m, t) in by and win in by[(m, t)]
                                                   else "" for t in temps) + " |")
    return lines


def vs_sft_table(results: dict, vs_sft: dict) -> list[str]:
    if not vs_sft:
        return []
    lines = ["", f"Difference from the {SFT_LABEL} policy ({column_name(results['column'])}; per prompt: the method's "
             f"mean over samples and seeds minus the {SFT_LABEL} policy's on the same prompt at the same temperature; "
             "mean over prompts with a 95% bootstrap CI over prompts, so seed-to-seed spread is not in the CI: "
             "each seed's own mean is in results.json under paired.vs_sft):", ""] + temperature_header(
        results["temperatures"], "method")
    for m, diffs in vs_sft.items():
        lines.append(f"| {m} | " + " | ".join(f"{d['mean']:+.3f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"
                                              for d in diffs) + " |")
    return lines


def tests_section(tests: dict) -> list[str]:
    """MADPO against each baseline: the difference, raw and Holm-adjusted p, and the verdict."""
    if not tests:
        return []
    ref = display(tests["reference"])
    lines = ["", f"{ref} against each other method, per temperature: {tests['test']}. "
             f"Holm-adjusted p, family of {tests['family']} tests (every method x temperature below); "
             f"significant at family-wise alpha {tests['alpha']:g}.", "",
             "| comparison | mean difference [95% CI] | p | p_adj (Holm) | verdict |", "|---|---|---|---|---|"]
    for r in tests["rows"]:
        lines.append(f"| {ref} - {display(r['baseline'])}, T={r['temperature']:g} | {r['mean']:+.3f} "
                     f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}] | {r['p']:.2g} | {r['p_adj']:.2g} | {r['verdict']} |")
    return lines


def minus_table(results: dict) -> list[str]:
    if not results.get("madpo_minus"):
        return []
    temps, best = results["temperatures"], best_method(results)
    lines = ["", f"MADPO minus each baseline ({column_name(results['column'])}, seeds paired by index and prompts "
             "paired, 95% bootstrap CI over seeds and prompts):", ""] + temperature_header(temps, "baseline")
    for b, diffs in results["madpo_minus"].items():
        lines.append(f"| {b} | " + " | ".join(f"{d['mean']:+.3f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"
                                              for d in diffs) + " |")
    ahead = [t for t in temps if best.get(t) == "madpo"]
    return lines + ["", f"MADPO has the highest mean at {len(ahead)} of {len(temps)} temperatures"
                    + (f" ({', '.join(f'{t:g}' for t in ahead)})." if ahead else ".")]


def settings_section(settings: list[dict]) -> list[str]:
    """Per method, the loss and optimiser settings it trained with and where each came from."""
    if not settings:
        return []
    lines = ["", "Settings each method trained with, and where they came from:", ""]
    for s in settings:
        groups: dict[str, list[str]] = defaultdict(list)
        for key, value in s["settings"].items():
            groups[s["sources"][key]].append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
        parts = [f"{', '.join(kv)} from {src}" for src, kv in groups.items()]
        lines.append(f"- **{s['method']}** (loss `{s['loss']}`): " + "; ".join(parts))
    return lines


# --------------------------------------------------------------------------- plots
def method_colors(results: dict) -> dict[str, str]:
    """One colour per method, the same in every panel and every tier's plot."""
    methods = list(dict.fromkeys(r["method"] for r in results["table"]))
    return {m: f"C{i % 10}" for i, m in enumerate(methods)}


def draw_levels(ax, results: dict) -> None:
    """Each method's mean against temperature, with its CI (the SFT policy dashed)."""
    col = results["column"]
    methods = list(dict.fromkeys(r["method"] for r in results["table"]))
    for i, m in enumerate(methods):
        rows = sorted((r for r in results["table"] if r["method"] == m), key=lambda r: r["temperature"])
        xs = [r["temperature"] + (i - len(methods) / 2) * 0.006 for r in rows]  # dodge the error bars
        ys = [r[col]["mean"] for r in rows]
        err = np.maximum([[y - r[col]["ci_low"] for y, r in zip(ys, rows)],
                          [r[col]["ci_high"] - y for y, r in zip(ys, rows)]], 0.0)
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=m, linestyle="--" if m == SFT_LABEL else "-",
                    color=method_colors(results)[m])
    if col in results["reference"]:
        ax.axhline(results["reference"][col], color="grey", linewidth=0.8, linestyle=":", label="reference")
    ax.set_xlabel("decoding temperature")
    ax.set_ylabel({"gold": "mean gold reward", "rm": "mean reward-model score"}[col])
    tier = f", tier {results['tier']}" if results.get("tier") else ""
    ax.set_title(f"{len(results['seeds'])} seeds x {results['prompts']} prompts{tier} (95% CI)", fontsize=9)
    ax.legend(fontsize=7)


def difference_ylim(ranges: dict[str, tuple[float, float]], factor: float = 3.0) -> tuple[float, float, list[str]]:
    """Y-limits of the difference panel that one collapsed method cannot set.

    ranges: each method's (lowest CI end, highest CI end). A method whose range would stretch
    the span of the others (and 0) more than `factor` times is left out of the limits and
    reported as off-scale, so the others' differences stay readable."""
    def span(names):
        lo = min([0.0] + [ranges[n][0] for n in names])
        hi = max([0.0] + [ranges[n][1] for n in names])
        return lo, hi

    off = []
    if len(ranges) >= 3:
        for n in ranges:
            lo, hi = span([k for k in ranges if k != n])
            lo_all, hi_all = span(list(ranges))
            if hi > lo and hi_all - lo_all > factor * (hi - lo):
                off.append(n)
    lo, hi = span([n for n in ranges if n not in off] or list(ranges))
    pad = 0.08 * ((hi - lo) or 1.0)
    return lo - pad, hi + pad, off


def draw_differences(ax, results: dict) -> None:
    """Each method minus the SFT policy (paired by prompt) against temperature; off-scale
    methods are drawn at the edge and labelled with their lowest/highest mean."""
    vs_sft = results["paired"]["vs_sft"]
    ranges = {m: (min(d["ci_low"] for d in ds), max(d["ci_high"] for d in ds)) for m, ds in vs_sft.items()}
    lo, hi, off = difference_ylim(ranges)
    for i, (m, ds) in enumerate(vs_sft.items()):
        xs = np.array([d["temperature"] for d in ds]) + (i - len(vs_sft) / 2) * 0.006
        ys = np.array([d["mean"] for d in ds])
        err = np.stack([ys - np.array([d["ci_low"] for d in ds]), np.array([d["ci_high"] for d in ds]) - ys])
        err = np.maximum(err, 0.0)  # a percentile interval can miss its own mean by rounding; matplotlib refuses < 0
        label = m
        if m in off:
            label = f"{m} (off scale: {ys.min():+.2f} .. {ys.max():+.2f})"
            ys, err = np.clip(ys, lo, hi), None
        ax.errorbar(xs, ys, yerr=err, marker="v" if m in off else "o", capsize=3, label=label,
                    color=method_colors(results).get(m))
    ax.axhline(0.0, color=method_colors(results).get(SFT_LABEL, "grey"), linewidth=0.8, linestyle="--",
               label=f"{SFT_LABEL} policy")
    ax.set_ylim(lo, hi)
    ax.set_xlabel("decoding temperature")
    ax.set_ylabel(f"minus {SFT_LABEL} ({results['column']}), paired by prompt")
    ax.set_title(f"difference from the {SFT_LABEL} policy (95% CI over prompts)", fontsize=9)
    ax.legend(fontsize=7)


def plot_comparison(results: dict, path: Path) -> None:
    """Levels by temperature; beside them (compare) the paired differences from the SFT policy."""
    plt = pyplot()

    panels = 2 if (results.get("paired") or {}).get("vs_sft") else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4.5), squeeze=False)
    draw_levels(axes[0][0], results)
    if panels == 2:
        draw_differences(axes[0][1], results)
    fig.tight_layout()
    save(fig, path, dpi=120)


# --------------------------------------------------------------------------- several tiers
def write_tier_report(out_dir: Path, per_tier: dict[str, dict]) -> dict:
    """results.json, table.md and one plot for the comparisons of several data-quality tiers
    (each tier's own report stays in its own run folder)."""
    first = next(iter(per_tier.values()))
    combined = {"tiers": list(per_tier), "column": first["column"], "temperatures": first["temperatures"],
                "per_tier": per_tier}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(combined, indent=2))
    (out_dir / "table.md").write_text(render_tier_markdown(combined))
    plot_tiers(combined, out_dir / f"{combined['column']}_vs_temperature_by_tier.png")
    return combined


def tier_summary(tests: dict, baseline: str) -> str:
    """One cell of the tiers summary: at which temperatures MADPO is significantly ahead/behind."""
    rows = [r for r in tests.get("rows", []) if r["baseline"] == baseline]
    if not rows:
        return ""
    ahead = [f"{r['temperature']:g}" for r in rows if r["p_adj"] < tests["alpha"] and r["mean"] > 0]
    behind = [f"{r['temperature']:g}" for r in rows if r["p_adj"] < tests["alpha"] and r["mean"] < 0]
    text = f"ahead at {len(ahead)}/{len(rows)}" + (f" (T={', '.join(ahead)})" if ahead else "")
    return text + (f"; behind at T={', '.join(behind)}" if behind else "")


def render_tier_markdown(combined: dict) -> str:
    """A summary of MADPO against each baseline per tier, then each tier's full table."""
    tiers = combined["tiers"]
    tests = {t: (combined["per_tier"][t].get("paired") or {}).get("tests") or {} for t in tiers}
    baselines = list(dict.fromkeys(r["baseline"] for t in tiers for r in tests[t].get("rows", [])))
    families = ", ".join(f"{t}: {tests[t]['family']}" for t in tiers if tests[t])
    lines = [f"# madpo compare across data-quality tiers: {', '.join(tiers)}", "",
             f"Where MADPO's mean {column_name(combined['column'])} is significantly above (or below) each baseline "
             f"after Holm's correction within each tier (Holm-adjusted p, family of N tests per tier: "
             f"{families or 'none'}"
             f"; {TEST_NAME}).", ""]
    if baselines:
        lines += ["| baseline | " + " | ".join(f"tier {t}" for t in tiers) + " |", "|---|" + "---|" * len(tiers)]
        lines += [f"| {display(b)} | " + " | ".join(tier_summary(tests[t], b) for t in tiers) + " |" for b in baselines]
    for t in tiers:
        r = combined["per_tier"][t]
        lines += [""] + ([f"Run folder of tier {t}: `{r['run_dir']}`", ""] if r.get("run_dir") else [])
        lines.append(render_markdown(r, heading="##"))
    return "\n".join(lines) + "\n"


def plot_tiers(combined: dict, path: Path) -> None:
    """One column per tier: levels on top, differences from the SFT policy below."""
    plt = pyplot()

    tiers = combined["tiers"]
    with_diff = [bool((combined["per_tier"][t].get("paired") or {}).get("vs_sft")) for t in tiers]
    rows = 2 if any(with_diff) else 1
    fig, axes = plt.subplots(rows, len(tiers), figsize=(6 * len(tiers), 4.2 * rows), squeeze=False)
    for j, t in enumerate(tiers):
        draw_levels(axes[0][j], combined["per_tier"][t])
        if rows == 2:
            if with_diff[j]:
                draw_differences(axes[1][j], combined["per_tier"][t])
            else:
                axes[1][j].axis("off")
    fig.tight_layout()
    save(fig, path, dpi=110)


def verdicts(results: dict) -> list[str]:
    """The verdict lines of one comparison's Holm-corrected tests (empty when there are none)."""
    return [r["verdict"] for r in ((results.get("paired") or {}).get("tests") or {}).get("rows", [])]

