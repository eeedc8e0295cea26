"""What each training stage of the default `madpo run` pays outside its training loop, for two
source trees back to back (a change and what it changes), or read from finished run folders.

    python bench/stage_fixed_cost.py --src /path/to/old/checkout --src . --repeats 1
    python bench/stage_fixed_cost.py --read runs/a runs/b

Each run is the default preset on the Ray path (one `madpo run`, a fresh local cluster, its
own runs_dir), the trees taking turns. Per stage: wall seconds (the driver's, from start to
DONE), the training loop's own seconds (`train_seconds`, from the loop's first step to its
last), their difference (the fixed cost: tokenising, handing the examples over, starting or
reaching the workers, loading the model, the final save), and the workers' start where the
summary reports it apart (`workers_start_seconds`, runs with one worker group).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAININGS = ("sft", "reward", "policy")


def run_default(src: Path, runs: Path) -> Path:
    env = {**os.environ, "PYTHONPATH": str(src)}
    subprocess.run([sys.executable, "-m", "madpo_ray", "run", "--name", "bench", f"runs_dir={runs}"], cwd=src, env=env,
                   check=True, stdout=subprocess.DEVNULL)
    return runs / "bench"


def stage_costs(run: Path) -> dict:
    """{stage: {wall, loop, fixed}} (training stages) and the run's stage total and workers' start."""
    metrics = {p.parent.relative_to(run).parts[0]: json.loads(p.read_text())
               for p in [*run.glob("*/metrics.json"), *run.glob("policy/*/metrics.json")]}
    out = {}
    for stage in TRAININGS:
        wall, loop = metrics[stage]["wall_seconds"], metrics[stage]["train_seconds"]
        out[stage] = {"wall": wall, "loop": loop, "fixed": wall - loop}
    stages = [m.get("wall_seconds", 0.0) for m in metrics.values()]
    summary = json.loads((run / "summary.json").read_text())
    return {"stages": out, "all_stages_s": sum(stages), "workers_start_s": summary.get("workers_start_seconds")}


def table(results: dict[str, list[dict]]) -> str:
    lines = ["| tree | repeat | stage | wall s | loop s | outside the loop s |", "| --- | --- | --- | --- | --- | --- |"]
    for tree, runs in results.items():
        for i, r in enumerate(runs):
            for stage, c in r["stages"].items():
                lines.append(f"| {tree} | {i} | {stage} | {c['wall']:.1f} | {c['loop']:.1f} | {c['fixed']:.1f} |")
            start = r["workers_start_s"]
            lines.append(f"| {tree} | {i} | all stages | {r['all_stages_s']:.1f} | | workers' start "
                         f"{'(in each stage)' if start is None else f'{start:.1f} once'} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, action="append", default=[], help="A source tree (give two).")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--read", type=Path, nargs="+", help="Only read these finished run folders.")
    args = ap.parse_args()
    if args.read:
        print(table({str(r): [stage_costs(r)] for r in args.read}))
        return 0
    results: dict[str, list[dict]] = {str(s): [] for s in args.src}
    for _ in range(args.repeats):
        for src in args.src:
            with tempfile.TemporaryDirectory() as runs:
                t0 = time.time()
                results[str(src)].append(stage_costs(run_default(src.resolve(), Path(runs))))
                print(f"{src}: {time.time() - t0:.0f} s", file=sys.stderr)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
