"""The training loop shared by the SFT, reward and policy stages: `fit` and the pieces of one
optimiser step. Its parts live beside it: batching.py (sampler, accumulation, data position),
state.py (what a checkpoint holds, save and resume), early_stopping.py, collectives.py.

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
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from madpo_ray.config import OptimConfig
from madpo_ray.engine.batching import plan_batches, step_batches
from madpo_ray.engine.collectives import global_mean
from madpo_ray.engine.early_stopping import MONITOR, EarlyStopping
from madpo_ray.engine.parallel import as_float, gradient_sync, unwrap
from madpo_ray.engine.sessions import WorkerInfo
from madpo_ray.engine.state import TrainState, build_state, resume, save_checkpoint

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


# --------------------------------------------------------------------------- setup pieces


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
