"""The training loop shared by the SFT, reward and policy stages.

A stage supplies a model, examples, a collator and a `step_fn(model, batch) -> (loss,
metrics)`; `fit` does the rest: a seeded DistributedSampler, AdamW with cosine warm-up,
gradient accumulation up to the effective batch (DDP gradient sync only on the last
micro-batch), clipping, bf16 autocast where asked, periodic reports, checkpoints (model,
optimiser, scheduler, data position, RNG, the step's own state) and resume.

A step_fn that needs statistics of the whole optimiser step (beta-DPO) also has
`begin_step(model, batches)`: the loop collects a step's micro-batches first and calls it once,
before their gradient passes. With a held-out `validate` callable and `optim.eval_every`, the
loop evaluates every `eval_every` steps, keeps the best weights and stops early after
`optim.patience` evaluations without improvement.

Data position: checkpoints are taken at optimiser-step boundaries; on resume the sampler is
re-seeded for the same epoch and the micro-batches already consumed are skipped, so no batch
is repeated or lost.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from madpo_ray.config import OptimConfig
from madpo_ray.data.preference import DataValidationError
from madpo_ray.engine.checkpoints import (find_checkpoints, newest_checkpoint, read_checkpoint, read_shard, rng_state,
                                          set_rng_state, write_checkpoint, write_shard)
from madpo_ray.engine.parallel import (all_gather_objects, as_float, gradient_sync, is_sharded, load_sharded_state,
                                       local_tree, reshard, sharded_state)
from madpo_ray.engine.sessions import WorkerInfo

log = logging.getLogger("madpo_ray.train")

StepFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]]


@dataclass
class FitResult:
    model: torch.nn.Module
    steps: int
    metrics: dict
    loss_history: list[float] = field(default_factory=list)  # global mean loss per optimiser step


def autocast_context(device: torch.device, bf16: str):
    use = bf16 == "on" or (bf16 == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if use:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def global_sum(values: torch.Tensor) -> torch.Tensor:
    """`values` summed over data-parallel workers (themselves on one worker)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    total = values.clone()
    dist.all_reduce(total)
    return total


def global_mean(value: float, device: torch.device) -> float:
    """Average a scalar over data-parallel workers (identity on one worker)."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return float(global_sum(torch.tensor([value], dtype=torch.float64, device=device))) / world


# --------------------------------------------------------------------------- setup pieces
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
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

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


MONITOR = "eval_loss"  # what early stopping watches in the held-out metrics; lower is better


class EarlyStopping:
    """Patience over held-out evaluations, and the best weights seen. `update(value)` returns
    (improved, stop): improved when the value is finite and strictly below the best so far; stop
    once `patience` evaluations in a row have not improved. Only trainable parameters are kept
    (the others never change; with LoRA that is a few MB), on the CPU. Its state_dict, best
    weights included, goes into checkpoints, so a resumed run decides and restores the same."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.bad = 0  # evaluations in a row without improvement
        self.history: list[dict] = []  # {"step", **held-out metrics} per evaluation
        self.weights: dict[str, torch.Tensor] = {}

    @property
    def stopped(self) -> bool:
        return self.bad >= self.patience

    def update(self, value: float, step: Optional[int] = None) -> tuple[bool, bool]:
        improved = math.isfinite(value) and (self.best is None or value < self.best)
        if improved:
            self.best, self.best_step, self.bad = value, step, 0
        else:
            self.bad += 1
        return improved, self.stopped

    def keep(self, model: torch.nn.Module) -> None:
        """This worker's copy (of a sharded model: its shards) of the trainable weights."""
        reshard(model)
        self.weights = {n: local_tree(p.detach()).to("cpu", copy=True)
                        for n, p in model.named_parameters() if p.requires_grad}

    def restore(self, model: torch.nn.Module) -> None:
        reshard(model)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.weights.items():
                local_tree(params[name]).copy_(value)

    def summary(self) -> dict:
        return {"best_step": self.best_step, "best_eval_loss": self.best, "stopped_early": self.stopped,
                "eval_history": [dict(h) for h in self.history]}

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad, "history": self.history,
                "weights": self.weights}

    def load_state_dict(self, d: dict) -> None:
        self.best, self.best_step, self.bad = d["best"], d["best_step"], int(d["bad"])
        self.history, self.weights = [dict(h) for h in d["history"]], dict(d["weights"])


def build_state(model: torch.nn.Module, optim: OptimConfig, total_steps: int, extra_state: dict) -> TrainState:
    from transformers import get_cosine_schedule_with_warmup

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


# --------------------------------------------------------------------------- the loop
class Meter:
    """Running sums between reports: loss window, tokens, the current step's mean loss."""

    def __init__(self, start_step: int, world_size: int):
        self.t0, self.start_step, self.world_size = time.time(), start_step, world_size
        self.tokens, self.window_loss, self.window_n, self.step_loss = 0, 0.0, 0, 0.0
        self.real, self.computed = 0, 0

    def add(self, loss: float, batch: dict, accum: int) -> None:
        """Logical tokens are what a two-sequence forward would compute (2P + C + R per pair), so
        a faster layout shows as more tokens/s, not as fewer tokens; padding is counted apart."""
        real = int(batch["attention_mask"].sum())
        self.tokens += int(batch["logical_tokens"]) if "logical_tokens" in batch else real
        self.real += real
        self.computed += batch["input_ids"].numel()
        self.window_loss += loss
        self.window_n += 1
        self.step_loss += loss / accum

    def take_step_loss(self) -> float:
        value, self.step_loss = self.step_loss, 0.0
        return value

    def report(self, step: int, epoch: int, grad_norm: float, lr: float, metrics: dict) -> dict:
        elapsed = time.time() - self.t0
        out = {"step": step, "epoch": epoch, "loss": self.window_loss / max(1, self.window_n),
               "grad_norm": grad_norm, "lr": lr, "tokens_per_s": self.tokens * self.world_size / max(elapsed, 1e-9),
               "padding_share": 1.0 - self.real / max(self.computed, 1),
               **{k: float(v) for k, v in metrics.items()}}
        self.window_loss, self.window_n = 0.0, 0
        return out

    def eta(self, step: int, total_steps: int) -> float:
        return (time.time() - self.t0) / max(step - self.start_step, 1) * (total_steps - step)


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


def forked_rng(device: torch.device):
    """A context after which the CPU (and this GPU's) random streams are as they were before."""
    if device.type == "cuda":
        return torch.random.fork_rng(devices=[device], device_type="cuda")
    return torch.random.fork_rng(devices=[])


def train_micro_batches(model: torch.nn.Module, batches: list[dict], step_fn: StepFn, optim: OptimConfig,
                        info: WorkerInfo, meter: "Meter") -> dict:
    """The gradient passes of one optimiser step, after the step_fn's `begin_step` (if it has
    one) has seen all of the step's micro-batches. `begin_step` runs under no_grad and the same
    autocast, in train mode, on a forked RNG: the gradient passes then draw the same dropout
    masks as it did, and the training's random stream is as if it had not run (exact resume).
    DDP and FSDP sync gradients only on the last micro-batch. Returns the last micro-batch's metrics."""
    begin_step = getattr(step_fn, "begin_step", None)
    if begin_step is not None:
        with forked_rng(info.device), torch.no_grad(), autocast_context(info.device, optim.bf16):
            begin_step(model, batches)
    metrics = {}
    for i, batch in enumerate(batches):
        with gradient_sync(model, enabled=i == len(batches) - 1), autocast_context(info.device, optim.bf16):
            loss, metrics = step_fn(model, batch)
            (loss / len(batches)).backward()
        meter.add(float(loss.detach()), batch, len(batches))
    return metrics


def optimizer_step(state: TrainState, optim: OptimConfig) -> float:
    grad_norm = torch.nn.utils.clip_grad_norm_(state.params, optim.max_grad_norm)
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    return as_float(grad_norm)


def held_out(state: TrainState, stopper: EarlyStopping, validate: Callable, info: WorkerInfo,
             optim: OptimConfig) -> dict:
    """Held-out metrics of the current weights (eval mode, no_grad, the training's autocast). They
    are the whole validation split's, the same on every rank (a validator that shares the split
    out adds up over workers itself), so every rank takes the same early-stopping decision; the
    weights are kept when they are the best so far."""
    state.model.eval()
    with torch.no_grad(), autocast_context(info.device, optim.bf16):
        metrics = {k: float(v) for k, v in validate(unwrap(state.model)).items()}
    state.model.train()
    if MONITOR not in metrics:
        raise KeyError(f"the held-out evaluation must return {MONITOR!r}; it returned {sorted(metrics)}")
    improved, _ = stopper.update(metrics[MONITOR], state.step)
    stopper.history.append({"step": state.step, **metrics})
    if improved:
        stopper.keep(unwrap(state.model))
    return metrics


def finish(model: torch.nn.Module, stopper: Optional[EarlyStopping], last: dict, stage: str, rank: int) -> dict:
    """The best weights back in `model` (with early stopping), and the final metrics."""
    if stopper is None:
        return last
    stopper.restore(model)
    if rank == 0:
        log.info("[%s] %s; best %s %.4f at step %s", stage, "stopped early" if stopper.stopped else "finished",
                 MONITOR, stopper.best if stopper.best is not None else float("nan"), stopper.best_step)
    return {**last, **stopper.summary()}


def fit(model: torch.nn.Module, examples: list, collate_fn: Callable, step_fn: StepFn, optim: OptimConfig, *,
        stage: str, session, extra_state: Optional[dict[str, Any]] = None,
        eval_fn: Optional[Callable[[torch.nn.Module], dict]] = None,
        validate: Optional[Callable[[torch.nn.Module], dict]] = None) -> FitResult:
    """Train `model` on `examples` in `session`; returns the unwrapped model and the metrics.

    `eval_fn(model)` adds held-out metrics to every report (what Tune's ASHA prunes on).
    `validate(model)` returns the validation split's metrics with "eval_loss", the same on every
    worker; with `optim.eval_every` set it
    runs every `eval_every` steps and at the end, training stops after `optim.patience`
    evaluations without improvement, and the returned model has the best evaluation's weights."""
    info = session.info
    torch.manual_seed(optim.seed)
    random.seed(optim.seed)
    model = session.prepare(model)
    plan = plan_batches(examples, collate_fn, optim, info, stage)
    stopper = EarlyStopping(optim.patience) if validate is not None and optim.eval_every else None
    extra = {**(extra_state or {}), **({"early_stopping": stopper} if stopper else {})}
    state = build_state(model, optim, plan.total_steps, extra)
    resume(state, session, stage, plan.total_steps)
    model.train()
    meter, last = Meter(state.step, info.world_size), {}
    dtype = str(next(unwrap(model).parameters()).dtype)  # reported: what the weights really train in
    for epoch, batches in (iter(()) if stopper and stopper.stopped else step_batches(plan, state)):
        batches = [{k: v.to(info.device) for k, v in b.items()} for b in batches]
        metrics = train_micro_batches(model, batches, step_fn, optim, info, meter)
        grad_norm = optimizer_step(state, optim)
        state.history.append(global_mean(meter.take_step_loss(), info.device))
        session.after_step(state.step, batches)
        step = state.step
        evaluate = stopper is not None and (step % optim.eval_every == 0 or step == plan.total_steps)
        heldout = held_out(state, stopper, validate, info, optim) if evaluate else {}
        final = step == plan.total_steps or bool(stopper and stopper.stopped)
        if step % optim.report_every == 0 or step % optim.checkpoint_every == 0 or final:
            last = {**meter.report(step, epoch, grad_norm, state.scheduler.get_last_lr()[0], metrics), **heldout,
                    "param_dtype": dtype, "total_steps": plan.total_steps, "eta_s": meter.eta(step, plan.total_steps),
                    "resumed_from_step": meter.start_step}
            report(state, session, last, stage, eval_fn, checkpoint=step % optim.checkpoint_every == 0 or final)
        if final:
            break
    last = finish(unwrap(model), stopper, last, stage, info.rank)
    last["train_seconds"] = time.time() - meter.t0
    return FitResult(unwrap(model), state.step, last, state.history)


def report(state: TrainState, session, metrics: dict, stage: str, eval_fn, *, checkpoint: bool) -> None:
    """Held-out metrics (if any), one log line on rank 0, then a report with or without a checkpoint.
    Besides the curves, a report says total_steps, eta_s and resumed_from_step (0: a fresh start),
    for progress bars and tracking."""
    if eval_fn is not None:
        state.model.eval()
        metrics.update(eval_fn(unwrap(state.model)))
        state.model.train()
    if session.info.rank == 0:
        log.info("[%s] step %d/%d  loss %.4f  %.0f tok/s  eta %.0fs", stage, state.step, metrics["total_steps"],
                 metrics["loss"], metrics["tokens_per_s"], metrics["eta_s"])
    if checkpoint:
        save_checkpoint(state, session, metrics, stage)
    else:
        session.report_metrics(metrics)
