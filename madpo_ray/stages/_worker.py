"""What every stage's train_loop_per_worker does first and last."""

from __future__ import annotations

import logging

import torch

from madpo_ray.config import PipelineConfig
from madpo_ray.io import write_json


def setup_worker(config: dict) -> PipelineConfig:
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    quiet_libraries()
    cfg = PipelineConfig.model_validate(config["pipeline"])
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    return cfg


def quiet_libraries() -> None:
    """Ray Train logs every report and transformers draws a bar per weight load: keep our lines readable."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:  # Train V2 logs every report through a logger named after its file path
        from ray.train.v2._internal.execution import context as _train_ctx

        _train_ctx.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):  # pragma: no cover - internal, may move
        pass
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def load_examples(path: str) -> list:
    return torch.load(path, weights_only=False)


def train_and_save(config: dict, cfg: PipelineConfig, stage: str, model, tokenizer, collate, step_fn, optim,
                   extra_state=None, extra_metrics=None) -> None:
    """The shared body of every stage's train_loop_per_worker after the model is built: fit with
    the fault/resume/batch-log settings the driver passed, then rank 0 saves model and metrics."""
    from pathlib import Path

    import ray.train

    from madpo_ray.stages.common import fit, save_model_atomically

    result = fit(model, load_examples(config["examples_path"]), collate, step_fn, optim, stage=stage,
                 extra_state=extra_state, fail_at_step=config.get("fail_at_step"),
                 marker_dir=config.get("marker_dir"), checkpoint_root=config.get("checkpoint_root"),
                 batch_log_path=config.get("batch_log_path"))
    if ray.train.get_context().get_world_rank() == 0:
        save_model_atomically(result.model, tokenizer, Path(config["out_dir"]),
                              meta={"stage": stage.split("/")[0], "prompt_template": cfg.data.prompt_template})
        write_json(Path(config["metrics_path"]), {"steps": result.steps, "loss_history": result.loss_history,
                                                  **(extra_metrics or {}), **result.metrics})
