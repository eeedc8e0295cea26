"""`madpo runs`: the run folders under a runs_dir, with how far each got and its key numbers.

Read from the run folders themselves (config.yaml, the stages' DONE records, summary.json), so
it lists runs made before tracking existed and needs no MLflow server; the curves are in each
run's mlruns/ and tensorboard/.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from madpo_ray.layout import STAGES, RunLayout

# summary.json key -> column: what people compare runs by first.
KEY_METRICS = {
    "sft_greedy_gold_reward": "gold SFT",
    "policy_greedy_gold_reward": "gold policy",
    "policy_preference_accuracy": "pref acc",
}


def stages_done(run_dir: Path) -> list[str]:
    """Finished stages in pipeline order; a policy stage per loss ("policy/dpo")."""
    layout, done = RunLayout(run_dir), []
    for stage in STAGES:
        if stage == "policy":
            losses = sorted(d.name for d in layout.stage_dir("policy").parent.glob("*") if d.is_dir())
            done += [f"policy/{loss}" for loss in losses if RunLayout(run_dir, loss).is_done("policy")]
        elif layout.is_done(stage):
            done.append(stage)
    return done


def read_summary(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def run_row(run_dir: Path) -> dict:
    """One run: name, last change, finished stages, the loss of its summary, its key numbers."""
    summary = read_summary(run_dir)
    validation = (summary.get("margins") or {}).get("validation") or {}
    newest = max((p.stat().st_mtime for p in run_dir.glob("*") if p.exists()), default=run_dir.stat().st_mtime)
    row = {"name": run_dir.name, "path": str(run_dir), "modified": time.strftime("%Y-%m-%d %H:%M", time.localtime(newest)),
           "stages": stages_done(run_dir), "loss": summary.get("loss"),
           "rm_accuracy_validation": validation.get("rm_accuracy_vs_labels")}
    row.update({key: summary.get(key) for key in KEY_METRICS})
    return row


def list_runs(runs_dir: Path) -> list[dict]:
    """Every folder under runs_dir that holds a run (a config.yaml), newest first."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"no runs folder at {runs_dir}")
    rows = [run_row(d) for d in runs_dir.iterdir() if (d / "config.yaml").exists()]
    return sorted(rows, key=lambda r: r["modified"], reverse=True)


def format_value(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.3f}"


def progress_text(stages: list[str]) -> str:
    """"complete", or how far the pipeline got ("through reward"); the trained policies apart."""
    plain = [s for s in stages if not s.startswith("policy/")]
    if not plain:
        return "none"
    return "complete" if plain[-1] == STAGES[-1] and len(plain) == len(STAGES) - 1 else f"through {plain[-1]}"
