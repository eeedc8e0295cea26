"""What a reward ensemble costs and how well its disagreement finds its errors, two ways:

- heads: reward.ensemble=K, K score heads on one backbone, each on its own bootstrap resample
  (one training);
- seeds: K reward models trained with K seeds (K trainings), their margins' mean and spread.

Both against one reward model trained the plain way, on the default preset in one process
(ray.backend=local), back to back, sharing the SFT model and the pairs. Cost: the reward stage's
training-loop seconds (train_seconds) and wall seconds; calibration: the Spearman correlation, on
the validation pairs, of the ensemble's margin std with the margin's error against the true
margins (data.margins.uncertainty_calibration), and its agreement with the true margins' signs.

    python bench/ensemble_cost.py --heads 5 [--out bench/results/ensemble_cost.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import torch

from madpo_ray.data.margins import uncertainty_calibration


def stage(runs: str, *sets: str) -> None:
    subprocess.run([sys.executable, "-m", "madpo_ray", "score", "--name", "cost", "ray.backend=local",
                    f"runs_dir={runs}", *sets], check=True, stdout=subprocess.DEVNULL)


def reward_cost(run: Path) -> dict:
    m = json.loads((run / "reward" / "metrics.json").read_text())
    t = json.loads((run / "reward" / "train_metrics.json").read_text())
    return {"wall_seconds": m["wall_seconds"], "train_seconds": t["train_seconds"]}


def validation_rows(run: Path) -> list[dict]:
    return pq.read_table(run / "score" / "scored" / "split=validation").to_pylist()


def summary(rows: list[dict], cost: dict) -> dict:
    cal = uncertainty_calibration(rows)
    agree = sum((r["margin"] > 0) == (r["true_margin"] > 0) for r in rows) / len(rows)
    return {**cost, "agrees_with_true_sign": agree,
            **({k: cal[k] for k in ("spearman_std_vs_abs_error", "spearman_std_vs_sign_error", "std_mean")}
               if cal else {})}


def seeds_ensemble(runs: str, run: Path, k: int) -> dict:
    """K reward models by seed: each one's validation margins, then their mean and sample std."""
    margins, cost = [], {"wall_seconds": 0.0, "train_seconds": 0.0}
    for seed in range(k):
        stage(runs, f"reward.optim.seed={seed + 1}")
        rows = validation_rows(run)
        margins.append(torch.tensor([r["margin"] for r in rows], dtype=torch.float64))
        for key, value in reward_cost(run).items():
            cost[key] += value
    stacked = torch.stack(margins)
    rows = [{**r, "margin": float(stacked[:, i].mean()), "margin_std": float(stacked[:, i].std())}
            for i, r in enumerate(rows)]
    return summary(rows, cost)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as runs:
        run = Path(runs) / "cost"
        stage(runs)
        results = {"single": summary(validation_rows(run), reward_cost(run))}
        stage(runs, f"reward.ensemble={args.heads}")
        results[f"heads{args.heads}"] = summary(validation_rows(run), reward_cost(run))
        results[f"seeds{args.heads}"] = seeds_ensemble(runs, run, args.heads)
    base = results["single"]["train_seconds"]
    print(f"{'reward model':14s} {'train s':>8s} {'x single':>9s} {'wall s':>7s} {'sign agree':>10s} "
          f"{'rho(std,|err|)':>15s} {'rho(std,sign err)':>18s}")
    for name, r in results.items():
        print(f"{name:14s} {r['train_seconds']:8.1f} {r['train_seconds'] / base:9.2f} {r['wall_seconds']:7.1f} "
              f"{r['agrees_with_true_sign']:10.3f} {r.get('spearman_std_vs_abs_error', float('nan')):15.3f} "
              f"{r.get('spearman_std_vs_sign_error', float('nan')):18.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
