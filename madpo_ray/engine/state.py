"""What a checkpoint holds (model, optimiser, scheduler, step, RNG, the loss's own state, loss
history) and how a training saves and resumes it, sharded (FSDP) or not."""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import get_cosine_schedule_with_warmup

from madpo_ray.config import OptimConfig
from madpo_ray.engine.checkpoints import (find_checkpoints, newest_checkpoint, read_checkpoint, read_shard, rng_state,
                                          set_rng_state, write_checkpoint, write_shard)
from madpo_ray.engine.collectives import all_gather_objects
from madpo_ray.engine.parallel import is_sharded, load_sharded_state, local_tree, sharded_state, unwrap

log = logging.getLogger("madpo_ray.train")


@dataclass
class TrainState:
    """Everything a checkpoint holds, and the step it was taken at."""

    model: torch.nn.Module
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: Any
    extra_state: dict[str, Any]  # objects with state_dict()/load_state_dict(), e.g. a loss's moving averages
    step: int = 0
    history: list[float] = field(default_factory=list)

    @property
    def sharded(self) -> bool:
        return is_sharded(self.model)

    def state_dict(self) -> dict:
        """What rank 0 saves. Of a sharded model, without the model, optimiser and extra states:
        each worker saves its own shards of those (`shard_state_dict`)."""
        common = {"scheduler": self.scheduler.state_dict(), "step": self.step, "rng": rng_state(),
                  "history": self.history}
        if self.sharded:
            return common
        return {"model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "extra": {k: obj.state_dict() for k, obj in self.extra_state.items()}, **common}

    def shard_state_dict(self) -> dict:
        return {**sharded_state(self.model, self.optimizer),
                "extra": local_tree({k: obj.state_dict() for k, obj in self.extra_state.items()})}

    def load_state_dict(self, state: dict, shard: Optional[dict] = None, rank: int = 0) -> None:
        if self.sharded:
            load_sharded_state(self.model, self.optimizer, shard)
            extra = shard["extra"]
        else:
            unwrap(self.model).load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            extra = state["extra"]
        self.scheduler.load_state_dict(state["scheduler"])
        for k, obj in self.extra_state.items():
            obj.load_state_dict(extra[k])
        set_rng_state(state["rng"], rank)
        self.step = state["step"]
        self.history = list(state.get("history", []))


def build_state(model: torch.nn.Module, optim: OptimConfig, total_steps: int, extra_state: dict) -> TrainState:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=optim.adam_betas, weight_decay=optim.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(optim.warmup_ratio * total_steps), total_steps)
    return TrainState(model, params, optimizer, scheduler, extra_state)


def resume(state: TrainState, session, stage: str, total_steps: int) -> None:
    """Continue from the newest complete checkpoint among the framework's and those on storage.

    Ray's controller learns of a reported checkpoint only when it next polls the workers
    (every 2 s), so a worker killed right after reporting would otherwise restart from an
    older one; the session's `checkpoint_root` holds the newer one. Every worker picks the same
    folder (all read the same storage); of a sharded model each reads its own shard file."""
    with session.checkpoint_dir() as framework_dir:
        folder = newest_checkpoint([framework_dir] + find_checkpoints(session.checkpoint_root))
        if folder is None:
            return
        shard = read_shard(folder, session.info.rank, session.info.world_size) if state.sharded else None
        state.load_state_dict(read_checkpoint(folder, sharded=state.sharded), shard, session.info.rank)
    if session.info.rank == 0:
        log.info("[%s] resumed from checkpoint at step %d/%d (%s)", stage, state.step, total_steps, folder.name)


def save_checkpoint(state: TrainState, session, metrics: dict, stage: str) -> None:
    """Every rank calls report (it is collective); rank 0 attaches the checkpoint. Of a sharded
    model every rank attaches its own shard file, Ray merges the workers' folders into one, and
    rank 0's meta.json lists every shard's size, so a folder missing one is never resumed from."""
    info = session.info
    rngs = all_gather_objects(rng_state(), info.world_size)  # each worker's dropout stream, for an exact resume
    if info.rank != 0 and not state.sharded:
        session.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shard(Path(tmp), state.shard_state_dict(), info.rank, info.world_size) if state.sharded else None
        if info.rank == 0:
            write_checkpoint(Path(tmp), {**state.state_dict(), "rng": rngs}, state.step, stage, shards)
        session.report(metrics, checkpoint_dir=tmp)
