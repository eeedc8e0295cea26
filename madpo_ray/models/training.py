"""Setting a model up for training (gradient checkpointing, LoRA through peft) and saving what
trained as a normal HF folder every later stage, vLLM and `madpo serve` can load."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Optional

import torch

from madpo_ray.config import ModelConfig
from madpo_ray.io import atomic_folder, mark_output_folder
from madpo_ray.models.folders import ModelLoadError

log = logging.getLogger(__name__)


def prepare_for_training(model, cfg: ModelConfig, task: str = "causal"):
    """Gradient checkpointing and LoRA as configured. task: "causal" (SFT, policy) or "reward"
    (the linear score head then trains in full beside the adapters)."""
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora is None:
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    check_lora_targets(model, cfg.lora.target_modules)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules),
                      task_type=TaskType.SEQ_CLS if task == "reward" else TaskType.CAUSAL_LM,
                      modules_to_save=["score"] if task == "reward" else None)
    model = get_peft_model(model, lora)
    trainable, total = trainable_parameters(model)
    log.info("LoRA r=%d on %s: %d of %d parameters trainable (%.2f%%)", cfg.lora.r, ",".join(cfg.lora.target_modules),
             trainable, total, 100.0 * trainable / total)
    return model


def check_lora_targets(model, targets: list[str]) -> None:
    """Every LoRA target names linear layers of this model, or an error that lists the names it has.
    The default (q/k/v/o_proj) fits Llama, Qwen, Mistral and Gemma; GPT-2, GPT-NeoX and Phi-3 fuse
    or rename the projections, and peft's own error would not say what to set instead."""
    linear = sorted({name.split(".")[-1] for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"} - {"score", "lm_head"})
    missing = [t for t in targets if t not in linear]
    if missing:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ModelLoadError(f"LoRA target modules {missing} are not layers of this {model_type} model; its linear "
                             f"layers are named {linear}: set model.lora.target_modules to some of them "
                             f"(the attention projections, e.g. {suggested_targets(linear)})")


def suggested_targets(linear: list[str]) -> list[str]:
    """The attention projections among a model's linear layer names (the usual LoRA targets)."""
    attention = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "c_attn", "dense",
                 "Wqkv", "out_proj", "query", "key", "value"}
    return [n for n in linear if n in attention] or linear[:2]


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    return (sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(p.numel() for p in model.parameters()))


def is_adapter_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def save_model_atomically(model, tokenizer, out_dir: Path, meta: Optional[dict] = None,
                          marker: Optional[str] = None) -> None:
    """save_pretrained into a temp sibling, then rename: a crash never leaves a half model folder.

    `meta` goes to madpo.json (e.g. the prompt template, so a server formats prompts as in training).
    `marker` (a command's name) signs a folder the user named as that command's output (io.OUTPUT_MARKER).
    """
    with atomic_folder(Path(out_dir)) as tmp:  # fsynced; a reader sees the old model or the new, never half
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if meta:
            (tmp / "madpo.json").write_text(json.dumps(meta, indent=2))
        if marker:
            mark_output_folder(tmp, marker)


def save_trained(model, tokenizer, model_dir: Path, adapter_dir: Optional[Path], meta: Optional[dict] = None) -> None:
    """A normal HF folder every later stage, `madpo eval` and `madpo serve` can load; with LoRA,
    the adapter is saved beside it first and the folder holds the merged weights."""
    if is_adapter_model(model):
        if adapter_dir is not None:
            model.save_pretrained(str(adapter_dir))
        model = model.merge_and_unload()  # note: merges into `model` itself; the caller's handle is merged too
    elif adapter_dir is not None and Path(adapter_dir).exists():
        shutil.rmtree(adapter_dir)  # an adapter from an earlier LoRA run would not belong to these weights
    save_model_atomically(model, tokenizer, model_dir, meta)
