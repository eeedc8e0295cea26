"""Generation throughput (tokens/s) of the vLLM backend against the transformers backend.

The default evaluation workload of `madpo eval` / `madpo compare`: the held-out prompts of the
default run (eval.num_prompts), every temperature of eval.temperatures, eval.samples_per_prompt
samples above 0 (one greedy draw at 0), eval.max_new_tokens. Both backends sample the default
run's policy in this process, one after the other, with every core: transformers with all cores
as torch threads, vLLM's CPU engine bound to all cores (its default binds one). vLLM's engine
start is reported apart; `madpo compare` pays it once and swaps weights for every further model.

    .venv/bin/python bench/generate_throughput.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics


def main() -> None:
    from _common import ROOT

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", type=int, default=13, help="Models in a comparison (4 methods x 3 seeds + SFT).")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from _pipeline import default_pipeline

    from madpo_ray.eval.heldout import eval_prompts
    from madpo_ray.generation import SampleSpec, TransformersGenerator, VLLMGenerator, sample_model, vllm_available

    p = default_pipeline()
    model = p.layout.stage_dir("sft") / "model"
    ids, prompts, _ = eval_prompts(p.cfg, p.layout)
    spec = SampleSpec.from_config(p.cfg)
    gens = {"transformers": TransformersGenerator()}
    if vllm_available():
        gens["vllm"] = VLLMGenerator(seed=0)
    stats: dict[str, list[dict]] = {k: [] for k in gens}
    greedy = {}
    for _ in range(args.repeats):
        for name, g in gens.items():
            rows, t = sample_model(g, str(model), "sft", ids, prompts, spec)
            stats[name].append(t)
            greedy[name] = [r["text"] for r in rows if r["temperature"] == 0]
    print(f"\n{len(ids)} prompts x temperatures {list(spec.temperatures)}, {spec.samples_per_prompt} samples above 0, "
          f"{spec.max_new_tokens} new tokens; SFT policy of the default run")
    print("| backend | tokens/s median (min-max) | completions | engine start / load s |")
    print("| --- | --- | --- | --- |")
    med = {}
    for name, ts in stats.items():
        tps = [t["tokens_per_s"] for t in ts]
        med[name] = statistics.median(tps)
        start = gens[name].engine_start_seconds if name == "vllm" else ts[0]["load_seconds"]
        print(f"| {name} | {med[name]:,.0f} ({min(tps):,.0f}-{max(tps):,.0f}) | {ts[0]['completions']} | {start:.1f} |")
    out = {"tokens_per_s": med, "runs": stats}
    if "vllm" in med:
        ratio = med["vllm"] / med["transformers"]
        same = sum(a == b for a, b in zip(greedy["vllm"], greedy["transformers"]))
        gen_s = {k: statistics.median(t["generate_seconds"] for t in stats[k]) for k in stats}
        n = args.models
        vllm_total = gens["vllm"].engine_start_seconds + n * gen_s["vllm"]
        hf_total = n * (gen_s["transformers"] + stats["transformers"][0]["load_seconds"])
        print(f"\nvllm / transformers: {ratio:.2f}x tokens/s; greedy text identical on {same}/{len(greedy['vllm'])} prompts")
        print(f"a {n}-model comparison: vLLM {vllm_total:.0f}s (one engine start + weight swaps) vs "
              f"transformers {hf_total:.0f}s = {hf_total / vllm_total:.2f}x")
        out.update(ratio=ratio, greedy_identical=same, comparison_seconds={"vllm": vllm_total, "transformers": hf_total})
        gens["vllm"].close()
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "generate_throughput.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
