"""Where the training loop runs: a Ray Train worker, a Ray Tune trial, or one plain process.

A session tells the loop its rank and device, prepares the model (DDP under Ray Train),
hands it the examples of a named dataset, offers a checkpoint to resume from, and takes its
reports. Test-only behaviour (killing a worker, logging batches) wraps a session
(engine/faults.py) instead of adding parameters to production functions.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from madpo_ray.engine.checkpoints import find_checkpoints
from madpo_ray.engine.parallel import shard_model
from madpo_ray.io import atomic_folder

log = logging.getLogger("madpo_ray.train")


@dataclass
class WorkerInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


class MissingSplit(KeyError):
    """The session has no dataset of that name (e.g. no "validation" split: held-out evaluation
    is optional). Its own type, so that a KeyError from reading a split that exists is never
    taken for a missing one."""


class LocalSession:
    """One plain process (a Ray task, a benchmark, a test), and the base of the others: examples given up front; checkpoints (if a root is given) go to
    `checkpoint_root/checkpoint_<step>`, which the loop scans when it resumes."""

    def __init__(self, datasets: Optional[dict[str, list[dict]]] = None, checkpoint_root: Optional[str] = None,
                 device: Optional[torch.device] = None, keep: int = 1):
        self.info = WorkerInfo(0, 1, device or torch.device("cpu"))
        self.datasets = datasets or {}
        self.checkpoint_root = str(checkpoint_root) if checkpoint_root else None
        self.keep = keep
        self.reports: list[dict] = []

    def examples(self, name: str = "train") -> list[dict]:
        if name not in self.datasets:
            raise MissingSplit(f"no {name!r} dataset in this session; it has {sorted(self.datasets)}")
        return [dict(ex) for ex in self.datasets[name]]

    def optional_examples(self, name: str) -> Optional[list[dict]]:
        """The named dataset, or None where the session has none (a validation split)."""
        try:
            return self.examples(name)
        except MissingSplit:
            return None

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.info.device)

    def checkpoint_dir(self):
        """A context giving the folder of the checkpoint the framework offers (None here)."""
        return contextlib.nullcontext(None)

    def report_metrics(self, metrics: dict) -> None:
        """A report between checkpoints (the curves; what a Tune scheduler prunes on)."""
        self.report(metrics)

    def report(self, metrics: dict, checkpoint_dir: Optional[str] = None) -> None:
        """A report, with a checkpoint folder to keep or without (every worker calls it at a
        checkpoint: it is collective under Ray Train)."""
        self.reports.append(dict(metrics))
        if checkpoint_dir is None or self.checkpoint_root is None:
            return
        root = Path(self.checkpoint_root)
        root.mkdir(parents=True, exist_ok=True)
        dest = root / f"checkpoint_{int(metrics['step']):06d}"
        with atomic_folder(dest) as tmp:
            shutil.copytree(checkpoint_dir, tmp, dirs_exist_ok=True)
        for old in find_checkpoints(str(root))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def after_step(self, step: int, batches: Sequence[dict] = ()) -> None:
        """Called after optimiser step `step` (counted from 1) with its micro-batches: the one
        per-step callback of the training loop (a wrapper may stop or record the training here)."""


class RaySession(LocalSession):
    """Reports and checkpoints through a Ray library's session API (`ray.train` or `ray.tune`)."""

    api_name = "ray.train"

    def api(self):
        import importlib

        return importlib.import_module(self.api_name)

    def checkpoint_dir(self):
        ckpt = self.api().get_checkpoint()
        return ckpt.as_directory() if ckpt is not None else contextlib.nullcontext(None)

    def report(self, metrics: dict, checkpoint_dir: Optional[str] = None) -> None:
        api = self.api()
        api.report(metrics, checkpoint=api.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)


class RayTrainSession(RaySession):
    """Inside a Ray Train worker: DDP preparation, the training's examples from the object store,
    collective reports, Train checkpoints named `<checkpoint_name>/checkpoint_<step>` inside the
    Ray Train run (so into `checkpoint_root`: one folder per training, though one worker group
    runs all the trainings of a pipeline run)."""

    def __init__(self, datasets: Optional[dict] = None, checkpoint_root: Optional[str] = None,
                 checkpoint_name: str = "", order_by: str = "index", strategy: str = "ddp"):
        import ray.train
        import ray.train.torch

        super().__init__(datasets, checkpoint_root=checkpoint_root)
        self.checkpoint_name = checkpoint_name
        self.order_by = order_by  # a column that fixes the example order, the same for every worker count
        self.strategy = strategy
        ctx = ray.train.get_context()
        self.info = WorkerInfo(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())

    def examples(self, name: str = "train") -> list[dict]:
        """This worker's copy of the whole dataset (an object-store reference the driver posted).
        It is not split by Ray: the loop's seeded DistributedSampler shards it, which keeps the
        order exact on resume and equal to a one-process run."""
        import ray

        if name not in self.datasets:
            raise MissingSplit(f"no {name!r} dataset was posted with this training; it has {sorted(self.datasets)}")
        rows = [dict(r) for r in ray.get(self.datasets[name])]
        if rows and self.order_by not in rows[0]:
            raise ValueError(f"dataset rows have no {self.order_by!r} column to fix their order; columns: "
                             f"{sorted(rows[0])}")
        return sorted(rows, key=lambda r: r[self.order_by])

    def checkpoint_dir(self):
        """Ray's latest checkpoint, only if it is this training's: a worker group restarted during
        the policy training must not resume from the reward model's last checkpoint."""
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None or self.checkpoint_root is None or Path(self.checkpoint_root) not in Path(ckpt.path).parents:
            return contextlib.nullcontext(None)
        return ckpt.as_directory()

    def report(self, metrics: dict, checkpoint_dir: Optional[str] = None) -> None:
        import ray.train

        if checkpoint_dir is None:
            ray.train.report(metrics)
            return
        name = f"{self.checkpoint_name}/checkpoint_{int(metrics['step']):06d}" if self.checkpoint_name else None
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
                         checkpoint_dir_name=name)

    def report_metrics(self, metrics: dict) -> None:
        """Not sent to Ray Train: its controller takes one report per worker at each health check
        (every 2 s, RAY_TRAIN_HEALTH_CHECK_INTERVAL_S) and a worker's next report waits until
        then, so reports every 10 steps held the default run's 0.1-s steps to 0.2 s (measured: both
        workers about 35% idle). The curves and progress come from the tracking wrapper
        (tracking.py) and the log lines; Ray gets every checkpoint report, with its metrics."""

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP (Ray's prepare_model) or FSDP2 (engine/parallel.py) over gloo (CPU) / NCCL (GPU)."""
        import ray.train.torch

        if self.strategy == "fsdp" and self.info.world_size > 1:
            return shard_model(model, self.info.device)
        return ray.train.torch.prepare_model(model)


class RayTuneSession(RaySession):
    """One Ray Tune trial on one worker: reports feed the scheduler (ASHA)."""

    api_name = "ray.tune"

    def __init__(self, datasets: dict[str, list[dict]], device: Optional[torch.device] = None):
        super().__init__(datasets, device=device or torch.device("cuda" if torch.cuda.is_available() else "cpu"))
