"""Experiment tracking (madpo_ray/tracking.py) on real trainings in one process: every report
reaches MLflow and TensorBoard, read back with the libraries' own readers; a training that
crashes and resumes continues its MLflow run and TensorBoard hides the replayed steps; a fresh
start is a new run; a tracking backend that cannot start never stops the training."""

import json
import os
from dataclasses import replace

import pytest

from madpo_ray.config import load_config
from madpo_ray.engine.sessions import LocalSession
from madpo_ray.tracking import TRAINING_TAG, tracked, tracking_target

from helpers import TINY_SETS

os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the readers, too, open the file store

POLICY_CURVES = {"loss", "lr", "grad_norm", "tokens_per_s", "padding_share", "reward_accuracy", "implicit_margin",
                 "logratio_chosen", "logratio_rejected", "margin_mean", "margin_abs_mean",
                 "weight_mean", "weight_min", "weight_max"}


class CrashingSession(LocalSession):
    """Raises once after optimiser step `crash_at` (as a lost worker would, between checkpoints)."""

    def __init__(self, *args, crash_at: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.crash_at = crash_at

    def after_step(self, step: int, batches=()) -> None:
        if step == self.crash_at:
            self.crash_at = None
            raise RuntimeError("worker lost")


def _cfg(tmp_path, steps, *extra):
    return load_config("tiny", TINY_SETS + [f"runs_dir={tmp_path}", "name=tracked", f"policy.optim.max_steps={steps}",
                                            "policy.optim.report_every=1", "policy.optim.checkpoint_every=2", *extra])


def _train(cfg, scored_train, model_dir, session_cls=LocalSession, root=None, target="default", **kw):
    from madpo_ray.data.scored import load_policy_examples
    from madpo_ray.stages.policy import train_policy

    session = session_cls({"train": load_policy_examples(scored_train, cfg.policy.loss.name)},
                          checkpoint_root=str(root) if root else None, **kw)
    if target == "default":
        target = tracking_target(cfg, "policy/madpo", {"policy": cfg.policy.model_dump(mode="json")}, progress=True)
    with tracked(session, target) as tracked_session:
        train_policy(cfg, tracked_session, model_dir=str(model_dir))
    return session.reports


def _mlflow_runs(cfg):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(cfg.run_dir.resolve() / "mlruns").as_uri())
    experiment = client.get_experiment_by_name(cfg.name)
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def _board(cfg, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(cfg.run_dir.resolve() / "tensorboard" / "policy" / "madpo"))
    acc.Reload()
    events = acc.Scalars(tag)
    steps = [e.step for e in events]
    assert len(steps) == len(set(steps)), f"step logged twice: {steps}"
    return {e.step: e.value for e in events}, acc.Tags()["scalars"]


def test_every_report_reaches_mlflow_tensorboard_and_the_progress_file(tmp_path, tiny_base_dir, scored_train):
    cfg = _cfg(tmp_path, 4)
    reports = _train(cfg, scored_train, tiny_base_dir)
    assert [r["step"] for r in reports] == [1, 2, 3, 4]
    client, runs = _mlflow_runs(cfg)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "policy/madpo"
    assert run.data.tags[TRAINING_TAG] == "policy/madpo"
    assert run.data.params["policy.loss.name"] == "madpo" and run.data.params["policy.optim.max_steps"] == "4"
    assert POLICY_CURVES <= set(run.data.metrics)
    assert not {"step", "total_steps", "eta_s", "resumed_from_step"} & set(run.data.metrics)  # bookkeeping, not curves
    for key in ("loss", "weight_mean", "logratio_chosen"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r[key])) for r in reports]
    losses, tags = _board(cfg, "loss")
    assert POLICY_CURVES <= set(tags)
    assert losses == {r["step"]: pytest.approx(r["loss"]) for r in reports}
    progress = json.loads((cfg.run_dir / "logs" / "progress" / "policy-madpo.json").read_text())
    assert progress["step"] == progress["total_steps"] == 4 and progress["loss"] == pytest.approx(reports[-1]["loss"])


def test_a_crashed_training_resumes_into_the_same_run_and_tensorboard_hides_the_replayed_steps(
        tmp_path, tiny_base_dir, scored_train):
    """Steps 1-3 reported, checkpoint at 2, crash after step 4's update: the resumed training
    re-reports 3 (and reports 4, 5). One MLflow run, FAILED then FINISHED; TensorBoard shows
    each step once, step 3 with the resumed value."""
    cfg, root = _cfg(tmp_path, 5), tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="worker lost"):
        _train(cfg, scored_train, tiny_base_dir, CrashingSession, root, crash_at=4)
    _, runs = _mlflow_runs(cfg)
    assert [r.info.status for r in runs] == ["FAILED"]
    resumed = _train(cfg, scored_train, tiny_base_dir, root=root)
    assert [r["step"] for r in resumed] == [3, 4, 5] and resumed[0]["resumed_from_step"] == 2
    client, runs = _mlflow_runs(cfg)
    assert [r.info.status for r in runs] == ["FINISHED"]
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]
    assert steps == [1, 2, 3, 3, 4, 5]  # MLflow keeps both values of the replayed step
    losses, _ = _board(cfg, "loss")
    assert sorted(losses) == [1, 2, 3, 4, 5]
    assert losses[3] == pytest.approx(resumed[0]["loss"])


def test_a_fresh_start_is_a_new_run_with_fresh_curves(tmp_path, tiny_base_dir, scored_train):
    first = _train(_cfg(tmp_path, 3), scored_train, tiny_base_dir)
    second = _train(_cfg(tmp_path, 2, "policy.optim.lr=1e-3"), scored_train, tiny_base_dir)
    _, runs = _mlflow_runs(_cfg(tmp_path, 2))
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    assert [r.data.params["policy.optim.lr"] for r in runs] == ["5e-05", "0.001"]
    losses, _ = _board(_cfg(tmp_path, 2), "loss")
    assert losses == {r["step"]: pytest.approx(r["loss"]) for r in second}  # none of the first training's 3 steps
    assert len(first) == 3


def test_a_tracking_backend_that_cannot_start_never_stops_the_training(tmp_path, tiny_base_dir, scored_train, caplog):
    cfg = _cfg(tmp_path, 2)
    target = tracking_target(cfg, "policy/madpo")
    (tmp_path / "not-a-folder").write_text("")
    broken = replace(target, mlflow_uri=(tmp_path / "not-a-folder" / "mlruns").as_uri())
    reports = _train(cfg, scored_train, tiny_base_dir, target=broken)
    assert [r["step"] for r in reports] == [1, 2]
    assert any("MLflow tracking of policy/madpo is off" in r.getMessage() for r in caplog.records)
    losses, _ = _board(cfg, "loss")  # TensorBoard still got every report
    assert sorted(losses) == [1, 2]


def test_tracking_off_writes_nothing(tmp_path, tiny_base_dir, scored_train):
    cfg = _cfg(tmp_path, 2, "tracking.mlflow=false", "tracking.tensorboard=false")
    assert tracking_target(cfg, "policy/madpo") is None
    _train(cfg, scored_train, tiny_base_dir, target=tracking_target(cfg, "policy/madpo"))
    assert not (cfg.run_dir / "mlruns").exists() and not (cfg.run_dir / "tensorboard").exists()


def test_after_a_search_its_runs_left_running_are_killed_and_nothing_else_is(tmp_path):
    """A trial whose actor died mid-report leaves its MLflow run RUNNING; the search ends those,
    and only its own (FAILED where Tune says the trial errored, KILLED otherwise): another
    search's run, ended trials and the stage runs stay as they are."""
    from mlflow.tracking import MlflowClient

    from madpo_ray.tracking import TrackTarget, end_stopped_trials

    uri = (tmp_path / "mlruns").as_uri()
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("run")
    status = {}
    for training, end in [("tune/a/t1", None), ("tune/a/t2", "FINISHED"), ("tune/a/t3", None), ("tune/ab/t4", None),
                          ("tune/a_b/t5", None), ("tune/aXb/t6", None), ("reward", None), ("tune/a/t7", "FAILED")]:
        run = client.create_run(experiment, run_name=training, tags={TRAINING_TAG: training})
        if end:
            client.set_terminated(run.info.run_id, status=end)
        status[training] = run.info.run_id
    assert end_stopped_trials(TrackTarget("tune/a", "run", mlflow_uri=uri), errored=frozenset({"t3"})) == 2
    assert end_stopped_trials(TrackTarget("tune/a_b", "run", mlflow_uri=uri)) == 1  # "_" is literal here
    got = {name: client.get_run(run_id).info.status for name, run_id in status.items()}
    assert got == {"tune/a/t1": "KILLED", "tune/a/t2": "FINISHED", "tune/a/t3": "FAILED", "tune/ab/t4": "RUNNING",
                   "tune/a_b/t5": "KILLED", "tune/aXb/t6": "RUNNING", "reward": "RUNNING", "tune/a/t7": "FAILED"}
    (tmp_path / "not-a-folder").write_text("")
    broken = (tmp_path / "not-a-folder" / "mlruns").as_uri()
    assert end_stopped_trials(TrackTarget("tune/a", "run", mlflow_uri=broken)) == 0  # a store that fails: a warning
    assert end_stopped_trials(TrackTarget("tune/a", "run")) == 0  # MLflow off: nothing to do
    assert end_stopped_trials(None) == 0


class StoppedInReport(LocalSession):
    """Ray Tune's way of stopping a trial its scheduler judged: sys.exit(code) inside the report."""

    def __init__(self, code):
        super().__init__()
        self.code = code

    def report(self, metrics: dict, checkpoint_dir=None) -> None:
        super().report(metrics, checkpoint_dir)
        raise SystemExit(self.code)


@pytest.mark.parametrize("code,status", [(0, "KILLED"), (None, "KILLED"), (3, "FAILED")])
def test_a_trial_stopped_inside_its_report_ends_killed_with_that_report_tracked(tmp_path, code, status):
    from madpo_ray.tracking import TrackTarget

    uri = (tmp_path / "mlruns").as_uri()
    with pytest.raises(SystemExit):
        with tracked(StoppedInReport(code), TrackTarget("tune/s/t1", "run", mlflow_uri=uri)) as session:
            session.report({"step": 2, "loss": 0.5})
            session.report({"step": 4, "loss": 0.25})  # never reached: the first report ended the trial
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("run").experiment_id])
    assert run.info.status == status
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(2, 0.5)]
