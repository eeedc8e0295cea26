"""Scoring throughput (pairs/s): the Ray Data pass against a plain single-process loop, each with
two sequences per pair (the path before prefix sharing) and with the shared-prompt forward.

Both run the same frozen models (reference policy and reward model of the default run) over
the same tokenised pairs with the same batch size: the plain loop with every core as torch
threads in one process, Ray Data with one actor per core (1 thread each). Ray Data's time
includes its actors starting and loading the models and the parquet write; the cluster is
already up. Each path runs at two sizes, which separates its fixed cost per pass (start-up)
from its marginal rate (pairs/s once running): the first dominates small jobs, the second
large ones.

    .venv/bin/python bench/score_throughput.py [--sizes 512 2048]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import ROOT
from _pipeline import default_pipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs=2, default=[512, 1700])  # 1,700: the default run's pairs
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    from madpo_ray.models import load_causal_lm, load_reward_model, load_tokenizer
    from madpo_ray.runtime import init_ray
    from madpo_ray.stages.score import ComputePolicy, score_examples, score_with_ray

    p = default_pipeline()
    pool, _ = p.tokenized_pairs("train")
    examples = (pool * (max(args.sizes) // len(pool) + 1))[:max(args.sizes)]
    for ex in examples:
        ex.pop("margin", None)
        ex["split"] = "train"
    ref_dir, rm_dir = p.layout.stage_dir("sft") / "model", p.layout.stage_dir("reward") / "model"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    init_ray(p.cfg.ray)

    def layout(shared: bool) -> ComputePolicy:
        return ComputePolicy(pair_forward="shared_prompt" if shared else "two_sequence")

    def plain(examples, shared: bool) -> float:
        torch.set_num_threads(cores)
        t0 = time.perf_counter()
        tok = load_tokenizer(str(ref_dir))
        ref = load_causal_lm(str(ref_dir)).eval()
        rm = load_reward_model(str(rm_dir), pad_token_id=tok.pad_token_id).eval()
        with torch.no_grad():
            for i in range(0, len(examples), args.batch_size):
                score_examples(ref, rm, examples[i:i + args.batch_size], tok.pad_token_id, layout(shared))
        return time.perf_counter() - t0

    def with_ray(examples, shared: bool) -> float:
        torch.set_num_threads(1)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            score_with_ray(examples, ref_dir, rm_dir, Path(tmp) / "scored", batch_size=args.batch_size,
                           num_actors=cores, precision=layout(shared))
            return time.perf_counter() - t0

    paths = {"ray data, two-seq (before)": (with_ray, False), "plain loop, two-seq": (plain, False),
             "ray data, shared": (with_ray, True), "plain loop, shared (auto below 4,000 pairs)": (plain, True)}
    times: dict[str, dict[int, list[float]]] = {k: {n: [] for n in args.sizes} for k in paths}
    for _ in range(args.repeats):  # interleaved
        for n in args.sizes:
            for k, (fn, shared) in paths.items():
                times[k][n].append(fn(examples[:n], shared))
    small, large = args.sizes
    print(f"\nbatch {args.batch_size}, {cores} cores; median of {args.repeats} repeats")
    print(f"| path | pairs/s at {small} | pairs/s at {large} | fixed cost per pass s | marginal pairs/s |")
    print("| --- | --- | --- | --- | --- |")
    summary = {}
    for k, by_n in times.items():
        t1, t2 = (statistics.median(by_n[n]) for n in args.sizes)
        marginal = (large - small) / max(t2 - t1, 1e-9)
        fixed = t1 - small / marginal
        summary[k] = {"pairs_per_s": {small: small / t1, large: large / t2}, "marginal_pairs_per_s": marginal,
                      "fixed_seconds": fixed}
        print(f"| {k} | {small / t1:,.0f} | {large / t2:,.0f} | {fixed:.1f} | {marginal:,.0f} |")
    before, now = summary["ray data, two-seq (before)"], summary["plain loop, shared (auto below 4,000 pairs)"]
    print(f"\nscoring the default run's size ({large} pairs): auto path / before = "
          f"{now['pairs_per_s'][large] / before['pairs_per_s'][large]:.2f}x; shared / two-seq in the plain loop, "
          f"marginal: {summary['plain loop, shared (auto below 4,000 pairs)']['marginal_pairs_per_s'] / summary['plain loop, two-seq']['marginal_pairs_per_s']:.2f}x")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "score_throughput.json").write_text(json.dumps({"sizes": args.sizes, "seconds": times,
                                                            "summary": summary}, indent=2, default=str))


if __name__ == "__main__":
    main()
