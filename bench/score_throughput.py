"""Scoring throughput (pairs/s): the Ray Data pass against a plain single-process loop.

Both run the same frozen models (reference policy and reward model of the default run) over
the same tokenised pairs with the same batch size: the plain loop with every core as torch
threads in one process, Ray Data with one actor per core (1 thread each). Ray Data's time
includes its actors loading the models and the parquet write; the cluster is already up.

    .venv/bin/python bench/score_throughput.py [--pairs 1024]
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
    ap.add_argument("--pairs", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    from madpo_ray.models import load_causal_lm, load_reward_model, load_tokenizer
    from madpo_ray.runtime import init_ray
    from madpo_ray.stages.score import score_examples, score_with_ray

    p = default_pipeline()
    examples, _ = p._tokenized_pairs("train")
    examples = (examples * (args.pairs // len(examples) + 1))[:args.pairs]
    for ex in examples:
        ex.pop("margin", None)
        ex["split"] = "train"
    ref_dir, rm_dir = p.stage_dir("sft") / "model", p.stage_dir("reward") / "model"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    init_ray(p.cfg.ray)

    def plain() -> float:
        torch.set_num_threads(cores)
        t0 = time.perf_counter()
        tok = load_tokenizer(str(ref_dir))
        ref = load_causal_lm(str(ref_dir)).eval()
        rm = load_reward_model(str(rm_dir), pad_token_id=tok.pad_token_id).eval()
        with torch.no_grad():
            for i in range(0, len(examples), args.batch_size):
                score_examples(ref, rm, examples[i:i + args.batch_size], tok.pad_token_id)
        return time.perf_counter() - t0

    def with_ray() -> float:
        torch.set_num_threads(1)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            score_with_ray(examples, ref_dir, rm_dir, Path(tmp) / "scored", batch_size=args.batch_size,
                           num_actors=cores)
            return time.perf_counter() - t0

    times = {"plain loop": [], "ray data": []}
    for _ in range(args.repeats):
        times["plain loop"].append(plain())
        times["ray data"].append(with_ray())
    print(f"\n{len(examples)} pairs, batch {args.batch_size}, {cores} cores")
    print("| path | pairs/s median (min-max) |")
    print("| --- | --- |")
    rate = {}
    for k, ts in times.items():
        ps = [len(examples) / t for t in ts]
        rate[k] = statistics.median(ps)
        print(f"| {k} | {rate[k]:,.0f} ({min(ps):,.0f}-{max(ps):,.0f}) |")
    print(f"\nray data / plain loop: {rate['ray data'] / rate['plain loop']:.2f}x")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "score_throughput.json").write_text(json.dumps({"pairs": len(examples), "seconds": times,
                                                            "pairs_per_s": rate}, indent=2))


if __name__ == "__main__":
    main()
