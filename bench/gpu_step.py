"""GPU check of the policy training step (no Ray needed): the same `sequence_logprobs` and
registered losses the Ray workers use, on CUDA.

1. Agreement: the tiny model's MADPO loss and gradients on CPU and GPU (float32) match.
2. Speed: tokens/s of a full step (forward on chosen+rejected, loss, backward, AdamW) for DPO
   and MADPO, float32 and bf16 autocast, on a tiny and a ~125M-parameter Llama; MADPO/DPO
   step-time ratio (the cost of the weighting); model FLOPs utilisation against a bf16 GEMM
   measured in the same run.

    python bench/gpu_step.py            # needs a CUDA device
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from madpo_ray.losses import DataParallel, PolicyLossInputs, get_policy_loss  # noqa: E402
from madpo_ray.logprobs import sequence_logprobs  # noqa: E402


def llama(vocab: int, width: int, layers: int, heads: int, inter: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def batch(vocab: int, pairs: int, prompt: int, response: int, device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = prompt + response
    ids = torch.randint(3, vocab, (2 * pairs, t), generator=g)
    ids[pairs:, :prompt] = ids[:pairs, :prompt]  # chosen and rejected share the prompt
    attn = torch.ones_like(ids)
    resp = torch.zeros_like(ids)
    resp[:, prompt:] = 1
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "response_mask": resp.to(device),
            "ref_c": (-torch.rand(pairs, generator=g) * 50 - 200).to(device),
            "ref_r": (-torch.rand(pairs, generator=g) * 50 - 200).to(device),
            "len": torch.full((pairs,), float(response), device=device),
            "margin": (torch.randn(pairs, generator=g) * 4).to(device)}


def loss_of(model, b: dict, loss: str):
    lp = sequence_logprobs(model, b["input_ids"], b["attention_mask"], b["response_mask"]).summed
    c, r = lp.chunk(2)
    x = PolicyLossInputs(c, r, b["ref_c"], b["ref_r"], chosen_lengths=b["len"], rejected_lengths=b["len"],
                         margins=b["margin"])
    fn = get_policy_loss(loss)
    return fn.reduce(fn(x, beta=0.1), DataParallel())


def agreement() -> dict:
    model = llama(2048, 128, 2, 4, 256)
    b_cpu = batch(2048, 4, 48, 16, "cpu")
    l_cpu = loss_of(model, b_cpu, "madpo")
    l_cpu.backward()
    g_cpu = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    model.cuda()
    l_gpu = loss_of(model, {k: v.cuda() for k, v in b_cpu.items()}, "madpo")
    l_gpu.backward()
    g_gpu = torch.cat([p.grad.flatten() for p in model.parameters()]).cpu()
    rel = float((g_cpu - g_gpu).norm() / g_cpu.norm())
    return {"loss_cpu": l_cpu.item(), "loss_gpu": l_gpu.item(), "grad_rel_diff": rel,
            "ok": abs(l_cpu.item() - l_gpu.item()) < 1e-4 and rel < 1e-3}


def gemm_tflops(n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def step_speed(model, b: dict, loss: str, bf16: bool, iters: int = 10) -> float:
    """Median seconds per optimiser step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    times = []
    for i in range(iters + 3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            value = loss_of(model, b, loss)
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    if not torch.cuda.is_available():
        print("skipped: no CUDA device here (figures from an H200 are in bench/README.md)")
        return
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    out["agreement"] = agreement()
    out["gemm_bf16_tflops"] = gemm_tflops()
    sizes = {"tiny-0.6M": dict(vocab=2048, width=128, layers=2, heads=4, inter=256, pairs=16, prompt=160, response=32),
             "llama-125M": dict(vocab=32000, width=768, layers=12, heads=12, inter=2048, pairs=16, prompt=384,
                                response=128)}
    out["steps"] = []
    for name, s in sizes.items():
        model = llama(s["vocab"], s["width"], s["layers"], s["heads"], s["inter"]).cuda()
        n_params = sum(p.numel() for p in model.parameters())
        b = batch(s["vocab"], s["pairs"], s["prompt"], s["response"], "cuda")
        tokens = b["input_ids"].numel()
        for bf16 in (False, True):
            row = {"model": name, "params_M": n_params / 1e6, "bf16": bf16, "tokens_per_step": tokens}
            for loss in ("dpo", "madpo"):
                sec = step_speed(model, b, loss, bf16)
                row[f"{loss}_tok_per_s"] = tokens / sec
                row[f"{loss}_step_ms"] = 1000 * sec
            row["madpo_over_dpo_step_time"] = row["madpo_step_ms"] / row["dpo_step_ms"]
            # 6 N FLOPs per token for forward + backward (the usual dense estimate).
            row["mfu_vs_measured_gemm"] = 6 * n_params * row["madpo_tok_per_s"] / (out["gemm_bf16_tflops"] * 1e12)
            out["steps"].append(row)
            print(json.dumps(row), flush=True)
        del model
        torch.cuda.empty_cache()
    print(json.dumps(out, indent=2))
    dest = Path(os.environ.get("OUT", Path(__file__).parent / "results"))
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "gpu_step.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
