"""Policy-training tokens/s: our DPO and MADPO steps against TRL's DPOTrainer, in one run.

Same model (the default tiny Llama), same pairs, same batch (8 pairs, no accumulation), same
sequence limits (prompt 192, total 256), one torch thread each. Variants:

  ours          our training loop (`engine.loop.fit`), reference log-probs precomputed by the
                scoring pass (our design); the scoring pass's own cost is reported separately
  ours+ref      the same loop recomputing the reference forward every step, as TRL does
  trl           TRL DPOTrainer, reference model recomputed every step (its default)
  trl-precomp   TRL with precompute_ref_log_probs=True (its pass is inside train_runtime)

tokens/s counts the non-pad tokens of every chosen and rejected sequence consumed (prompt +
response), from our tokenisation of the same texts, divided by training wall time. MFU uses
PaLM's model-FLOPs per trained token (6N + 12 L d T) against a GEMM measured in this run.

    .venv/bin/python bench/train_throughput.py [--steps 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
import warnings
from pathlib import Path

from _common import ROOT, default_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

BATCH, MAX_PROMPT, MAX_LEN = 8, 192, 256


def load_pairs(n: int) -> list[dict]:
    """The default run's training pairs if present, else reference-vs-other-document pairs."""
    from madpo_ray.io import read_jsonl

    f = ROOT / "runs" / "tiny" / "pairs" / "train.jsonl"
    if f.exists():
        rows = read_jsonl(f)
    else:
        from madpo_ray.data.corpus.generated import generate_corpus

        docs = generate_corpus(n + 1)
        rows = [{"prompt": f"{d.document}\nTL;DR:", "chosen": " " + d.reference, "rejected": " " + docs[i + 1].reference}
                for i, d in enumerate(docs[:-1])]
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows[:n]]


def gemm_flops(size: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * size ** 3 / min(times)


def model_flops_per_token(model, seq_len: float) -> float:
    cfg = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    n += cfg.vocab_size * cfg.hidden_size  # the (tied) output projection is a matmul per token
    return 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


class RecomputeReferenceStep:
    """Our step with the reference forward done every step (the TRL-equivalent workload)."""

    def __init__(self, inner, ref_model):
        self.inner, self.ref = inner, ref_model.eval()
        self.beta_state = inner.beta_state

    def __call__(self, model, batch):
        from madpo_ray.logprobs import sequence_logprobs

        with torch.no_grad():
            lp = sequence_logprobs(self.ref, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        c, r = lp.summed.chunk(2)
        batch = dict(batch, ref_logp_chosen=c, ref_logp_rejected=r)
        return self.inner(model, batch)


def run_ours(model_dir: Path, examples: list[dict], loss: str, steps: int, recompute_ref: bool) -> float:
    """Training seconds of `steps` optimiser steps through our fit() loop."""
    from madpo_ray.config import LossConfig, OptimConfig
    from madpo_ray.data.collate import PairCollator
    from madpo_ray.models import load_causal_lm, load_tokenizer
    from madpo_ray.engine.loop import fit
    from madpo_ray.engine.sessions import LocalSession
    from madpo_ray.stages.policy import PolicyStep

    tok = load_tokenizer(str(model_dir))
    step = PolicyStep(LossConfig(name=loss), seed=0)
    if recompute_ref:
        step = RecomputeReferenceStep(step, load_causal_lm(str(model_dir)))
    optim = OptimConfig(lr=1e-5, per_device_batch_size=BATCH, effective_batch_size=BATCH, max_steps=steps,
                        epochs=100, report_every=10_000, checkpoint_every=10_000)
    result = fit(load_causal_lm(str(model_dir)), [dict(e) for e in examples], PairCollator(tok.pad_token_id), step,
                 optim, stage=f"bench/{loss}", session=LocalSession())
    return result.metrics["train_seconds"]


def run_trl(model_dir: Path, rows: list[dict], steps: int, precompute: bool, out: Path) -> float:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from madpo_ray.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(model_dir))
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                     max_steps=steps, learning_rate=1e-5, beta=0.1, max_length=MAX_LEN, use_cpu=True, bf16=False,
                     report_to="none", save_strategy="no", logging_steps=10_000, dataloader_num_workers=0,
                     precompute_ref_log_probs=precompute, disable_tqdm=True, seed=0)
    trainer = DPOTrainer(model=load_causal_lm(str(model_dir)), ref_model=load_causal_lm(str(model_dir)), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tok)
    return trainer.train().metrics["train_runtime"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-trl", action="store_true", help="Skip TRL (when the bench extra is not installed).")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from madpo_ray.stages.worker import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(1)

    from madpo_ray.data.collate import tokenize_pairs
    from madpo_ray.models import load_causal_lm, load_tokenizer
    from madpo_ray.stages.score import score_examples

    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    model_dir = default_model(out / "tiny_base")
    tok = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir))
    n_pairs = args.steps * BATCH
    rows = load_pairs(n_pairs)
    examples = tokenize_pairs(tok, rows, MAX_PROMPT, MAX_LEN)
    tokens_per_pair = statistics.mean(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"])
                                      for e in examples)
    seq_len = tokens_per_pair / 2
    # The scoring pass: reference log-probs (and, in the pipeline, reward margins) once per pair.
    t0 = time.perf_counter()
    scored = []
    with torch.no_grad():
        for i in range(0, len(examples), 32):
            scored += score_examples(model, _ZeroReward(), examples[i:i + 32], tok.pad_token_id)
    score_s = time.perf_counter() - t0

    peak = gemm_flops()
    fpt = model_flops_per_token(model, seq_len)
    params = sum(p.numel() for p in model.parameters())
    print(f"model {params / 1e6:.2f}M params, {len(examples)} pairs, {tokens_per_pair:.0f} tokens/pair, batch {BATCH}, "
          f"{args.steps} steps, 1 thread; fp32 GEMM 1024^3: {peak / 1e9:.1f} GFLOP/s")

    variants = {"ours dpo": lambda: run_ours(model_dir, scored, "dpo", args.steps, False),
                "ours madpo": lambda: run_ours(model_dir, scored, "madpo", args.steps, False),
                "ours+ref dpo": lambda: run_ours(model_dir, scored, "dpo", args.steps, True)}
    if not args.no_trl:
        variants["trl dpo"] = lambda: run_trl(model_dir, rows, args.steps, False, out / "trl")
        variants["trl-precomp dpo"] = lambda: run_trl(model_dir, rows, args.steps, True, out / "trl")
    seconds: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.repeats):  # interleaved, so drift hits every variant alike
        for name, fn in variants.items():
            seconds[name].append(fn())
    tokens = args.steps * BATCH * tokens_per_pair
    results = {}
    print(f"\n| variant | tokens/s median (min-max) | MFU | vs trl dpo |")
    print("| --- | --- | --- | --- |")
    base = statistics.median([tokens / s for s in seconds["trl dpo"]]) if "trl dpo" in seconds else None
    for name, secs in seconds.items():
        tps = [tokens / s for s in secs]
        med = statistics.median(tps)
        # A reference forward is 1/3 of a training step's FLOPs; count it where it is done.
        flops = fpt * (4 / 3 if ("+ref" in name or name == "trl dpo") else 1)
        results[name] = {"tokens_per_s": tps, "median": med, "mfu": med * flops / peak}
        ratio = f"{med / base:.2f}x" if base else "-"
        print(f"| {name} | {med:,.0f} ({min(tps):,.0f}-{max(tps):,.0f}) | {100 * med * flops / peak:.1f}% | {ratio} |")
    step_ratio = statistics.median(a / b for a, b in zip(seconds["ours madpo"], seconds["ours dpo"]))
    score_tps = len(examples) * tokens_per_pair / score_s
    ours_all_in = tokens / (statistics.median(seconds["ours dpo"]) + score_s)
    print(f"\nMADPO / DPO step time (ours, median of paired repeats): {step_ratio:.3f}")
    print(f"scoring pass (reference forward once per pair): {score_s:.1f}s for {len(examples)} pairs; "
          f"ours dpo including it: {ours_all_in:,.0f} tok/s" + (f" = {ours_all_in / base:.2f}x trl dpo" if base else ""))
    if base:
        print(f"ours dpo / trl dpo: {results['ours dpo']['median'] / base:.2f}x   "
              f"ours+ref dpo / trl dpo (same work): {results['ours+ref dpo']['median'] / base:.2f}x")
    (out / "train_throughput.json").write_text(json.dumps(
        {"steps": args.steps, "batch": BATCH, "tokens_per_pair": tokens_per_pair, "gemm_flops": peak,
         "flops_per_token": fpt, "params": params, "seconds": seconds, "results": results,
         "madpo_over_dpo_step_time": step_ratio, "score_seconds": score_s, "score_tokens_per_s": score_tps}, indent=2))


class _ZeroReward(torch.nn.Module):
    """Stands in for the reward model in the scoring pass timing: the benchmark is about the
    reference forward the policy loop needs; the reward model's cost is bench/score_throughput.py's."""

    def forward(self, input_ids=None, attention_mask=None, **_):
        from types import SimpleNamespace

        return SimpleNamespace(logits=torch.zeros(input_ids.shape[0], 1))


if __name__ == "__main__":
    main()
