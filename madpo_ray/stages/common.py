"""The training engine shared by the SFT, reward and policy stages.

A stage supplies a model, tokenised examples, a collator and a `step_fn(model, batch) ->
(loss, metrics)`; `fit` does the rest inside a Ray Train worker: DDP (gloo on CPU, NCCL on
GPU), a DistributedSampler, AdamW with cosine warm-up, gradient accumulation up to the
effective batch, clipping, bf16 autocast where supported, periodic `ray.train.report`,
checkpoints (model, optimiser, scheduler, data position, RNG, extra stage state) and
resume from `ray.train.get_checkpoint()` after a worker failure.

Data position: checkpoints are taken at optimiser-step boundaries; on resume the sampler
is re-seeded for the same epoch and the micro-batches already consumed are skipped, so no
batch is repeated or lost.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from madpo_ray.config import OptimConfig

log = logging.getLogger("madpo_ray.train")

StepFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]]


@dataclass
class WorkerInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


class RayTrainSession:
    """fit() inside a Ray Train worker: DDP preparation, collective reports, Train checkpoints."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.info = WorkerInfo(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)  # DDP over gloo (CPU) / NCCL (GPU) when world_size > 1

    def checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict, checkpoint_dir: Optional[str] = None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)


class RayTuneSession:
    """fit() as one Ray Tune trial on one worker: reports feed the scheduler (ASHA)."""

    def __init__(self, device: Optional[torch.device] = None):
        self.info = WorkerInfo(0, 1, device or torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.info.device)

    def checkpoint(self):
        import ray.tune

        return ray.tune.get_checkpoint()

    def report(self, metrics: dict, checkpoint_dir: Optional[str] = None) -> None:
        import ray.tune

        ckpt = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.tune.report(metrics, checkpoint=ckpt)


class LocalSession:
    """fit() in one plain process (a Ray task, a benchmark, a test): checkpoints go to
    `checkpoint_root/checkpoint_<step>`, which fit() already scans when it resumes."""

    def __init__(self, checkpoint_root: Optional[str] = None, device: Optional[torch.device] = None, keep: int = 1):
        self.info = WorkerInfo(0, 1, device or torch.device("cpu"))
        self.root = Path(checkpoint_root) if checkpoint_root else None
        self.keep = keep
        self.reports: list[dict] = []

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.info.device)

    def checkpoint(self):
        return None

    def report(self, metrics: dict, checkpoint_dir: Optional[str] = None) -> None:
        import shutil

        self.reports.append(dict(metrics))
        if checkpoint_dir is None or self.root is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        dest = self.root / f"checkpoint_{int(metrics['step']):06d}"
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(checkpoint_dir, tmp)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        for old in find_checkpoints(str(self.root))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def autocast_context(device: torch.device, bf16: str):
    use = bf16 == "on" or (bf16 == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if use:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def maybe_kill_for_test(step: int, rank: int, fail_at_step: Optional[int], marker_dir: Optional[str]) -> None:
    """Fault injection for the resume tests: SIGKILL this worker process once, at a given step."""
    if fail_at_step is None or step != fail_at_step or rank != 0 or not marker_dir:
        return
    marker = Path(marker_dir) / f"killed_at_{step}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    log.warning("fault injection: SIGKILL worker pid %d at step %d", os.getpid(), step)
    os.kill(os.getpid(), signal.SIGKILL)


def _rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])


CHECKPOINT_META = "meta.json"


def checkpoint_step(path: Path) -> Optional[int]:
    """The step of a complete checkpoint folder, or None if it is partial or foreign.

    meta.json records the byte size of state.pt; a copy interrupted midway fails the check,
    so resume never loads a half-written checkpoint.
    """
    import json

    try:
        meta = json.loads((Path(path) / CHECKPOINT_META).read_text())
        if (Path(path) / "state.pt").stat().st_size != meta["bytes"]:
            return None
        return int(meta["step"])
    except (OSError, ValueError, KeyError):
        return None


def newest_checkpoint(candidates: list) -> Optional[Path]:
    """The complete checkpoint with the highest step among folders (Ray's and any on storage)."""
    best, best_step = None, -1
    for c in candidates:
        step = checkpoint_step(c) if c is not None else None
        if step is not None and step > best_step:
            best, best_step = Path(c), step
    return best


def find_checkpoints(root: Optional[str]) -> list[Path]:
    return sorted(Path(root).glob("checkpoint_*")) if root and Path(root).exists() else []


@dataclass
class FitResult:
    model: torch.nn.Module
    steps: int
    metrics: dict
    loss_history: list[float] = field(default_factory=list)  # global mean loss per optimiser step


def global_mean(value: float, device: torch.device) -> float:
    """Average a scalar over data-parallel workers (identity on one worker)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def fit(model: torch.nn.Module, examples: list, collate_fn: Callable, step_fn: StepFn, optim: OptimConfig, *,
        stage: str, extra_state: Optional[dict[str, Any]] = None, fail_at_step: Optional[int] = None,
        marker_dir: Optional[str] = None, batch_log_path: Optional[str] = None,
        checkpoint_root: Optional[str] = None, session=None,
        eval_fn: Optional[Callable[[torch.nn.Module], dict]] = None) -> FitResult:
    """Train `model` on `examples` inside a Ray Train worker; returns the unwrapped model.

    Resume source: the newest complete checkpoint among Ray's `get_checkpoint()` and those
    under `checkpoint_root` (the run's storage folder). The Train controller learns of a
    reported checkpoint only when it next polls the workers (every 2 s), so a worker killed
    right after reporting would otherwise restart from an older one.

    `session` defaults to Ray Train's; Tune trials pass a RayTuneSession. `eval_fn(model)` adds
    held-out metrics to every report (what ASHA prunes on).
    """
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler
    from transformers import get_cosine_schedule_with_warmup

    session = session or RayTrainSession()
    info = session.info
    torch.manual_seed(optim.seed)
    random.seed(optim.seed)
    model = session.prepare(model)
    for i, ex in enumerate(examples):
        ex["index"] = i
    sampler = DistributedSampler(examples, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=optim.seed, drop_last=True)
    loader = DataLoader(examples, batch_size=optim.per_device_batch_size, sampler=sampler,
                        collate_fn=collate_fn, drop_last=True)
    accum = max(1, optim.effective_batch_size // (optim.per_device_batch_size * info.world_size))
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch == 0:
        raise ValueError(f"{stage}: {len(examples)} examples is less than one effective batch "
                         f"({optim.per_device_batch_size} x {info.world_size} workers x {accum} accumulation)")
    total_steps = optim.epochs * steps_per_epoch
    if optim.max_steps:
        total_steps = min(total_steps, optim.max_steps)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=optim.adam_betas, weight_decay=optim.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(optim.warmup_ratio * total_steps), total_steps)
    extra_state = extra_state or {}

    step = 0
    history: list[float] = []
    ray_ckpt = session.checkpoint()
    with (ray_ckpt.as_directory() if ray_ckpt is not None else contextlib.nullcontext(None)) as ray_dir:
        resume_dir = newest_checkpoint([ray_dir] + find_checkpoints(checkpoint_root))
        if resume_dir is not None:
            state = torch.load(resume_dir / "state.pt", weights_only=False)
            unwrap(model).load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            for k, obj in extra_state.items():
                obj.load_state_dict(state["extra"][k])
            _set_rng_state(state["rng"])
            step = state["step"]
            history = list(state.get("history", []))
            if info.rank == 0:
                log.info("[%s] resumed from checkpoint at step %d/%d (%s)", stage, step, total_steps, resume_dir.name)

    def save_checkpoint(metrics: dict) -> None:
        """Every rank calls report (it is collective); rank 0 attaches the checkpoint."""
        if info.rank != 0:
            session.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "step": step, "rng": _rng_state(), "history": history,
                     "extra": {k: obj.state_dict() for k, obj in extra_state.items()}}
            # Written to a temp name then renamed; meta.json (written last) vouches for its size.
            torch.save(state, Path(tmp) / "state.pt.partial")
            os.replace(Path(tmp) / "state.pt.partial", Path(tmp) / "state.pt")
            import json

            (Path(tmp) / CHECKPOINT_META).write_text(json.dumps(
                {"step": step, "bytes": (Path(tmp) / "state.pt").stat().st_size, "stage": stage}))
            session.report(metrics, checkpoint_dir=tmp)

    model.train()
    t0, tokens, last_metrics = time.time(), 0, {}
    window_loss, window_n = 0.0, 0
    step_loss = 0.0
    start_step = step
    batch_log = open(batch_log_path, "a") if batch_log_path else None
    while step < total_steps:
        epoch = step // steps_per_epoch
        skip_micro = (step - epoch * steps_per_epoch) * accum
        sampler.set_epoch(epoch)
        micro_in_step = 0
        for i, batch in enumerate(loader):
            if i < skip_micro:
                continue
            if i >= steps_per_epoch * accum or step >= total_steps:
                break
            batch = {k: v.to(info.device) for k, v in batch.items()}
            if batch_log:
                batch_log.write(" ".join(map(str, batch["index"].tolist())) + f" step={step} rank={info.rank}\n")
                batch_log.flush()
            micro_in_step += 1
            sync = micro_in_step == accum
            no_sync = model.no_sync if (hasattr(model, "no_sync") and not sync) else contextlib.nullcontext
            with no_sync(), autocast_context(info.device, optim.bf16):
                loss, metrics = step_fn(model, batch)
                (loss / accum).backward()
            tokens += int(batch["attention_mask"].sum())
            window_loss += float(loss.detach())
            window_n += 1
            step_loss += float(loss.detach()) / accum
            if not sync:
                continue
            grad_norm = torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            micro_in_step = 0
            step += 1
            history.append(global_mean(step_loss, info.device))
            step_loss = 0.0
            maybe_kill_for_test(step, info.rank, fail_at_step, marker_dir)
            if step % optim.report_every == 0 or step % optim.checkpoint_every == 0 or step == total_steps:
                elapsed = time.time() - t0
                done = step - start_step
                last_metrics = {"step": step, "epoch": epoch, "loss": window_loss / max(1, window_n),
                                "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                                "tokens_per_s": tokens * info.world_size / max(elapsed, 1e-9),
                                **{k: float(v) for k, v in metrics.items()}}
                window_loss, window_n = 0.0, 0
                if eval_fn is not None:
                    model.eval()
                    last_metrics.update(eval_fn(unwrap(model)))
                    model.train()
                if info.rank == 0:
                    eta = elapsed / max(done, 1) * (total_steps - step)
                    log.info("[%s] step %d/%d  loss %.4f  %.0f tok/s  eta %.0fs", stage, step, total_steps,
                             last_metrics["loss"], last_metrics["tokens_per_s"], eta)
                if step % optim.checkpoint_every == 0 or step == total_steps:
                    save_checkpoint(last_metrics)
                else:
                    session.report(last_metrics)
    if batch_log:
        batch_log.close()
    last_metrics["train_seconds"] = time.time() - t0
    return FitResult(unwrap(model), step, last_metrics, history)


def save_model_atomically(model, tokenizer, out_dir: Path, meta: Optional[dict] = None) -> None:
    """save_pretrained into a temp sibling, then rename: a crash never leaves a half model folder.

    `meta` goes to madpo.json (e.g. the prompt template, so a server formats prompts as in training).
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if meta:
        import json

        (tmp / "madpo.json").write_text(json.dumps(meta, indent=2))
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
