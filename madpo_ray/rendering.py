"""What the command line prints at the end of a command: the run summary's table and margin
line, a comparison's table and its verdicts. The commands themselves are in cli.py."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

console = Console()


STAGE_PREFIXES = ("sft_", "reward_", "policy_")


def summary_rows(summary: dict) -> list[tuple[str, ...]]:
    """(metric, SFT, reward model, policy) rows of the run summary's numbers: "sft_x", "reward_x"
    and "policy_x" side by side; a number of no stage in the last column. Timings ("..._seconds")
    are summary.md's, not the at-a-glance table's."""
    def fmt(v) -> str:
        return "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    numbers = {k: v for k, v in summary.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith("_seconds")}
    rows: dict[str, list[str]] = {}
    for key, value in numbers.items():
        prefix = next((p for p in STAGE_PREFIXES if key.startswith(p)), None)
        metric = key[len(prefix):] if prefix else key
        column = STAGE_PREFIXES.index(prefix) if prefix else 2
        rows.setdefault(metric.replace("_", " "), ["", "", ""])[column] = fmt(value)
    return [(metric, *cells) for metric, cells in rows.items()]


def print_summary(summary: dict, run_dir=None) -> None:
    """The key numbers at a glance; the margins table, examples and timings are in summary.md."""
    table = Table(title=f"madpo run summary (loss: {summary.get('loss')}; validation split)")
    for name in ("metric", "SFT", "reward model", "policy"):
        table.add_column(name, justify="left" if name == "metric" else "right")
    for row in summary_rows(summary):
        table.add_row(*row)
    console.print(table)
    if "margins" in summary:
        print_margin_line(summary["margins"])
    for split, comp in (summary.get("pair_composition") or {}).items():
        console.print(f"{split} pairs: {comp['pairs']} by design {comp['by_design']}; duplicates {comp['duplicates']}, "
                      f"off design {comp['off_design']}, skipped draws {sum(comp['skipped'].values())}",
                      highlight=False, soft_wrap=True)
    examples = summary.get("examples", {})
    for label, texts in list(examples.items())[-1:]:
        ref = (summary.get("example_references") or [""])[0]
        console.print(f"[bold]{label}[/bold]: {texts[0]!r}  [dim](reference: {ref!r})[/dim]", soft_wrap=True)
    if run_dir is not None:
        console.print(f"full summary: {run_dir}/summary.md", soft_wrap=True, highlight=False)


def print_margin_line(report: dict) -> None:
    """One line on the margins: how far the reward model reaches into MADPO's weighting."""
    w, val = report["weighting"], report.get("validation") or report.get("train") or {}
    train = report.get("train") or {}
    source = "the dataset's margin column" if report.get("margins_from") == "data" else "the reward model"
    parts = [f"margins from {source} (validation): agree with labels {val.get('rm_accuracy_vs_labels', float('nan')):.2f}"]
    if val.get("spearman_rm_vs_true") is not None:
        parts.append(f"Spearman with true margins {val['spearman_rm_vs_true']:.2f}")
    parts.append(f"train pairs with |m| > tau {w['tau']:.2f}: {train.get('share_abs_margin_above_tau', 0):.1%}")
    console.print("; ".join(parts), soft_wrap=True, highlight=False)
    if "plot" in report:
        console.print(f"margins and weights: {report['plot']}", soft_wrap=True, highlight=False)
    if report.get("calibration"):
        cal = report["calibration"]
        rho = {k: "n/a" if cal[k] is None else f"{cal[k]:.2f}"
               for k in ("spearman_std_vs_abs_error", "spearman_std_vs_sign_error")}
        console.print(f"reward ensemble (validation): Spearman of its disagreement with its error "
                      f"{rho['spearman_std_vs_abs_error']}, with a wrong sign {rho['spearman_std_vs_sign_error']}; "
                      f"{report['calibration_plot']}", soft_wrap=True, highlight=False)


def print_comparison(results: dict, title: str) -> None:
    col = results["column"]
    temps = results["temperatures"]
    table = Table(title=title + (f" (tier {results['tier']})" if results.get("tier") else ""))
    table.add_column("method")
    for t in temps:
        table.add_column(f"T={t:g}", justify="right")
    methods = list(dict.fromkeys(r["method"] for r in results["table"]))
    by = {(r["method"], r["temperature"]): r[col] for r in results["table"]}
    for m in methods:
        table.add_row(m, *[f"{by[(m, t)]['mean']:.3f} ±{(by[(m, t)]['ci_high'] - by[(m, t)]['ci_low']) / 2:.2f}"
                           for t in temps])
    console.print(table)


def verdicts(results: dict) -> list[str]:
    """The verdict lines of one comparison's Holm-corrected tests (empty when there are none)."""
    return [r["verdict"] for r in comparison_tests(results).get("rows", [])]


def comparison_tests(results: dict) -> dict:
    return (results.get("paired") or {}).get("tests") or {}


def print_verdicts(results: dict) -> None:
    tests = comparison_tests(results)
    if results.get("protocol"):
        console.print(f"[bold]{results['protocol']['title']}[/bold]")
    if tests:
        console.print(f"Holm-adjusted p, family of {tests['family']} tests:", highlight=False)
        for line in verdicts(results):
            console.print(f"  {line}", highlight=False)
