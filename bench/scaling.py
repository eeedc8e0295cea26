"""Data-parallel scaling of policy training: the same global batch on 1 and 2 Ray Train workers.

Each worker has one CPU and one torch thread (DDP over gloo). Reported separately:
  startup   stage wall time outside the training loop: TorchTrainer start (workers, process group,
            model load) and the final model save
  steady    tokens/s inside the loop, all workers together
Efficiency = (2-worker steady tokens/s) / (2 x 1-worker steady tokens/s).

    .venv/bin/python bench/scaling.py [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics

from _common import ROOT
from _pipeline import clone_until_policy, default_pipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--report-every", type=int, default=20, help="Steps between ray.train.report calls.")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    src = default_pipeline()
    rows = {1: [], 2: []}
    for r in range(args.repeats):
        for workers in (1, 2):
            p = clone_until_policy(src, f"bench-scaling-{workers}", [
                f"ray.num_workers={workers}", f"policy.optim.per_device_batch_size={args.global_batch // workers}",
                f"policy.optim.effective_batch_size={args.global_batch}", f"policy.optim.max_steps={args.steps}",
                f"policy.optim.report_every={args.report_every}", "policy.optim.checkpoint_every=1000", "policy.loss.name=madpo"])
            m = p.run(("policy",))["policy"]
            startup = m["wall_seconds"] - m["train_seconds"]
            rows[workers].append({"tokens_per_s": m["tokens_per_s"], "train_seconds": m["train_seconds"],
                                  "startup_seconds": startup, "wall_seconds": m["wall_seconds"]})
            print(f"  repeat {r}: {workers} worker(s): {m['tokens_per_s']:,.0f} tok/s in the loop, "
                  f"startup {startup:.1f}s, wall {m['wall_seconds']:.1f}s", flush=True)
    med = {w: {k: statistics.median(x[k] for x in rows[w]) for k in rows[w][0]} for w in rows}
    eff = med[2]["tokens_per_s"] / (2 * med[1]["tokens_per_s"])
    print(f"\nglobal batch {args.global_batch}, {args.steps} steps, report every {args.report_every}, MADPO loss, "
          "default tiny model")
    print("| workers | steady tokens/s | TorchTrainer startup s | wall s |")
    print("| --- | --- | --- | --- |")
    for w in (1, 2):
        print(f"| {w} | {med[w]['tokens_per_s']:,.0f} | {med[w]['startup_seconds']:.1f} | {med[w]['wall_seconds']:.1f} |")
    print(f"\n2 workers / 1 worker: {med[2]['tokens_per_s'] / med[1]['tokens_per_s']:.2f}x steady-state "
          f"(scaling efficiency {eff:.0%}); wall time ratio {med[1]['wall_seconds'] / med[2]['wall_seconds']:.2f}x")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps({"runs": rows, "median": med, "efficiency": eff}, indent=2))


if __name__ == "__main__":
    main()
