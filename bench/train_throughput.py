"""Policy-training tokens/s: our DPO and MADPO steps against TRL's DPOTrainer, in one run.

Same model (the default tiny Llama), same pairs, same batch (8 pairs, no accumulation), same
sequence limits (prompt 192, total 256), one torch thread each. Variants:

  ours          our training loop (`engine.loop.fit`), reference log-probs precomputed by the
                scoring pass (our design), shared-prompt forward + length-grouped batches
                ("shared") or two sequences per pair + shuffled batches ("two-seq", the old path)
  ours+ref      the same loop recomputing the reference forward every step, as TRL does
  trl           TRL DPOTrainer, reference model recomputed every step (its default)
  trl-precomp   TRL with precompute_ref_log_probs=True (its pass is inside train_runtime)

tokens/s counts *logical* tokens, the same way on every side: 2P + C + R per pair (prompt twice,
each response once: what a two-sequence forward consumes), from our tokenisation of the same
texts, divided by wall time; prefix sharing therefore shows as speed, not as fewer tokens.
Padding share is padded / computed tokens. MFU uses PaLM's model-FLOPs per trained token
(6N + 12 L d T) against the measured GEMM rate of this CPU (no dense peak applies here).
Rows come in like-for-like groups: reference recomputed every step (ours two-seq, ours shared,
TRL); reference precomputed with the precompute inside the timed window (ours + its scoring
pass, TRL precompute); then our training loop alone.

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

    def extra_state(self) -> dict:
        return self.inner.extra_state()

    def with_reference(self, batch: dict) -> dict:
        from madpo_ray.pair_forward import pair_response_logprobs

        with torch.no_grad():
            c, r = pair_response_logprobs(self.ref, batch)
        return dict(batch, ref_logp_chosen=c.summed, ref_logp_rejected=r.summed)

    def begin_step(self, model, batches):
        """Passed through for losses that plan over the whole step (beta-DPO)."""
        inner = getattr(self.inner, "begin_step", None)
        if inner is not None:
            inner(model, [self.with_reference(b) for b in batches])

    def __call__(self, model, batch):
        return self.inner(model, self.with_reference(batch))


def run_ours(model_dir: Path, examples: list[dict], loss: str, steps: int, recompute_ref: bool,
             shared: bool = True) -> tuple[float, float]:
    """(training seconds, padding share) of `steps` optimiser steps through our fit() loop: the
    shared-prompt forward with length-grouped batches, or (shared=False) two sequences per pair
    with plain shuffled batches, the path before prefix sharing."""
    from madpo_ray.config import LossConfig, OptimConfig
    from madpo_ray.engine.loop import fit
    from madpo_ray.engine.sessions import LocalSession
    from madpo_ray.models import load_causal_lm, load_tokenizer
    from madpo_ray.pair_forward import pair_collator
    from madpo_ray.stages.policy import PolicyStep

    tok = load_tokenizer(str(model_dir))
    step = PolicyStep(LossConfig(name=loss), seed=0)
    model = load_causal_lm(str(model_dir))
    if recompute_ref:
        step = RecomputeReferenceStep(step, load_causal_lm(str(model_dir)))
    optim = OptimConfig(lr=1e-5, per_device_batch_size=BATCH, effective_batch_size=BATCH, max_steps=steps,
                        epochs=100, report_every=steps, checkpoint_every=10_000, group_by_length=shared)
    collate = pair_collator(model, tok.pad_token_id, "shared_prompt" if shared else "two_sequence")
    result = fit(model, [dict(e) for e in examples], collate, step, optim, stage=f"bench/{loss}", session=LocalSession())
    return result.metrics["train_seconds"], result.metrics["padding_share"]


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


def score_pass(model, tok, examples: list[dict], shared: bool) -> tuple[list[dict], float]:
    """The reference forward once per pair (our precompute), timed."""
    from madpo_ray.stages.score import ComputePolicy, score_examples

    policy = ComputePolicy(pair_forward="shared_prompt" if shared else "two_sequence")
    t0 = time.perf_counter()
    scored = []
    with torch.no_grad():
        for i in range(0, len(examples), 32):
            scored += score_examples(model, _ZeroReward(), examples[i:i + 32], tok.pad_token_id, policy)
    return scored, time.perf_counter() - t0


def variants(model_dir, model, tok, rows, examples, steps: int, with_trl: bool, out: Path) -> dict:
    """name -> a function returning (seconds, padding share). Like-for-like pairs first."""
    def ours(loss, recompute, shared, with_scoring=False):
        def run():
            scored, score_s = score_pass(model, tok, examples, shared)
            secs, pad = run_ours(model_dir, scored, loss, steps, recompute, shared)
            return secs + (score_s if with_scoring else 0.0), pad
        return run

    v = {"ours+ref dpo, two-seq": ours("dpo", True, False), "ours+ref dpo, shared": ours("dpo", True, True)}
    if with_trl:
        v["trl dpo"] = lambda: (run_trl(model_dir, rows, steps, False, out / "trl"), None)
    v.update({"ours dpo + scoring pass, two-seq": ours("dpo", False, False, True),
              "ours dpo + scoring pass, shared": ours("dpo", False, True, True)})
    if with_trl:
        v["trl-precomp dpo"] = lambda: (run_trl(model_dir, rows, steps, True, out / "trl"), None)
    v.update({"ours dpo, two-seq": ours("dpo", False, False), "ours dpo, shared": ours("dpo", False, True),
              "ours madpo, shared": ours("madpo", False, True)})
    return v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-trl", action="store_true", help="Skip TRL (when the bench extra is not installed).")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from madpo_ray.data.collate import tokenize_pairs
    from madpo_ray.models import load_causal_lm, load_tokenizer
    from madpo_ray.console import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(1)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    model_dir = default_model(out / "tiny_base")
    tok, model = load_tokenizer(str(model_dir)), load_causal_lm(str(model_dir))
    rows = load_pairs(args.steps * BATCH)
    examples = tokenize_pairs(tok, rows, MAX_PROMPT, MAX_LEN)
    tokens_per_pair = statistics.mean(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"])
                                      for e in examples)
    peak, fpt = gemm_flops(), model_flops_per_token(model, tokens_per_pair / 2)
    print(f"model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {len(examples)} pairs, "
          f"{tokens_per_pair:.0f} logical tokens/pair (2P+C+R), batch {BATCH}, {args.steps} steps, 1 thread; "
          f"measured fp32 GEMM rate 1024^3: {peak / 1e9:.1f} GFLOP/s")
    runs = variants(model_dir, model, tok, rows, examples, args.steps, not args.no_trl, out)
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    padding: dict[str, list] = {k: [] for k in runs}
    for _ in range(args.repeats):  # interleaved, so drift hits every variant alike
        for name, fn in runs.items():
            secs, pad = fn()
            seconds[name].append(secs)
            padding[name].append(pad)
    report(seconds, padding, args.steps * BATCH * tokens_per_pair, fpt, peak, out, tokens_per_pair)


def report(seconds: dict, padding: dict, tokens: float, fpt: float, peak: float, out: Path, tokens_per_pair) -> None:
    print("\n| variant | logical tokens/s median (min-max) | padding share | effective MFU (logical-token FLOPs / measured GEMM rate) |")
    print("| --- | --- | --- | --- |")
    med = {}
    for name, secs in seconds.items():
        tps = [tokens / x for x in secs]
        med[name] = statistics.median(tps)
        # A reference forward is 1/3 of a training step's FLOPs; count it where it is done each step.
        flops = fpt * (4 / 3 if ("+ref" in name or name == "trl dpo") else 1)
        pads = [x for x in padding[name] if x is not None]
        pad = f"{100 * statistics.median(pads):.1f}%" if pads else "-"
        print(f"| {name} | {med[name]:,.0f} ({min(tps):,.0f}-{max(tps):,.0f}) | {pad} | "
              f"{100 * med[name] * flops / peak:.1f}% |")
    ratios = {"shared / two-seq, ours dpo": ("ours dpo, shared", "ours dpo, two-seq"),
              "shared / two-seq, ours+ref dpo": ("ours+ref dpo, shared", "ours+ref dpo, two-seq"),
              "ours+ref dpo two-seq / trl dpo (same work)": ("ours+ref dpo, two-seq", "trl dpo"),
              "ours+ref dpo shared / trl dpo (same work)": ("ours+ref dpo, shared", "trl dpo"),
              "ours dpo + scoring, shared / trl-precomp dpo (same work)": ("ours dpo + scoring pass, shared",
                                                                           "trl-precomp dpo"),
              "madpo / dpo step time, shared": ("ours dpo, shared", "ours madpo, shared")}
    print()
    for label, (a, b) in ratios.items():
        if a in med and b in med:
            print(f"{label}: {med[a] / med[b]:.2f}x")
    (out / "train_throughput.json").write_text(json.dumps(
        {"tokens_per_pair": tokens_per_pair, "gemm_flops": peak, "flops_per_token": fpt, "seconds": seconds,
         "padding_share": padding, "median_tokens_per_s": med}, indent=2))


class _ZeroReward(torch.nn.Module):
    """Stands in for the reward model in the scoring pass timing: the benchmark is about the
    reference forward the policy loop needs; the reward model's cost is bench/score_throughput.py's.
    Its `score` head (all zeros) is what our reward readers hook."""

    def __init__(self):
        super().__init__()
        self.score = torch.nn.Identity()

    def forward(self, input_ids=None, **_):
        from types import SimpleNamespace

        scores = self.score(torch.zeros(input_ids.shape[0], input_ids.shape[1], 1))
        return SimpleNamespace(logits=scores[:, -1])


if __name__ == "__main__":
    main()
