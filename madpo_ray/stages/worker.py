"""What every training stage does first and last, wherever it runs.

`setup_worker` turns a Ray Train worker's loop config into the typed config and a session
(wrapped for fault injection only when a test asks for it); `save_stage_outputs` is the
shared tail: rank 0 saves the model folder and the training metrics."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from madpo_ray.config import PipelineConfig
from madpo_ray.engine.loop import FitResult
from madpo_ray.io import write_json


@dataclass(frozen=True)
class StageOutput:
    """Where a finished training saves: the model folder (merged weights), the LoRA adapter
    (when LoRA trained it) and the training metrics."""

    model_dir: Path
    metrics_path: Path
    adapter_dir: Optional[Path] = None


def quiet_libraries() -> None:
    """Ray Train logs every report and transformers draws a bar per weight load: keep our lines readable."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:  # Train V2 logs every report through a logger named after its file path
        from ray.train.v2._internal.execution import context as train_context

        train_context.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):  # pragma: no cover - internal, may move
        pass
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def setup_worker(config: dict):
    """(typed config, session) for a Ray Train worker's `train_loop_per_worker(config)`."""
    from madpo_ray.engine.sessions import FaultInjectingSession, RayTrainSession

    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    quiet_libraries()
    cfg = PipelineConfig.model_validate(config["pipeline"])
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    session = RayTrainSession(config.get("checkpoint_root"), order_by=config.get("order_by", "index"),
                              strategy=cfg.ray.strategy)
    if config.get("fault"):
        session = FaultInjectingSession(session, **config["fault"])
    return cfg, session


def stage_output(config: dict) -> StageOutput:
    adapter = config.get("adapter_dir")
    return StageOutput(Path(config["out_dir"]), Path(config["metrics_path"]), Path(adapter) if adapter else None)


def train_loop_per_worker(config: dict) -> None:
    """Every training stage's Ray Train entry point: the stage's own function with a Train session."""
    from madpo_ray.stages import stage_trainer
    from madpo_ray.tracking import tracked

    cfg, session = setup_worker(config)
    with tracked(session, config.get("tracking")) as session:
        stage_trainer(config["stage"])(cfg, session, model_dir=config["model_dir"], out=stage_output(config))


def consolidated(model: torch.nn.Module, rebuild: Callable[[], torch.nn.Module], rank: int):
    """A sharded model's full weights in a fresh unsharded model on rank 0 (None elsewhere).
    Every worker must call it: the gather is a collective."""
    from madpo_ray.engine.parallel import full_state_dict

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
    from madpo_ray.engine.parallel import is_sharded
    from madpo_ray.models import save_trained, trainable_parameters

    model = result.model
    if out is not None and is_sharded(model):
        model = consolidated(model, rebuild, rank)
    if out is None or rank != 0:
        return
    from madpo_ray.data.prompts import effective_prompt_template

    trainable, total = trainable_parameters(model)
    save_trained(model, tokenizer, out.model_dir, out.adapter_dir,
                 meta={"stage": stage, "prompt_template": effective_prompt_template(cfg.data, tokenizer)})
    write_json(out.metrics_path, {"steps": result.steps, "loss_history": result.loss_history,
                                  "trainable_parameters": trainable, "total_parameters": total,
                                  "trainable_share": trainable / max(total, 1), **(extra_metrics or {}),
                                  **result.metrics})
