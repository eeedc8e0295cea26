"""The shared tail of every training stage, wherever it runs: rank 0 saves the model folder
(merged weights, the LoRA adapter beside it) and the training metrics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from madpo_ray.config import PipelineConfig
from madpo_ray.data.prompts import effective_prompt_template
from madpo_ray.engine.loop import FitResult
from madpo_ray.engine.parallel import full_state_dict, is_sharded
from madpo_ray.io import write_json
from madpo_ray.models import save_trained, trainable_parameters


@dataclass(frozen=True)
class StageOutput:
    """Where a finished training saves: the model folder (merged weights), the LoRA adapter
    (when LoRA trained it) and the training metrics."""

    model_dir: Path
    metrics_path: Path
    adapter_dir: Optional[Path] = None


def consolidated(model: torch.nn.Module, rebuild: Callable[[], torch.nn.Module], rank: int):
    """A sharded model's full weights in a fresh unsharded model on rank 0 (None elsewhere).
    Every worker must call it: the gather is a collective."""
    full = full_state_dict(model)
    if rank != 0:
        return None
    fresh = rebuild()
    fresh.load_state_dict(full)
    return fresh


def save_stage_outputs(result: FitResult, tokenizer, out: Optional[StageOutput], cfg: PipelineConfig, stage: str,
                       rank: int, extra_metrics: Optional[dict] = None,
                       rebuild: Optional[Callable[[], torch.nn.Module]] = None) -> None:
    """Rank 0 saves the model (atomically, merged if LoRA trained it, with the prompt template)
    and the training metrics, including the share of parameters that trained. A sharded (FSDP)
    model is first gathered into `rebuild()`, the stage's model as it was before training."""
    model = result.model
    if out is not None and is_sharded(model):
        model = consolidated(model, rebuild, rank)
    if out is None or rank != 0:
        return
    trainable, total = trainable_parameters(model)
    save_trained(model, tokenizer, out.model_dir, out.adapter_dir,
                 meta={"stage": stage, "prompt_template": effective_prompt_template(cfg.data, tokenizer)})
    write_json(out.metrics_path, {"steps": result.steps, "loss_history": result.loss_history,
                                  "trainable_parameters": trainable, "total_parameters": total,
                                  "trainable_share": trainable / max(total, 1), **(extra_metrics or {}),
                                  **result.metrics})
