"""What every stage's train_loop_per_worker does first and last."""

from __future__ import annotations

import logging

import torch

from madpo_ray.config import PipelineConfig
from madpo_ray.io import write_json  # noqa: F401  (used by the stage modules)


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
