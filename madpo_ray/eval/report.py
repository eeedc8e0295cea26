"""Reports of `madpo compare` and `madpo eval`: results.json, a markdown table with CIs, and a
plot of each method's mean reward against decoding temperature, beside (compare) each method's
paired difference from the SFT policy.

Paired statistics (`paired_analysis`) come from `eval.stats`, the one definition of "method minus
baseline": per prompt, the method's mean over its samples and seeds minus the baseline's, with an
interval and a test that count the training seeds as a source of variance, not only the prompts.
MADPO-vs-baseline tests are Holm-corrected over everything one report states (every baseline and
ablation at every temperature, and every tier in the tiers report); a test whose sides have fewer
than `stats.MIN_SEEDS_FOR_VERDICT` seeds is reported without a verdict.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from madpo_ray.config import PipelineConfig
from madpo_ray.eval import stats
from madpo_ray.eval.generate import generate_for_models
from madpo_ray.eval.heldout import SFT_LABEL, eval_prompts, judge_rows
from madpo_ray.eval.judge import per_prompt
from madpo_ray.io import write_json, write_text_atomically
from madpo_ray.layout import RunLayout, is_testbed
from madpo_ray.plotting import pyplot, save

ALPHA = 0.05  # family-wise error rate of the Holm-corrected MADPO-vs-baseline tests
REFERENCE_METHOD = "madpo"
DISPLAY = {"madpo": "MADPO", "dpo": "DPO", "ipo": "IPO", "beta_dpo": "beta-DPO", SFT_LABEL: "SFT"}


def display(method: str) -> str:
    """The name a reader knows a method by (DPO, beta-DPO); other labels as they are."""
    return DISPLAY.get(method, method)


# --------------------------------------------------------------------------- paired statistics
def prompt_means(rows: list[dict], column: str, prompt_ids: Sequence[str]) -> dict[tuple, np.ndarray]:
    """Per-prompt mean of `column` (over a prompt's samples) for every (method, temperature, seed)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["temperature"], r["seed"])].append(r)
    return {key: per_prompt(g, column, prompt_ids) for key, g in groups.items()}


def seed_matrix(means: dict[tuple, np.ndarray], method: str, temperature: float) -> np.ndarray:
    """A method's [seeds, prompts] per-prompt values at one temperature, seeds in ascending order."""
    mats = [v for (m, t, _), v in sorted(means.items(), key=lambda kv: kv[0][2]) if m == method and t == temperature]
    if not mats:
        raise ValueError(f"no judged samples of {method!r} at temperature {temperature:g}")
    return np.stack(mats)


def paired_difference(means: dict[tuple, np.ndarray], method: str, base: str, temperature: float) -> dict:
    """`method` minus `base` at one temperature (eval.stats.paired_difference), and each of the
    method's seeds' own mean difference from the base's seed average (a collapsed seed shows here)."""
    a, b = seed_matrix(means, method, temperature), seed_matrix(means, base, temperature)
    base_mean = np.nanmean(b, axis=0)
    seeds = sorted(s for (m, t, s) in means if m == method and t == temperature)
    per_seed = [{"seed": s, "mean": float(np.nanmean(row - base_mean))} for s, row in zip(seeds, a)]
    return {"temperature": temperature, **stats.paired_difference(a, b).to_dict(), "per_seed": per_seed}


def verdict(reference: str, baseline: str, temperature: float, mean: float, p_adj: float,
            alpha: float = ALPHA) -> str:
    """One line a reader can quote: who is ahead at this temperature, or that the test cannot tell."""
    a, b = display(reference), display(baseline)
    if p_adj < alpha:
        return f"{a} {'>' if mean > 0 else '<'} {b} at T={temperature:g} (p_adj={p_adj:.2g})"
    return f"{a} vs {b} at T={temperature:g}: not significant (p_adj={p_adj:.2g})"


def too_few_seeds(row: dict) -> str:
    return (f"no verdict: {min(row['seeds'])} seed(s), a verdict needs {stats.MIN_SEEDS_FOR_VERDICT} per method")


def apply_holm(rows: list[dict], reference: str = REFERENCE_METHOD, alpha: float = ALPHA) -> int:
    """Holm's adjusted p and the verdict of every testable row (enough seeds on both sides), as
    one family; rows with too few seeds get no p_adj. Returns the family's size."""
    tested, untested = [], []
    for r in rows:
        (tested if min(r["seeds"]) >= stats.MIN_SEEDS_FOR_VERDICT else untested).append(r)
    for r, p_adj in zip(tested, stats.holm([r["p"] for r in tested])):
        r["p_adj"] = p_adj
        r["verdict"] = verdict(reference, r["baseline"], r["temperature"], r["mean"], p_adj, alpha)
    for r in untested:
        r["p_adj"], r["verdict"] = None, too_few_seeds(r)
    return len(tested)


def baseline_tests(means: dict[tuple, np.ndarray], methods: list[str], temps: list[float],
                   reference: str = REFERENCE_METHOD, alpha: float = ALPHA) -> dict:
    """`reference` (MADPO) against every other compared method (ablations included) at every
    temperature: the paired difference, its raw p, and Holm's adjusted p over that whole family."""
    others = [m for m in methods if m not in (reference, SFT_LABEL)]
    if reference not in methods or not others:
        return {}
    rows = [{"baseline": b, **{k: v for k, v in paired_difference(means, reference, b, t).items() if k != "per_seed"}}
            for b in others for t in temps]
    family = apply_holm(rows, reference, alpha)
    return {"reference": reference, "family": family, "alpha": alpha, "test": stats.TEST_NAME,
            "correction": "holm", "min_seeds": stats.MIN_SEEDS_FOR_VERDICT, "rows": rows}


def paired_analysis(rows: list[dict], column: str, prompt_ids: Sequence[str]) -> dict:
    """Every method's paired difference from the SFT policy, and MADPO's Holm-corrected tests
    against the other methods, from judged rows (method, seed, temperature, prompt_id, column)."""
    means = prompt_means(rows, column, prompt_ids)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    temps = sorted({r["temperature"] for r in rows})
    vs_sft = {m: [paired_difference(means, m, SFT_LABEL, t) for t in temps]
              for m in methods if SFT_LABEL in methods and m != SFT_LABEL}
    return {"column": column, "vs_sft": vs_sft, "tests": baseline_tests(means, methods, temps)}


# --------------------------------------------------------------------------- one comparison
def write_report(c: PipelineConfig, out_dir: Path, judged: dict, **extra) -> dict:
    """results.json, table.md and the plot, for `madpo compare` and `madpo eval` alike.
    `extra` must include `prompts` (how many were judged) and `seeds`; `paired` (from
    `paired_analysis`) adds the difference-from-SFT panel and the Holm-corrected tests."""
    results = {"tier": c.data.tier if is_testbed(c) else None, "source": c.data.source,
               "temperatures": c.eval.temperatures,
               "samples_per_prompt": c.eval.samples_per_prompt, "backend": c.eval.backend, **extra, **judged}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "results.json", results)
    write_text_atomically(out_dir / "table.md", render_markdown(results))
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
    col = results["column"]
    lines = [f"{heading} madpo compare: mean {column_name(col)} by decoding temperature", "",
             f"source `{results['source']}`" + (f", data-quality tier **{results['tier']}**" if results["tier"] else "")
             + f"; {results['prompts']} held-out prompts; {results['samples_per_prompt']} samples per prompt at "
             f"temperature > 0 (1 greedy at 0){sft_draws_note(results)}; "
             + ("one model per row; 95% bootstrap CIs over prompts." if results["seeds"] == [-1] else
                f"training seeds {results['seeds']}; 95% bootstrap CIs over seeds and prompts."),
             ""] + split_lines(results) + protocol_lines(results)
    if col in results["reference"]:
        lines += [f"Reference summaries score {results['reference'][col]:.3f}.", ""]
    lines += level_table(results) + win_table(results)
    paired = results.get("paired") or {}
    lines += vs_sft_table(results, paired.get("vs_sft") or {}) + tests_section(paired.get("tests") or {})
    lines += minus_table(results) + settings_section(results.get("method_settings") or [])
    return "\n".join(lines) + "\n"


def split_lines(results: dict) -> list[str]:
    """Which split was judged: validation for development, the sealed test split only in a final step."""
    final = results.get("final")
    if final:
        earlier = final["earlier_readings"]
        return [f"**Sealed test split**, final reading of {final['computed_at']} (recorded in the run's "
                f"final_readings.jsonl; {earlier} earlier reading(s) of this run's test split"
                + (": a split read before is no longer fresh" if earlier else "") + ").", ""]
    if results.get("split") == "validation":
        return ["**Validation split** (a development figure; the sealed test split is read only by "
                "`madpo compare --final`).", ""]
    if results.get("split"):
        return [f"**{results['split']} split** (no record of a final reading).", ""]
    return []


def protocol_lines(results: dict) -> list[str]:
    """Which settings the methods trained at: the first thing a reader of a verdict needs."""
    protocol = results.get("protocol")
    if not protocol:
        return []
    return [f"**{protocol['title']}**: {protocol['text']}", ""]


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


DIFFERENCE_NOTE = ("per prompt, the method's mean over samples and seeds minus the baseline's on the same prompt at "
                   "the same temperature; mean over prompts with a 95% interval that counts both the prompts and "
                   "the training seeds (eval/stats.py)")


def vs_sft_table(results: dict, vs_sft: dict) -> list[str]:
    if not vs_sft:
        return []
    lines = ["", f"Difference from the {SFT_LABEL} policy ({column_name(results['column'])}; {DIFFERENCE_NOTE}; "
             "each seed's own mean is in results.json under paired.vs_sft):", ""] + temperature_header(
        results["temperatures"], "method")
    for m, diffs in vs_sft.items():
        lines.append(f"| {m} | " + " | ".join(f"{d['mean']:+.3f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"
                                              for d in diffs) + " |")
    return lines


def family_text(tests: dict) -> str:
    scope = tests.get("family_scope", "every baseline and ablation x temperature of this comparison")
    return f"Holm-adjusted p, one family of {tests['family']} tests ({scope})"


def tests_section(tests: dict) -> list[str]:
    """MADPO against each baseline: the difference (the effect size), raw and Holm-adjusted p, verdict."""
    if not tests:
        return []
    ref = display(tests["reference"])
    lines = ["", f"{ref} against each other method, per temperature: {tests['test']}; {DIFFERENCE_NOTE}. "
             f"{family_text(tests)}; significant at family-wise alpha {tests['alpha']:g}. A verdict needs "
             f"{tests['min_seeds']} training seeds per method.", "",
             "| comparison | mean difference [95% CI] | seeds | p | p_adj (Holm) | verdict |", "|---|---|---|---|---|---|"]
    for r in tests["rows"]:
        p_adj = "" if r["p_adj"] is None else f"{r['p_adj']:.2g}"
        lines.append(f"| {ref} - {display(r['baseline'])}, T={r['temperature']:g} | {r['mean']:+.3f} "
                     f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}] | {r['seeds'][0]} vs {r['seeds'][1]} | {r['p']:.2g} "
                     f"| {p_adj} | {r['verdict']} |")
    return lines


def minus_table(results: dict) -> list[str]:
    """MADPO minus each baseline by temperature: the tests' own differences, laid out as a grid."""
    tests = (results.get("paired") or {}).get("tests") or {}
    if not tests:
        return []
    temps, best = results["temperatures"], best_method(results)
    by = {(r["baseline"], r["temperature"]): r for r in tests["rows"]}
    lines = ["", f"MADPO minus each baseline ({column_name(results['column'])}; the differences tested above):", ""] \
        + temperature_header(temps, "baseline")
    for b in dict.fromkeys(r["baseline"] for r in tests["rows"]):
        lines.append(f"| {b} | " + " | ".join(f"{by[(b, t)]['mean']:+.3f} [{by[(b, t)]['ci_low']:+.2f}, "
                                              f"{by[(b, t)]['ci_high']:+.2f}]" if (b, t) in by else "" for t in temps) + " |")
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
    protocol = (results.get("protocol") or {}).get("title")
    ax.set_title(f"{len(results['seeds'])} seeds x {results['prompts']} {results.get('split', '')} prompts{tier} (95% CI)"
                 + (f"\n{protocol}" if protocol else ""), fontsize=9)
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
    untuned = " (untuned)" if (results.get("protocol") or {}).get("mode") == "reference" else ""
    ax.set_title(f"difference from the {SFT_LABEL} policy{untuned} (95% CI, seeds and prompts)", fontsize=9)
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


# --------------------------------------------------------------------------- several comparisons
# A report over several comparisons of one kind: data-quality tiers (`--tiers`), or the points of a
# learning-rate grid at matched settings (`compare.lr_grid`). GROUP_KINDS: each kind, in prose.
GROUP_KINDS = {"tier": "data-quality tiers", "lr": "learning rates at matched settings"}


def write_grouped_report(out_dir: Path, groups: dict[str, dict], kind: str) -> dict:
    """results.json, table.md and one plot for several comparisons (each also keeps its own report).
    The tests of every group form one Holm family here, since this report states all of them."""
    if kind not in GROUP_KINDS:
        raise ValueError(f"group kind must be one of {list(GROUP_KINDS)}, got {kind!r}")
    first = next(iter(groups.values()))
    groups = copy.deepcopy(groups)
    family = joint_holm([(g, (r.get("paired") or {}).get("tests") or {}) for g, r in groups.items()], kind)
    combined = {"kind": kind, "groups": list(groups), "column": first["column"], "temperatures": first["temperatures"],
                "split": first.get("split"), "family": family, "out_dir": str(out_dir), "per_group": groups}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    finals = {g: r["final"] for g, r in groups.items() if r.get("final")}
    if finals:  # the sealed split: this report's readings, one per comparison, named where they are recorded
        write_json(out_dir / "final.json", {"split": "test", "readings": finals})
    write_json(out_dir / "results.json", combined)
    write_text_atomically(out_dir / "table.md", render_grouped_markdown(combined))
    plot_groups(combined, out_dir / f"{combined['column']}_vs_temperature_by_{kind}.png")
    return combined


def joint_holm(group_tests: list[tuple[str, dict]], kind: str) -> int:
    """Holm over the tests of every group at once, in place; each group's tests then name that family."""
    rows = [r for _, tests in group_tests for r in tests.get("rows", [])]
    family = apply_holm(rows)
    scope = f"every baseline and ablation x temperature x {kind} of this report ({', '.join(g for g, _ in group_tests)})"
    for _, tests in group_tests:
        if tests:
            tests.update(family=family, family_scope=scope)
    return family


def group_summary(tests: dict, baseline: str) -> str:
    """One cell of the summary: at which temperatures MADPO is significantly ahead/behind."""
    rows = [r for r in tests.get("rows", []) if r["baseline"] == baseline]
    if not rows:
        return ""
    if all(r["p_adj"] is None for r in rows):
        return too_few_seeds(rows[0])
    significant = [r for r in rows if r["p_adj"] is not None and r["p_adj"] < tests["alpha"]]
    ahead = [f"{r['temperature']:g} ({r['mean']:+.3f})" for r in significant if r["mean"] > 0]
    behind = [f"{r['temperature']:g} ({r['mean']:+.3f})" for r in significant if r["mean"] < 0]
    text = f"ahead at {len(ahead)}/{len(rows)}" + (f" (T={', '.join(ahead)})" if ahead else "")
    return text + (f"; behind at T={', '.join(behind)}" if behind else "")


def render_grouped_markdown(combined: dict) -> str:
    """A summary of MADPO against each baseline per group, then each group's full table."""
    kind, groups = combined["kind"], combined["groups"]
    tests = {g: (combined["per_group"][g].get("paired") or {}).get("tests") or {} for g in groups}
    baselines = list(dict.fromkeys(r["baseline"] for g in groups for r in tests[g].get("rows", [])))
    what = GROUP_KINDS[kind]
    lines = [f"# madpo compare across {what}: {', '.join(groups)}", "",
             f"Where MADPO's mean {column_name(combined['column'])} is significantly above (or below) each baseline "
             f"(mean difference in brackets) after Holm's correction over one family of {combined['family']} tests: "
             f"every baseline and ablation x temperature x {kind} ({stats.TEST_NAME}).", ""]
    if baselines:
        lines += ["| baseline | " + " | ".join(f"{kind} {g}" for g in groups) + " |", "|---|" + "---|" * len(groups)]
        lines += [f"| {display(b)} | " + " | ".join(group_summary(tests[g], b) for g in groups) + " |" for b in baselines]
    for g in groups:
        r = combined["per_group"][g]
        lines += [""] + ([f"Run folder of {kind} {g}: `{r['run_dir']}`", ""] if r.get("run_dir") else [])
        lines.append(render_markdown(r, heading="##"))
    return "\n".join(lines) + "\n"


def plot_groups(combined: dict, path: Path) -> None:
    """One column per group: levels on top, differences from the SFT policy below."""
    plt = pyplot()

    groups = combined["groups"]
    with_diff = [bool((combined["per_group"][g].get("paired") or {}).get("vs_sft")) for g in groups]
    rows = 2 if any(with_diff) else 1
    fig, axes = plt.subplots(rows, len(groups), figsize=(6 * len(groups), 4.2 * rows), squeeze=False)
    for j, g in enumerate(groups):
        draw_levels(axes[0][j], combined["per_group"][g])
        axes[0][j].set_title(f"{combined['kind']} {g}\n" + axes[0][j].get_title(), fontsize=9)
        if rows == 2:
            if with_diff[j]:
                draw_differences(axes[1][j], combined["per_group"][g])
            else:
                axes[1][j].axis("off")
    fig.tight_layout()
    save(fig, path, dpi=110)


def evaluate_models(cfg: PipelineConfig, layout: RunLayout, models: list[tuple[str, Path]], out_dir: Path) -> dict:
    """`madpo eval`: the SFT policy and the given model folders, judged like `madpo compare` on the
    validation split (a development figure; the sealed test split is `madpo compare --final`'s)."""
    entries = [(SFT_LABEL, -1, layout.model_dir("sft"))] + [(label, -1, Path(d)) for label, d in models]
    ids, prompts, _ = eval_prompts(cfg, layout)
    rows, timings = generate_for_models(cfg, entries, ids, prompts, Path(out_dir) / "generations")
    judged = judge_rows(cfg, layout, rows)
    return write_report(cfg, Path(out_dir), judged, prompts=len(ids), seeds=[-1],
                        models={label: str(d) for label, d in models}, generation=timings)


