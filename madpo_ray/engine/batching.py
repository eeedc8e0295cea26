"""Which examples each worker trains on at each optimiser step: the sampler (seeded, optionally
grouping similar lengths), gradient accumulation up to the effective batch, and the data
position a resumed run continues from (a pure function of seed, epoch and step, so resume is
exact: no batch repeated or lost)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from madpo_ray.config import OptimConfig
from madpo_ray.data.preference import DataValidationError
from madpo_ray.engine.sessions import WorkerInfo
from madpo_ray.engine.state import TrainState

log = logging.getLogger("madpo_ray.train")


@dataclass
class BatchPlan:
    sampler: Any
    loader: Any
    accum: int  # micro-batches per optimiser step
    steps_per_epoch: int
    total_steps: int


class LengthGroupedSampler:
    """Seeded shuffle; within windows of `window` optimiser steps, examples sorted by length and cut
    into step batches (per-device batch x workers x accumulation) whose order is shuffled again.
    Micro-batch m of a step goes to rank r as slice m * workers + r. Batches of similar lengths waste
    little on padding; every optimiser step sees the same examples for any worker count with the same
    effective batch, and the order is a pure function of (seed, epoch), so resume is exact."""

    def __init__(self, lengths: list[int], batch_size: int, num_replicas: int, rank: int, seed: int,
                 accum: int = 1, window: int = 16):
        self.lengths, self.batch_size, self.num_replicas, self.rank = lengths, batch_size, num_replicas, rank
        self.seed, self.accum, self.window, self.epoch = seed, accum, window, 0
        self.step_batch = batch_size * num_replicas * accum
        self.num_steps = len(lengths) // self.step_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_steps * self.accum * self.batch_size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()[:self.num_steps * self.step_batch]
        span = self.step_batch * self.window
        steps = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start:start + span], key=lambda i: self.lengths[i])
            steps += [chunk[k:k + self.step_batch] for k in range(0, len(chunk), self.step_batch)]
        b = self.batch_size
        for s in torch.randperm(len(steps), generator=g).tolist():
            for m in range(self.accum):
                part = (m * self.num_replicas + self.rank) * b
                yield from steps[s][part:part + b]


def accumulation_steps(optim: OptimConfig, world_size: int, examples: int, stage: str) -> int:
    """Micro-batches per optimiser step. Too few examples for one effective batch is a data error
    named with the numbers (the driver checks this before any training starts)."""
    per_step = optim.per_device_batch_size * world_size
    accum = max(1, optim.effective_batch_size // per_step)
    if optim.effective_batch_size % per_step:
        log.warning("[%s] effective batch %d is not a multiple of %d x %d workers: each step uses %d examples",
                    stage, optim.effective_batch_size, optim.per_device_batch_size, world_size, per_step * accum)
    if examples < per_step * accum:
        raise DataValidationError(f"{stage}: {examples} examples is less than one effective batch "
                                  f"({optim.per_device_batch_size} x {world_size} workers x {accum} accumulation); "
                                  f"lower {stage}.optim.effective_batch_size or add data")
    return accum


def example_length(ex: dict) -> int:
    return sum(len(v) for k, v in ex.items() if k.endswith("_ids"))


def plan_batches(examples: list, collate_fn: Callable, optim: OptimConfig, info: WorkerInfo, stage: str) -> BatchPlan:
    """This worker's share of every epoch, and how many optimiser steps the run takes."""
    for i, ex in enumerate(examples):
        ex["index"] = i
    accum = accumulation_steps(optim, info.world_size, len(examples), stage)
    if optim.group_by_length:
        sampler = LengthGroupedSampler([example_length(ex) for ex in examples], optim.per_device_batch_size,
                                       info.world_size, info.rank, optim.seed, accum)
    else:
        sampler = DistributedSampler(examples, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                     seed=optim.seed, drop_last=True)
    # Its own generator: a DataLoader draws a base seed at every new iterator, from the global
    # stream unless given one, and a resumed run starts its iterator at another point of that
    # stream than the uninterrupted run did, so dropout (LoRA's) would draw differently after resume.
    loader = DataLoader(examples, batch_size=optim.per_device_batch_size, sampler=sampler,
                        collate_fn=collate_fn, drop_last=True, generator=torch.Generator().manual_seed(optim.seed))
    steps_per_epoch = len(loader) // accum
    total_steps = optim.epochs * steps_per_epoch
    if optim.max_steps:
        total_steps = min(total_steps, optim.max_steps)
    return BatchPlan(sampler, loader, accum, steps_per_epoch, total_steps)


def micro_batches(plan: BatchPlan, state: TrainState):
    """(epoch, batch) from the current data position on; reads `state.step` as it advances."""
    while state.step < plan.total_steps:
        epoch = state.step // plan.steps_per_epoch
        skip = (state.step - epoch * plan.steps_per_epoch) * plan.accum
        plan.sampler.set_epoch(epoch)
        for i, batch in enumerate(plan.loader):
            if i < skip:
                continue
            if i >= plan.steps_per_epoch * plan.accum or state.step >= plan.total_steps:
                break
            yield epoch, batch


def step_batches(plan: BatchPlan, state: TrainState):
    """(epoch, the `accum` micro-batches of one optimiser step): a step is collected before it is
    trained, so a step_fn can plan over all of it. An epoch holds whole steps only."""
    group = []
    for epoch, batch in micro_batches(plan, state):
        group.append(batch)
        if len(group) == plan.accum:
            yield epoch, group
            group = []
