"""Experiment tracking: every training's reports, from rank 0, to MLflow and TensorBoard, and
to a small progress file that the driver's progress bar reads.

A training (a pipeline stage, a Tune trial, a `madpo compare` training) is tracked by wrapping
its session: `with tracked(session, target) as session:` logs each `session.report(metrics)`
and closes the MLflow run as FINISHED, or FAILED when the training raises. The loop does not
know about tracking. Nothing here imports Ray.

Resume: the loop reports `resumed_from_step` (0 for a fresh start). A resumed training
continues its unfinished MLflow run (found by its `madpo.training` tag) and hides the
TensorBoard events past the resume point (`purge_step`); a fresh start gets a new MLflow run
and an empty TensorBoard folder, so curves never mix two trainings.

The default MLflow store is a file store under the run folder: no server, readable by
`mlflow ui --backend-store-uri <run>/mlruns` (with MLFLOW_ALLOW_FILE_STORE=true, which MLflow 3
asks for since it put the file store in maintenance mode). `tracking.uri` names a server.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from madpo_ray.io import write_json
from madpo_ray.layout import RunLayout

log = logging.getLogger("madpo_ray.tracking")

TRAINING_TAG = "madpo.training"
# Bookkeeping keys of a report that are not curves.
NOT_CURVES = {"step", "total_steps", "resumed_from_step", "eta_s"}


@dataclass
class TrackTarget:
    """Where one training's reports go. Plain data: it travels in a Ray Train loop config."""

    training: str  # "sft", "reward", "policy/madpo", "tune/madpo/<trial>", "compare/madpo/seed0"
    experiment: str
    mlflow_uri: Optional[str] = None  # None: no MLflow
    tensorboard_dir: Optional[str] = None  # None: no TensorBoard
    progress_path: Optional[str] = None  # None: no progress file
    params: dict = field(default_factory=dict)

    @classmethod
    def of(cls, value) -> Optional["TrackTarget"]:
        return cls(**value) if isinstance(value, dict) else value


def flat_params(section: dict, prefix: str = "") -> dict[str, str]:
    """A nested config section as MLflow params ("optim.lr" -> "0.0002")."""
    out: dict[str, str] = {}
    for key, value in section.items():
        if isinstance(value, dict):
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:500]
    return out


def tracking_target(cfg, training: str, params: Optional[dict] = None,
                    progress: bool = False) -> Optional[TrackTarget]:
    """The target of a training of run `cfg` (None when tracking is off): MLflow in the run
    folder's file store unless `tracking.uri` is set, TensorBoard under tensorboard/<training>."""
    t, lay = cfg.tracking, RunLayout.of(cfg)
    uri = (t.uri or lay.mlruns_dir.as_uri()) if t.mlflow else None
    board = str(lay.tensorboard_dir(training)) if t.tensorboard else None
    path = str(lay.progress_path(training)) if progress else None
    if uri is None and board is None and path is None:
        return None
    return TrackTarget(training, t.experiment or cfg.name, uri, board, path, flat_params(params or {}))


def curves(metrics: dict) -> dict[str, float]:
    """The finite numbers of a report, bookkeeping keys left out."""
    return {k: float(v) for k, v in metrics.items()
            if k not in NOT_CURVES and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(float(v))}


def experiment_id(client, name: str) -> str:
    """Get or create. A server refuses a second creation (caught here); the file store does not
    check, so trainings that may start at once (Tune trials, compare tasks) need the driver to
    create it first (`ensure_experiment`)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        return client.get_experiment_by_name(name).experiment_id


def preload() -> None:
    """Import the tracking libraries now: a long-lived worker (the run's Ray Train group) pays
    their ~1.5 s once while it starts, not inside its first training."""
    from mlflow.tracking import MlflowClient  # noqa: F401
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401


def mlflow_client(uri: str):
    """An MlflowClient for `uri`. MLflow 3 put the file store in maintenance mode: opening one
    needs MLFLOW_ALLOW_FILE_STORE (set here unless the user set it)."""
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(target: Optional[dict]) -> None:
    """On the driver, before parallel trainings: their experiment exists, so none of them creates
    it (two would create two experiments of one name in a file store). A failure is a warning."""
    if not target or not target.get("mlflow_uri"):
        return
    try:
        experiment_id(mlflow_client(target["mlflow_uri"]), target["experiment"])
    except Exception as e:
        log.warning("MLflow experiment %s at %s: %s", target["experiment"], target["mlflow_uri"], e)


def end_stopped_trials(target, errored: frozenset = frozenset()) -> int:
    """After a search: end the search's trial runs still RUNNING, and return how many: FAILED
    for a trial id in `errored` (its actor died: out of memory, a lost node), KILLED otherwise
    (stopped early by the scheduler). A trial run normally ends itself (`tracked`); one whose
    actor was killed mid-report cannot. A resumed search reopens them (`MlflowRun.unfinished`).
    A tracking server that is down is a warning here too, never a lost search result."""
    target = TrackTarget.of(target)
    if target is None or not target.mlflow_uri:
        return 0
    try:
        return end_running_runs(target, errored)
    except Exception as e:
        log.warning("could not end the open MLflow runs of %s at %s: %s", target.training, target.mlflow_uri, e)
        return 0


def end_running_runs(target: TrackTarget, errored: frozenset) -> int:
    client = mlflow_client(target.mlflow_uri)
    experiment = client.get_experiment_by_name(target.experiment)
    if experiment is None:
        return 0
    prefix = f"{target.training}/"  # matched here, not in the filter: no quoting of the search's name
    running = client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                 max_results=10_000)
    ended = 0
    for run in running:
        training = run.data.tags.get(TRAINING_TAG, "")
        if training.startswith(prefix):
            client.set_terminated(run.info.run_id, status="FAILED" if training[len(prefix):] in errored else "KILLED")
            ended += 1
    return ended


class MlflowRun:
    """One MLflow run per training, through MlflowClient (no global active-run state, so trials
    in one process never log into each other's runs)."""

    def __init__(self, target: TrackTarget, resumed: bool):
        self.client = mlflow_client(target.mlflow_uri)
        experiment_id = self.experiment_id(target.experiment)
        previous = self.unfinished(experiment_id, target.training) if resumed else None
        if previous is not None:
            self.run_id = previous
            self.client.update_run(previous, status="RUNNING")
            return
        run = self.client.create_run(experiment_id, run_name=target.training, tags={TRAINING_TAG: target.training})
        self.run_id = run.info.run_id
        self.log_params(target.params)

    def experiment_id(self, name: str) -> str:
        return experiment_id(self.client, name)

    def unfinished(self, experiment_id: str, training: str) -> Optional[str]:
        """The newest run of this training if it did not finish: a resumed training continues it
        (FAILED when the training raised, RUNNING when its worker was killed)."""
        runs = self.client.search_runs([experiment_id], filter_string=f"tags.`{TRAINING_TAG}` = '{training}'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0].info.run_id if runs and runs[0].info.status != "FINISHED" else None

    def log_params(self, params: dict[str, str]) -> None:
        """The training's settings, in batches: MLflow takes at most 100 params per call."""
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


class Tracker:
    """Logs reports to the target's backends. Opened at the first report, when the loop has
    said whether it resumed."""

    def __init__(self, target: TrackTarget):
        self.target = target
        self.mlflow: Optional[MlflowRun] = None
        self.board = None
        self.opened = False

    def open(self, resumed_from: int) -> None:
        """Each backend on its own: one that cannot start (a server down) is warned about and
        left out, the others and the training go on."""
        t, self.opened = self.target, True
        if t.mlflow_uri:
            try:
                self.mlflow = MlflowRun(t, resumed=resumed_from > 0)
            except Exception as e:
                log.warning("MLflow tracking of %s is off: %s at %s", t.training, e, t.mlflow_uri)
        if t.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            try:
                if resumed_from == 0:
                    shutil.rmtree(t.tensorboard_dir, ignore_errors=True)
                self.board = SummaryWriter(t.tensorboard_dir, purge_step=resumed_from + 1 if resumed_from else None)
            except OSError as e:
                log.warning("TensorBoard logging of %s is off: %s", t.training, e)

    def log(self, metrics: dict) -> None:
        """One report to every backend, at its step (opening them at the first report)."""
        if not self.opened:
            self.open(int(metrics.get("resumed_from_step", 0)))
        step, values = int(metrics["step"]), curves(metrics)
        if self.mlflow is not None:
            self.mlflow.log(step, values)
        if self.board is not None:
            for key, value in values.items():
                self.board.add_scalar(key, value, step)
            self.board.flush()
        if self.target.progress_path:
            write_progress(Path(self.target.progress_path), metrics)

    def close(self, status: str) -> None:
        """End the MLflow run; a server down at the end is a warning, never a failed training."""
        try:
            if self.mlflow is not None:
                self.mlflow.close(status)
        except Exception as e:
            log.warning("tracking %s: could not mark the MLflow run %s: %s", self.target.training, status, e)
        if self.board is not None:
            self.board.close()


def write_progress(path: Path, metrics: dict) -> None:
    """Atomically (io.write_json), so the driver never reads half a file."""
    write_json(path, {k: metrics[k] for k in ("step", "total_steps", "loss", "tokens_per_s", "eta_s") if k in metrics})


class TrackedSession:
    """A session whose reports are also tracked (rank 0 only, see `tracked`)."""

    def __init__(self, inner, tracker: Tracker):
        self.inner, self.tracker = inner, tracker

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def report(self, metrics: dict, checkpoint_dir: Optional[str] = None) -> None:
        """Tracked before the report: a Tune scheduler stops a trial inside its report
        (sys.exit(0)) and tears the actor down, leaving no time to track the metrics it was
        judged on afterwards (measured: the run of a trial stopped at its first report was never
        created). The cost: a report that then fails is tracked, and tracked again when a resume
        replays its step, as the steps after the last checkpoint always are."""
        self.track(metrics)
        self.inner.report(metrics, checkpoint_dir)

    def report_metrics(self, metrics: dict) -> None:
        self.track(metrics)
        self.inner.report_metrics(metrics)

    def track(self, metrics: dict) -> None:
        try:
            self.tracker.log(metrics)
        except Exception as e:  # a tracking server that is down must not stop a training
            log.warning("tracking %s failed at step %s: %s", self.tracker.target.training, metrics.get("step"), e)


@contextlib.contextmanager
def tracked(session, target):
    """`session` with its reports tracked to `target` (a TrackTarget or its dict) on rank 0;
    the session itself elsewhere or when target is None."""
    target = TrackTarget.of(target)
    if target is None or session.info.rank != 0:
        yield session
        return
    tracker = Tracker(target)
    try:
        yield TrackedSession(session, tracker)
    except SystemExit as e:  # how Ray Tune ends a trial its scheduler stopped: sys.exit(0) in the report
        tracker.close("FAILED" if e.code else "KILLED")
        raise
    except BaseException:
        tracker.close("FAILED")
        raise
    tracker.close("FINISHED")
