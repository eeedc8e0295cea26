"""The thin Ray layer: cluster connection and TorchTrainer plumbing. Nothing else imports Ray
at module level, so data, models and losses stay testable without a cluster."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from madpo_ray.config import RayConfig

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
    # A Tune actor reused for the next trial waits this long for the last one's thread to end (tracking
    # closed); Tune's 2 s default fails the next trial when that takes longer (a remote MLflow, busy cores).
    "TUNE_FUNCTION_THREAD_TIMEOUT_S": "60",
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


class TrainingQueue:
    """The trainings a worker group is to run, in order (a threaded Ray actor with no CPU of its
    own: a call may wait, up to its timeout, for what it asks about, instead of being polled).

    The driver posts a training and waits for it to be marked finished; every worker asks for
    training `index` (all get the same) and rank 0 marks it finished once its outputs are saved.
    `None` posted means: no more trainings, leave the loop."""

    def __init__(self):
        self.jobs: list = []
        self.finished: set[int] = set()
        self.taken: dict[int, float] = {}  # when a worker first took it
        self.takers: dict[int, set[str]] = {}  # the worker processes that took it
        self.changed = threading.Condition()

    def post(self, job) -> int:
        with self.changed:
            self.jobs.append(job)
            self.changed.notify_all()
            return len(self.jobs) - 1

    def first_unfinished(self) -> int:
        """Where a (re)started worker group picks up: a training a failed group left half done is
        taken again and resumes from its checkpoint."""
        return min(set(range(len(self.jobs) + 1)) - self.finished)

    def job(self, index: int, worker: str = "", timeout: float = 0.0):
        """("run", job) for training `index`, ("stop", None) for the end, or ("wait", None) when it is
        not posted within `timeout` seconds. Records when it was first taken, and by which worker
        processes."""
        with self.changed:
            if not self.changed.wait_for(lambda: index < len(self.jobs), timeout):
                return "wait", None
            self.taken.setdefault(index, time.time())
            self.takers.setdefault(index, set()).add(worker)
            return ("stop", None) if self.jobs[index] is None else ("run", self.jobs[index])

    def finish(self, index: int) -> None:
        """Mark a job done and let go of it: its examples' object-store references would otherwise
        stay pinned until the run ends (a restarted group never takes a finished job again)."""
        with self.changed:
            self.finished.add(index)
            if self.jobs[index] is not None:
                self.jobs[index] = {"kind": self.jobs[index].get("kind"), "released": True}
            self.changed.notify_all()

    def status(self, index: int, timeout: float = 0.0) -> tuple[bool, Optional[float], list[str]]:
        """Whether training `index` finished (waiting up to `timeout` seconds for it), when a worker
        first took it, and which worker processes took it."""
        with self.changed:
            done = self.changed.wait_for(lambda: index in self.finished, timeout)
            return done, self.taken.get(index), sorted(self.takers.get(index, ()))


def next_training(queue, index: int, wait_seconds: float = 10.0):
    """In a worker: wait for training `index` of the queue; None when the driver posted the end."""
    import ray

    while True:
        what, job = ray.get(queue.job.remote(index, f"{socket.gethostname()}:{os.getpid()}", wait_seconds))
        if what != "wait":
            return job if what == "run" else None


def first_unfinished(queue) -> int:
    import ray

    return ray.get(queue.first_unfinished.remote())


def finish_training(queue, index: int) -> None:
    import ray

    ray.get(queue.finish.remote(index))


class TrainingGroup:
    """One Ray Train worker group (one TorchTrainer.fit, in a background thread) for every
    training of a pipeline run: the workers start once, keep their imports, and take each
    training from a `TrainingQueue` (launcher.train_loop_per_worker). Ray Train still restarts
    failed workers (ray.max_failures); the restarted group takes the unfinished training again and
    resumes from its checkpoint on storage.

    Every checkpoint is reported as `<storage_path>/<name>/<training>/checkpoint_<step>` (the
    stage's checkpoint root, layout.RunLayout.checkpoint_root). Ray's record of an earlier run's
    checkpoints (its snapshot) is removed before the group starts: a resume reads the checkpoints
    on storage, and the snapshot would name folders that a stage redone since has deleted (Ray
    refuses to start on that)."""

    def __init__(self, train_loop: Callable[[dict], None], cfg: RayConfig, storage_path: Path, name: str,
                 starting_since: Optional[float] = None, jobs: int = 1):
        """`starting_since`: when the caller began starting what the group needs (the Ray cluster);
        the first job's wait counts from then. `jobs`: how many jobs the run may post. Ray Train
        counts restarts over the whole fit(), not per job, so the group allows ray.max_failures
        times that many in all (a run that lost a worker in each of two stages must not fail)."""
        import ray

        self.starting_since = starting_since or time.time()
        # Every worker waits inside a call; the driver's post and finish must still get a thread.
        self.queue = ray.remote(num_cpus=0, max_concurrency=cfg.num_workers + 4)(TrainingQueue).remote()
        self.error: Optional[BaseException] = None
        self.busy = False  # a training is posted and not finished
        storage_path = Path(storage_path).resolve()
        (storage_path / name / "checkpoint_manager_snapshot.json").unlink(missing_ok=True)
        trainer = torch_trainer(train_loop, {"queue": self.queue}, cfg, storage_path, name,
                                max_failures=cfg.max_failures * max(1, jobs))
        self.thread = threading.Thread(target=self.fit, args=(trainer,), name="madpo-training-group", daemon=True)
        self.thread.start()
        log.info("started a Ray Train worker group of %d worker(s) for the run's trainings", cfg.num_workers)

    def fit(self, trainer) -> None:
        try:
            trainer.fit()
        except Exception as e:  # noqa: BLE001 - raised in the driver's thread, waiting in run()
            self.error = e

    def run(self, loop_config: dict, wait_seconds: float = 1.0) -> dict:
        """Post one training and wait until rank 0 has saved it. Returns how long it waited for a
        worker to take it (for the first job, the group's start and the cluster's if the caller
        started one; about 0 after) and which worker processes took it (host:pid; the same for
        every job of one group)."""
        import ray

        self.busy = True
        posting = time.time()  # before the post: a waiting worker may take the job before post returns
        index = ray.get(self.queue.post.remote(loop_config))
        posted = self.starting_since if index == 0 else posting
        while True:
            done, taken, workers = ray.get(self.queue.status.remote(index, wait_seconds))
            if done:
                self.busy = False
                return {"workers_wait_seconds": (taken or posted) - posted, "worker_processes": workers}
            if not self.thread.is_alive():  # Ray Train gave up (ray.max_failures): its error, as fit() raised it
                raise self.error or RuntimeError(f"the Ray Train workers stopped during {loop_config.get('stage')!r}")

    def close(self, timeout: float = 60.0) -> None:
        """Tell idle workers to leave their loop and wait for fit() to return. Workers still
        training (the driver stopped on an error or Ctrl-C) are not waited for: they end with the
        driver's Ray job."""
        import ray

        if self.busy or not self.thread.is_alive():
            return
        ray.get(self.queue.post.remote(None))
        self.thread.join(timeout)
        if self.thread.is_alive():
            log.warning("the Ray Train worker group did not stop within %.0f s", timeout)
            return
        ray.kill(self.queue)


def torch_trainer(train_loop: Callable[[dict], None], loop_config: dict, cfg: RayConfig, storage_path: Path,
                  name: str, max_failures: int):
    """The TorchTrainer of a worker group: gloo on CPU, NCCL on GPU, `max_failures` restarts."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage_path),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": worker_env()},
        ),
    )
