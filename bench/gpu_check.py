"""The GPU check: every GPU path of the training code in one call of a few minutes, without Ray
(accelerator hosts here have torch, transformers and peft, but no Ray and no vLLM).

    python bench/gpu_check.py --model models/smollm2-135m-instruct --out gpu_check.json   # on a CUDA host
    python bench/gpu_check.py --dry --out /tmp/gpu_check.json                            # CPU, tiny model (CI)

On one GPU it measures, for the given model in bf16 autocast:
  1. SFT steps with LoRA (r 16 on q/k/v/o, the project's default) and with full fine-tuning:
     tokens/s and model FLOPs utilisation against the chip's dense bf16 peak (989 TFLOP/s on
     H100/H200; 6N FLOPs per token for full fine-tuning, 4N with LoRA: no weight gradients);
  2. policy (MADPO) steps on the shared-prompt pair forward under CUDA SDPA against two separate
     sequences: the largest log-prob difference and the speed ratio;
  3. gradient checkpointing's peak memory against none;
  4. FSDP2 at world size 1 over NCCL: a sharded step runs and its loss is finite;
and writes one JSON of figures. --dry runs the same code on CPU with a tiny random Llama (float32,
gloo), so CI keeps the script from rotting. It imports only torch, transformers, peft and the
package's torch-only modules (losses, logprobs, pair_forward, engine.parallel).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the package, uninstalled on a GPU host
from madpo_ray.data.collate import PairCollator  # noqa: E402
from madpo_ray.engine.parallel import shard_model  # noqa: E402
from madpo_ray.losses import PolicyLossInputs, get_policy_loss  # noqa: E402
from madpo_ray.pair_forward import SharedPairCollator, pair_response_logprobs  # noqa: E402

# sft_batch: (sequences, tokens); pairs: (pairs, prompt tokens, response tokens): the default
# GPU preset's shape (prompts of a few hundred tokens, short summaries).
SIZES = {"gpu": {"sft_batch": (8, 512), "pairs": (8, 448, 64)},
         "dry": {"sft_batch": (2, 64), "pairs": (2, 48, 8)}}
DENSE_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="A causal-LM folder (or a .gguf file, dequantised on load).")
    ap.add_argument("--dry", action="store_true", help="CPU, tiny random Llama, float32: the CI mode.")
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--steps", type=int, default=None, help="Timed steps per measurement (default 10; dry 2).")
    args = ap.parse_args(argv)
    if not args.dry and not args.model:
        ap.error("--model is required unless --dry")
    args.steps = args.steps or (2 if args.dry else 10)
    return args


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512))


def load_model(args, device: torch.device):
    """A fresh float32 copy on `device` (bf16 comes from autocast, as in the training engine)."""
    if args.dry:
        return tiny_llama().to(device)
    from transformers import AutoModelForCausalLM

    path = Path(args.model)
    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.to(device)


def pair_examples(vocab: int, pairs: int, prompt: int, response: int, seed: int = 0) -> list[dict]:
    """Random token pairs of fixed lengths (the check is about speed and agreement, not text)."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    return [{"prompt_ids": draw(prompt), "chosen_ids": draw(response), "rejected_ids": draw(response)}
            for _ in range(pairs)]


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, device: torch.device, steps: int) -> float:
    """Seconds per call of `step`, after one warm-up call."""
    step()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - t0) / steps


def count_parameters(model) -> tuple[int, int]:
    """(all parameters, parameters outside the embeddings): FLOPs scale with the second."""
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    return total, total - embed


def mfu(tokens_per_s: float, flops_per_token: float, device: torch.device):
    """Model FLOPs utilisation against the chip's dense bf16 peak (None off a known GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in DENSE_BF16_PEAK.items() if k in name), None)
    return None if peak is None else tokens_per_s * flops_per_token / peak


def sft_step(model, optimizer, ids: torch.Tensor, device: torch.device):
    def step():
        with autocast(device):
            logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step


def with_lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=LORA_TARGETS))


def measure_sft(args, device: torch.device, shape: tuple[int, int]) -> dict:
    """SFT steps, LoRA and full fine-tuning: step time, tokens/s, MFU, peak memory."""
    out = {}
    for mode in ("lora", "full"):
        model = load_model(args, device)
        _, n = count_parameters(model)
        if mode == "lora":
            model = with_lora(model)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        ids = torch.randint(3, model.config.vocab_size, shape, device=device)
        reset_peak(device)
        seconds = timed(sft_step(model, optimizer, ids, device), device, args.steps)
        tps = ids.numel() / seconds
        out[mode] = {"step_s": seconds, "tokens_per_s": tps, "flops_per_token": (4 if mode == "lora" else 6) * n,
                     "mfu": mfu(tps, (4 if mode == "lora" else 6) * n, device), "peak_memory_gb": peak_gb(device),
                     "trainable": sum(p.numel() for p in params)}
        del model, optimizer
        release(device)
    return out


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device):
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def policy_step(model, optimizer, batch: dict, device: torch.device):
    """One MADPO step (margins and reference log-probs fixed): the policy stage's loss on either layout."""
    loss_fn = get_policy_loss("madpo")
    b = batch["chosen_mask"].shape[0] if "pair_mask" in batch else batch["input_ids"].shape[0] // 2
    margins = torch.linspace(-8.0, 8.0, b, device=device)

    def step():
        with autocast(device):
            chosen, rejected = pair_response_logprobs(model, batch)
        ref = torch.zeros_like(chosen.summed)
        out = loss_fn(PolicyLossInputs(chosen.summed.float(), rejected.summed.float(), ref - 20, ref - 21,
                                       margins=margins), beta=0.1)
        out.losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def measure_pair_forward(args, device: torch.device, examples: list[dict]) -> dict:
    """Shared prompt vs two sequences: log-prob agreement (no grad) and MADPO step time, LoRA."""
    model = with_lora(load_model(args, device)).train()
    pad = model.config.pad_token_id or 0
    layouts = {"two_sequences": to_device(PairCollator(pad)(examples), device),
               "shared_prompt": to_device(SharedPairCollator(pad)(examples), device)}
    with torch.no_grad(), autocast(device):
        lp = {k: pair_response_logprobs(model.eval(), b) for k, b in layouts.items()}
    diff = max((a.summed.float() - b.summed.float()).abs().max().item()
               for a, b in zip(lp["two_sequences"], lp["shared_prompt"]))
    scale = max(a.summed.float().abs().max().item() for a in lp["two_sequences"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()
    seconds = {k: timed(policy_step(model, optimizer, b, device), device, args.steps) for k, b in layouts.items()}
    return {"max_abs_logprob_difference": diff, "max_abs_logprob": scale, "step_s": seconds,
            "speedup_shared_over_two": seconds["two_sequences"] / seconds["shared_prompt"],
            "attention": getattr(model.config, "_attn_implementation", None)}


def measure_checkpointing(args, device: torch.device, shape: tuple[int, int]) -> dict:
    """Peak memory and step time of full fine-tuning with and without gradient checkpointing."""
    out = {}
    for on in (False, True):
        model = load_model(args, device)
        if on:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        ids = torch.randint(3, model.config.vocab_size, shape, device=device)
        reset_peak(device)
        seconds = timed(sft_step(model, optimizer, ids, device), device, max(1, args.steps // 2))
        out["checkpointing" if on else "plain"] = {"step_s": seconds, "peak_memory_gb": peak_gb(device)}
        del model, optimizer
        release(device)
    return out


def measure_fsdp(args, device: torch.device, shape: tuple[int, int]) -> dict:
    """FSDP2 at world size 1 (NCCL on CUDA, gloo on CPU): shard, one SFT step, a finite loss."""
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        model = shard_model(load_model(args, device), device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        ids = torch.randint(3, model.config.vocab_size, shape, device=device)
        step = sft_step(model, optimizer, ids, device)
        losses = [step() for _ in range(2)]
        return {"backend": backend, "losses": losses, "finite": all(map(lambda x: x == x and abs(x) < 1e9, losses))}
    finally:
        dist.destroy_process_group()


def run(args) -> dict:
    device = torch.device("cpu" if args.dry else "cuda")
    if not args.dry and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry for the CPU check")
    import transformers

    sizes = SIZES["dry" if args.dry else "gpu"]
    shape = sizes["sft_batch"]
    model = load_model(args, device)
    total, non_embedding = count_parameters(model)
    examples = pair_examples(model.config.vocab_size, *sizes["pairs"])
    del model
    t0 = time.perf_counter()
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry)",
               "torch": torch.__version__, "transformers": transformers.__version__, "sizes": sizes,
               "model": args.model or "tiny random llama", "parameters": total, "non_embedding_parameters": non_embedding,
               "sft": measure_sft(args, device, shape),
               "pair_forward": measure_pair_forward(args, device, examples),
               "gradient_checkpointing": measure_checkpointing(args, device, shape),
               "fsdp_world_size_1": measure_fsdp(args, device, shape)}
    results["seconds"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    print(json.dumps(run(parse_args()), indent=2))
