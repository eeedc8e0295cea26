"""Every training's per-step losses on the default preset, for showing that a refactoring changed
no number: run it on the source tree before and after, then compare the two files.

    python bench/loss_trajectories.py --src /path/to/old/checkout --out before.json
    python bench/loss_trajectories.py --src . --out after.json
    python bench/loss_trajectories.py --compare before.json after.json

One `madpo run` in one process (ray.backend=local: no cluster, the same thread count each time)
trains SFT, the reward model and the MADPO policy; `madpo train --loss L` then trains every other
registered loss from the same scored pairs. Written: {training: [loss per optimiser step]}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# madpo_expected needs each pair's margin_std (a reward-model ensemble), which the default does not score.
LOSSES = ("dpo", "ipo", "beta_dpo", "madpo_amplify", "madpo_regularize")


def madpo(src: Path, *args: str) -> None:
    """The CLI of the package in `src` (run from there, so that tree's madpo_ray is imported)."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    subprocess.run([sys.executable, "-m", "madpo_ray", *args], cwd=src, env=env, check=True,
                   stdout=subprocess.DEVNULL)


def trajectories(src: Path) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as runs:
        sets = ["ray.backend=local", f"runs_dir={runs}"]
        madpo(src, "run", "--name", "traj", *sets)
        for loss in LOSSES:
            madpo(src, "train", "--name", "traj", "--loss", loss, *sets)
        return read_trajectories(Path(runs) / "traj")


def read_trajectories(run: Path) -> dict[str, list[float]]:
    """{training folder: its loss per optimiser step} of a run folder."""
    return {p.parent.relative_to(run).as_posix(): json.loads(p.read_text())["loss_history"]
            for p in sorted(run.rglob("train_metrics.json"))}


def compare(before: Path, after: Path) -> int:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    differ = 0
    for name in sorted(set(a) | set(b)):
        x, y = a.get(name), b.get(name)
        same = x == y
        worst = max((abs(u - v) for u, v in zip(x or [], y or [])), default=float("nan"))
        print(f"{name:28s} steps {len(x or []):4d} / {len(y or []):4d}  "
              f"{'identical' if same else f'DIFFER (largest difference {worst:.3g})'}")
        differ += not same
    return 1 if differ else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=Path("."), help="The source tree whose madpo_ray runs.")
    ap.add_argument("--out", type=Path, help="Where to write the trajectories (JSON).")
    ap.add_argument("--compare", type=Path, nargs=2, metavar=("BEFORE", "AFTER"))
    ap.add_argument("--read", type=Path, metavar="RUN", help="Only read the trajectories of this run folder.")
    args = ap.parse_args()
    if args.compare:
        return compare(*args.compare)
    found = read_trajectories(args.read) if args.read else trajectories(args.src.resolve())
    args.out.write_text(json.dumps(found, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
