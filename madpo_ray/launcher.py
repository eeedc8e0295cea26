"""The one way a training runs, wherever it runs. The pipeline's stages (in a Ray Train worker or
in this process), `madpo compare`'s trainings (Ray tasks) and Tune's trials all describe what to
train as a `Training` and hand it to `launch` with a session: where the examples come from and
where reports and checkpoints go (engine/sessions.py). `launch` picks the stage's function from
one table, wraps the session for tracking and, only when a `Training` asks for it, for fault
injection; the training loop itself knows of neither.

On Ray Train, one worker group serves a whole pipeline run (runtime.TrainingGroup): its
`train_loop_per_worker` takes job after job from the driver (a training, or the score stage's
pass when it runs in the workers) until the driver posts the end.

Provenance stays with whoever owns the folder (the pipeline's stage records, compare's training
folders): a launch only trains and saves into `Training.out`."""

from __future__ import annotations

import gc
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from madpo_ray.config import PipelineConfig
from madpo_ray.console import quiet_libraries
from madpo_ray.engine.faults import FaultInjectingSession
from madpo_ray.engine.loop import FitResult
from madpo_ray.engine.sessions import RayTrainSession
from madpo_ray.runtime import finish_training, first_unfinished, next_training
from madpo_ray.stages.outputs import StageOutput
from madpo_ray.stages.policy import train_policy
from madpo_ray.stages.reward import train_reward
from madpo_ray.stages.score import ComputePolicy, score_shard
from madpo_ray.stages.sft import train_sft
from madpo_ray.tracking import preload as preload_tracking
from madpo_ray.tracking import tracked, tracking_target

# Every training stage's function: `fn(cfg, session, *, model_dir, out, **options) -> FitResult`.
TRAINERS: dict[str, Callable[..., FitResult]] = {"sft": train_sft, "reward": train_reward, "policy": train_policy}


@dataclass(frozen=True)
class Training:
    """One training to launch. `tracking` and `faults` are plain dicts so a Training can travel
    to a Ray worker inside a loop config (`to_loop_config`)."""

    stage: str
    cfg: PipelineConfig
    model_dir: str
    out: Optional[StageOutput] = None
    tracking: Optional[dict] = None  # tracking.TrackTarget as a dict; None: not tracked
    faults: Optional[dict] = None  # FaultInjectingSession's options; None (always, outside tests): none
    options: dict = field(default_factory=dict)  # the stage function's own extras (policy: eval_fn, label)

    def __post_init__(self):
        if self.stage not in TRAINERS:
            raise ValueError(f"no training stage {self.stage!r}; the stages that train are {sorted(TRAINERS)}")


def launch(training: Training, session) -> FitResult:
    """Train `training` with `session` (tracked as it asks, with its faults if any)."""
    if training.faults:
        session = FaultInjectingSession(session, **training.faults)
    with tracked(session, training.tracking) as tracked_session:
        return TRAINERS[training.stage](training.cfg, tracked_session, model_dir=str(training.model_dir),
                                        out=training.out, **training.options)


def tracking_for(cfg: PipelineConfig, name: str, params: Optional[dict] = None,
                 progress: bool = False) -> Optional[dict]:
    """Where the training called `name` in the run ("sft", "compare/madpo/seed0", "tune/madpo")
    logs its curves, as the plain dict a Training carries; None when tracking is off."""
    target = tracking_target(cfg, name, params, progress=progress)
    return asdict(target) if target else None


# --------------------------------------------------------------------------- Ray Train
def to_loop_config(training: Training, *, checkpoint_root: str, checkpoint_name: str = "",
                   datasets: Optional[dict] = None, order_by: str = "index") -> dict:
    """One training as the worker group receives it (`train_loop_per_worker`): plain data, and the
    object-store references of its datasets. A stage function's extras (`options`: callables)
    cannot travel in it."""
    if training.options or training.out is None:
        raise ValueError(f"a Ray Train {training.stage} training needs an output folder and no in-process options "
                         f"(got out={training.out}, options={sorted(training.options)})")
    out = training.out
    return {"pipeline": training.cfg.model_dump(mode="json"), "stage": training.stage,
            "model_dir": str(training.model_dir), "out_dir": str(out.model_dir), "metrics_path": str(out.metrics_path),
            "adapter_dir": str(out.adapter_dir) if out.adapter_dir else None, "checkpoint_root": checkpoint_root,
            "checkpoint_name": checkpoint_name, "datasets": datasets or {}, "order_by": order_by,
            "faults": training.faults, "tracking": training.tracking, "kind": "train"}


def scoring_job(examples, ref_dir, reward_dir, out_dir, cfg: PipelineConfig) -> dict:
    """The score stage's pass as a job of the worker group (score.backend=workers); `examples` is
    an object-store reference to the tokenised pairs."""
    return {"kind": "score", "examples": examples, "ref_dir": str(ref_dir),
            "reward_dir": str(reward_dir) if reward_dir else None, "out_dir": str(out_dir),
            "batch_size": cfg.score.batch_size, "threads": max(1, int(cfg.ray.cpus_per_worker)),
            "precision": asdict(ComputePolicy.of(cfg))}


def from_loop_config(config: dict) -> Training:
    adapter = config.get("adapter_dir")
    out = StageOutput(Path(config["out_dir"]), Path(config["metrics_path"]), Path(adapter) if adapter else None)
    return Training(config["stage"], PipelineConfig.model_validate(config["pipeline"]), config["model_dir"], out,
                    config.get("tracking"), config.get("faults"))


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train entry point of a run's worker group (runtime.TrainingGroup): every training
    the driver posts, in order, until it posts the end. A group Ray restarted after a failure
    starts at the first unfinished training, which resumes from its checkpoint."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    quiet_libraries()
    preload_tracking()  # what every training uses, paid once with the workers' start
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # the process group's first collective sets up its connections
    queue = config["queue"]
    index = start_index(queue)
    while (job := next_training(queue, index)) is not None:
        rank = WORKER_JOBS[job["kind"]](job)
        if rank == 0:  # after rank 0 saved what the driver reads next (a model and its metrics, the scores)
            finish_training(queue, index)
        release_memory()
        index += 1


def start_index(queue) -> int:
    """Where a (re)started group begins: rank 0 asks the queue and every rank takes its answer,
    so no two ranks can begin at different jobs."""
    index = [first_unfinished(queue) if not torch.distributed.is_initialized() or
             torch.distributed.get_rank() == 0 else None]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(index, src=0)
    return index[0]


def release_memory() -> None:
    """Between jobs an idle worker gives back what the last one cached (the driver may need the
    GPU's memory for generation before the next job)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def score_posted(job: dict) -> int:
    """The scoring pass's share of this worker; returns the worker's rank."""
    import ray
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    score_shard(ray.get(job["examples"]), job["ref_dir"], job["reward_dir"], job["out_dir"], rank=rank,
                world_size=world, threads=job["threads"], batch_size=job["batch_size"],
                precision=ComputePolicy(**job["precision"]))
    return rank


def launch_posted(job: dict) -> int:
    """One posted training in this worker; returns the worker's rank."""
    training = from_loop_config(job)
    torch.set_num_threads(max(1, int(training.cfg.ray.cpus_per_worker)))
    session = RayTrainSession(job["datasets"], job["checkpoint_root"], checkpoint_name=job["checkpoint_name"],
                              order_by=job["order_by"], strategy=training.cfg.ray.strategy)
    launch(training, session)
    return session.info.rank


# What a worker of the group does with each kind of job the driver posts.
WORKER_JOBS: dict[str, Callable[[dict], int]] = {"train": launch_posted, "score": score_posted}
