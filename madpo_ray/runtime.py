"""The thin Ray layer: cluster connection and TorchTrainer plumbing. Nothing else imports Ray
at module level, so data, models and losses stay testable without a cluster."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Optional

from madpo_ray.config import RayConfig
from madpo_ray.engine.checkpoints import find_checkpoints, newest_checkpoint

log = logging.getLogger(__name__)

# Defaults every Ray worker gets: quiet tokenizers, one OpenMP pool per worker, Train V2, and a
# Train controller that looks at its workers every 0.5 s instead of 2 s: it takes their reports
# (a checkpoint report waits for it) and notices a finished training only then (measured on the
# default run's policy stage: 8 s less, of which 3 s between the workers' end and fit() returning).
WORKER_ENV_DEFAULTS = {
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "RAY_TRAIN_V2_ENABLED": "1",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}


def worker_env() -> dict[str, str]:
    """Our defaults minus variables the driver already has. Those reach the workers anyway (a local
    cluster inherits them; a submitted job carries them in its runtime_env), and Ray refuses a
    runtime_env that sets a key the job's runtime_env also sets."""
    return {k: v for k, v in WORKER_ENV_DEFAULTS.items() if k not in os.environ}


def init_ray(cfg: RayConfig) -> None:
    """Join `cfg.address` or start a local cluster (with the dashboard: Train V2 is slow without it)."""
    import ray

    if ray.is_initialized():
        return
    kwargs = dict(runtime_env={"env_vars": worker_env()}, log_to_driver=True, configure_logging=True,
                  logging_level=logging.INFO)
    address = cluster_address(cfg.address)
    if address != "local":
        log.info("connecting to Ray cluster at %s", address)
        ray.init(address=address, **kwargs)
    else:
        log.info("starting a local Ray cluster (%s CPUs)", cfg.num_cpus or os.cpu_count())
        ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 **kwargs)


def cluster_address(configured: Optional[str]) -> str:
    """The address to join: the configured one, else RAY_ADDRESS (inside a Ray job, as `madpo submit`
    runs us, it points at the job's cluster), else "local" for a fresh local cluster.

    Why "local" rather than Ray's default of no address: with none, ray.init joins whatever address
    the last `ray start` on this machine wrote to <tmp>/ray/ray_current_cluster, even when that
    cluster is long gone (a killed `ray start` leaves the file behind), and then refuses `num_cpus`
    with an error that says nothing of the stale file. Pass address="auto" to join a `ray start`
    cluster on this machine on purpose."""
    return configured or os.environ.get("RAY_ADDRESS") or "local"


def largest_node_cpus() -> float:
    """The most CPUs one alive node offers: no actor or task can hold more (on a cluster of small
    nodes, the cluster's total would be a request that never schedules)."""
    import ray

    return max((float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]), default=1.0) or 1.0


def latest_checkpoint(storage_path: Path, name: str):
    """The newest complete checkpoint a previous attempt of this run left, for cross-process resume."""
    import ray.train

    best = newest_checkpoint(find_checkpoints(str(Path(storage_path) / name)))
    return ray.train.Checkpoint.from_directory(str(best)) if best else None


# Below this size a parquet input is read by the driver and handed to Ray as one Arrow table:
# Ray Data's read tasks took about 6 s to start and finish on the default run's 7.5 MiB of scored
# pairs (2 cores), several times the read itself. Larger inputs are read by Ray Data's tasks.
DRIVER_READ_MAX_BYTES = 256 * 2**20


def parquet_dataset(path: str, columns: list[str]):
    """A Ray Dataset of `columns` of a parquet file or folder of files."""
    import ray.data

    files = [Path(path)] if Path(path).is_file() else list(Path(path).rglob("*.parquet"))
    if sum(f.stat().st_size for f in files) <= DRIVER_READ_MAX_BYTES:
        import pyarrow.parquet as pq

        return ray.data.from_arrow(pq.read_table(path, columns=columns))
    return ray.data.read_parquet(path).select_columns(columns)


def run_trainer(train_loop: Callable[[dict], None], loop_config: dict, cfg: RayConfig, *, name: str,
                storage_path: Path, datasets: Optional[dict] = None, resume: bool = True,
                num_workers: Optional[int] = None):
    """One TorchTrainer run; resumes from the last checkpoint under storage_path/name if any.

    `datasets` reach every worker whole (`get_dataset_shard`); the training loop's seeded
    sampler shards them, so the batch order is exact on resume and the same for any worker count."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    storage_path = Path(storage_path).resolve()
    workers = num_workers or cfg.num_workers
    resume_from = latest_checkpoint(storage_path, name) if resume else None
    if resume_from is not None:
        log.info("%s: resuming from %s", name, resume_from.path)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage_path),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": worker_env()},
        ),
        resume_from_checkpoint=resume_from,
        datasets=datasets or {},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    return trainer.fit()
