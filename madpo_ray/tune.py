"""Ray Tune over the policy stage: MADPO's weighting hyperparameters (c_max, tau, lam), beta, lr.

Each trial is a *function trainable on one worker* launching the policy training as the
pipeline's policy stage and `madpo compare` do (launcher.py, with a Tune session), not a TorchTrainer per trial:
on small clusters a TorchTrainer inside a trial adds ~20 s of start-up and a second placement
group per trial (the starvation of ray-project/ray#54305); one worker per trial lets
`max_concurrent_trials` equal the free CPUs. Every trial reads the same scored parquet: nothing
is re-scored. The search-space schema is in `tune_space.py`.

Resuming never unpickles Tune's experiment state from the run folder (shared storage: a pickle
there is code anyone with write access could plant). Each trial that finishes writes its
parameters and last report as JSON under tune/<search>/finished_trials/; `--resume` runs the
same search again, and a trial whose parameters match a record reports the recorded result at
once instead of training (random and Optuna searches are seeded with the recorded points first).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Optional

import torch

from madpo_ray.config import ConfigError, PipelineConfig
from madpo_ray.console import quiet_libraries
from madpo_ray.data.scored import load_policy_examples, read_scored
from madpo_ray.engine.sessions import RayTuneSession
from madpo_ray.generation import stage_generator
from madpo_ray.io import read_jsonl, write_json, write_text_atomically
from madpo_ray.launcher import Training, launch, tracking_for
from madpo_ray.models import load_reward_model, load_tokenizer
from madpo_ray.plotting import pyplot, save
from madpo_ray.runlock import RunLock
from madpo_ray.runtime import init_ray
from madpo_ray.stages.measures import (gold_reward_by_temperature, greedy_gold_reward, mean_reward_model_score,
                                       pair_logprobs, preference_metrics)
from madpo_ray.stages.score import ComputePolicy
from madpo_ray.tracking import end_stopped_trials, ensure_experiment, flat_params
from madpo_ray.tune_space import GOLD_BY_TEMPERATURE, LOSS_PARAMS, OPTIM_PARAMS, SearchSpace

log = logging.getLogger("madpo_ray.tune")


def apply_trial_params(cfg: PipelineConfig, params: dict, loss: str) -> PipelineConfig:
    """The pipeline config a trial trains with: the searched loss parameters on `loss` (or on the
    searched loss `name`), keeping the base config's parameters that loss also takes."""
    loss_params = {k: v for k, v in params.items() if k in LOSS_PARAMS and k != "name"}
    sets = {"policy.loss": cfg.policy.loss.switched_to(params.get("name", loss), **loss_params)}
    sets.update({f"policy.optim.{k}": v for k, v in params.items() if k in OPTIM_PARAMS})
    return cfg.derive(sets)


# --------------------------------------------------------------------------- the trial
def trial_evaluator(cfg: PipelineConfig, objective: str, scored_validation: str, validation_docs: Optional[str],
                    reward_dir: Optional[str], tok):
    """The held-out metrics a trial reports (what ASHA prunes on and the search selects by), on the
    validation split only: the sealed test split is for the final step (`madpo compare --final`), never for selection."""
    eval_rows = read_scored(scored_validation)
    docs, rm, rm_prompts = None, None, []
    if objective in ("gold_reward", *GOLD_BY_TEMPERATURE) and validation_docs:
        docs = read_jsonl(Path(validation_docs))[:cfg.eval.num_prompts]
    if objective == "rm_reward":
        rm = load_reward_model(reward_dir, pad_token_id=tok.pad_token_id).eval()
        rm_prompts = list(dict.fromkeys(r["prompt"] for r in eval_rows))[:cfg.eval.num_prompts]

    generator = stage_generator(cfg) if docs is not None or rm is not None else None

    def evaluate(model) -> dict:
        pc, pr = pair_logprobs(model, eval_rows, tok.pad_token_id, policy=ComputePolicy.of(cfg))
        m = preference_metrics(eval_rows, pc, pr)
        out = {"heldout_preference_accuracy": m["policy_preference_accuracy"],
               "implicit_reward_accuracy": m["policy_implicit_reward_accuracy"]}
        if "policy_gold_preference_accuracy" in m:
            out["gold_preference_accuracy"] = m["policy_gold_preference_accuracy"]
        if generator is not None:
            generator.use(model, tok)
        if docs is not None and objective in GOLD_BY_TEMPERATURE:
            out.update(gold_reward_by_temperature(generator, docs, cfg))
        elif docs is not None:
            out["gold_reward"], _ = greedy_gold_reward(generator, docs, cfg)
        if rm is not None:
            out["rm_reward"] = mean_reward_model_score(generator, rm, rm_prompts, cfg)
        return out

    # A reused trial actor (reuse_actors) runs the next trial in this process: its engine must go.
    evaluate.close = generator.close if generator is not None else (lambda: None)
    return evaluate


FINISHED_TRIALS = "finished_trials"


def params_key(params: dict) -> str:
    """A trial's identity for resuming: its parameters (fault-injection ones included)."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:20]


def finished_trials(out_dir: Path) -> list[dict]:
    """The records ({params, metrics}) of the search's finished trials: JSON, never a pickle."""
    folder = Path(out_dir) / FINISHED_TRIALS
    return [json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))] if folder.is_dir() else []


class LastReport:
    """Wraps a session and keeps its last report, which becomes the trial's finished record."""

    def __init__(self, inner):
        self.inner, self.metrics = inner, None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def report(self, metrics: dict, checkpoint_dir: Optional[str] = None) -> None:
        self.metrics = dict(metrics)
        self.inner.report(metrics, checkpoint_dir)


def replay_finished(params: dict, finished_dir: Optional[str]) -> bool:
    """Report a finished trial's recorded result (a resumed search), or False when there is none."""
    record = Path(finished_dir) / f"{params_key(params)}.json" if finished_dir else None
    if record is None or not record.is_file():
        return False
    from ray import tune

    tune.report(json.loads(record.read_text())["metrics"])
    return True


def trial(params: dict, *, base_config: dict, scored_train: str, scored_validation: str,
          validation_docs: Optional[str],
          model_dir: str, loss: str, objective: str, eval_every: int, fail_marker: Optional[str] = None,
          reward_dir: Optional[str] = None, tracking: Optional[dict] = None, finished_dir: Optional[str] = None) -> None:
    """One Tune trial: the policy training from the shared scored parquet, held-out metrics every eval_every steps,
    tracked as the search's training named after the trial; its last report recorded in `finished_dir`
    (a resumed search replays it instead of training again)."""
    quiet_libraries()
    if replay_finished(params, finished_dir):
        return
    torch.set_num_threads(1)
    cfg = apply_trial_params(PipelineConfig.model_validate(base_config), params, loss)
    if fail_marker and not Path(fail_marker).exists() and params.get("_fail_once"):
        Path(fail_marker).write_text("failed once")
        raise RuntimeError("fault injection: this trial fails on its first attempt")
    cfg = cfg.derive({"policy.optim.report_every": eval_every, "policy.optim.checkpoint_every": eval_every})
    evaluate = trial_evaluator(cfg, objective, scored_validation, validation_docs, reward_dir, load_tokenizer(model_dir))
    session = LastReport(RayTuneSession({"train": load_policy_examples(scored_train, cfg.policy.loss.name)},
                                        torch.device("cpu")))
    try:
        launch(Training("policy", cfg, model_dir, tracking=trial_tracking(tracking, params),
                        options={"eval_fn": evaluate, "label": f"tune/{cfg.policy.loss.name}"}), session)
    finally:  # also when the scheduler stops the trial (SystemExit inside its report)
        evaluate.close()
    if finished_dir and session.metrics is not None:
        write_json(Path(finished_dir) / f"{params_key(params)}.json", {"params": params, "metrics": session.metrics})


def trial_tracking(tracking: Optional[dict], params: dict) -> Optional[dict]:
    """The search's tracking target for this trial: named (MLflow run, TensorBoard folder) after
    the trial id, with the trial's parameters as MLflow params."""
    if tracking is None:
        return None
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    board = tracking.get("tensorboard_dir")
    return {**tracking, "training": f"{tracking['training']}/{trial_id}",
            "tensorboard_dir": f"{board}/{trial_id}" if board else None,
            "params": flat_params({k: v for k, v in params.items() if not k.startswith("_")})}


# --------------------------------------------------------------------------- the search
def search_tracking(cfg: PipelineConfig, search: str) -> Optional[dict]:
    """Trials land in the run's experiment as tune/<search>/<trial id>."""
    target = tracking_for(cfg, f"tune/{search}")
    ensure_experiment(target)
    return target


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def new_tuner(trainable, space: SearchSpace, storage: Path, num_samples: Optional[int], cpus_per_trial: float,
              fail_once: bool, finished: Optional[list[dict]] = None):
    """A Tuner: the param space, the search algorithm, ASHA, and as many trials at once as CPUs allow.
    `finished` (a resumed search): the recorded trials' parameters go first where the search samples,
    so they are replayed; a grid repeats its points by itself."""
    from ray import tune

    param_space = {k: p.to_tune() for k, p in space.params.items()}
    if fail_once:  # tests: one extra trial that fails on its first attempt (an interrupted search)
        param_space["_fail_once"] = tune.grid_search([False, True])
    sampled = space.search != "grid" and not any(isinstance(v, dict) and "grid_search" in v for v in param_space.values())
    points = [r["params"] for r in finished or []] if sampled else None
    search_alg = None
    if space.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as e:
            raise ConfigError("search: optuna needs `pip install optuna` (the `tune` extra)") from e
        search_alg = OptunaSearch(points_to_evaluate=points or None)
    elif points:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        search_alg = BasicVariantGenerator(points_to_evaluate=points)
    scheduler = None
    if space.scheduler.type == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(grace_period=space.scheduler.grace_period,
                                  reduction_factor=space.scheduler.reduction_factor, max_t=10_000)
    concurrent = max(1, int(cluster_cpus() // cpus_per_trial))
    samples = 1 if space.search == "grid" else (num_samples or space.num_samples)
    log.info("search %s: %s, %s trials, %d at a time, objective %s", space.name, space.search,
             "grid" if space.search == "grid" else samples, concurrent, space.objective)
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(metric=space.objective, mode="max", search_alg=search_alg, scheduler=scheduler,
                                    num_samples=samples, max_concurrent_trials=concurrent, reuse_actors=True),
        run_config=tune.RunConfig(name=space.name, storage_path=str(storage),
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))


def run_search(pipeline, space: SearchSpace, *, resume: bool = False, num_samples: Optional[int] = None,
               cpus_per_trial: float = 1.0, fail_once: bool = False) -> dict:
    """Run (or resume) the search; writes trials.csv/.md, best_config.yaml and a plot."""
    if pipeline.cfg.ray.backend != "ray":
        raise ConfigError("madpo tune runs trials on Ray Tune: set ray.backend=ray (the default)")

    pipeline.layout.run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(pipeline.layout.run_dir):
        return search_locked(pipeline, space, resume, num_samples, cpus_per_trial, fail_once)


def trial_inputs(pipeline) -> dict[str, Optional[str]]:
    """The files every trial reads: it trains from the SFT model on the scored train pairs, and
    reports (what the search selects by) on the validation split only, never on test."""
    lay = pipeline.layout
    return {"scored_train": str(lay.scored_path("train")), "scored_validation": str(lay.scored_path("validation")),
            "validation_docs": str(lay.docs_path("validation")) if pipeline.is_testbed else None,
            "model_dir": str(lay.model_dir("sft")), "reward_dir": str(lay.model_dir("reward"))}


def search_locked(pipeline, space: SearchSpace, resume: bool, num_samples: Optional[int], cpus_per_trial: float,
                  fail_once: bool) -> dict:
    from ray import tune

    init_ray(pipeline.cfg.ray)
    lay = pipeline.layout
    out_dir = lay.tune_dir / space.name
    out_dir.mkdir(parents=True, exist_ok=True)
    storage = lay.tune_dir.resolve()
    tracking = search_tracking(pipeline.cfg, space.name)
    finished = start_or_resume(out_dir, space.name, resume)
    trainable = tune.with_parameters(
        trial, base_config=pipeline.cfg.model_dump(mode="json"), **trial_inputs(pipeline),
        loss=space.loss, objective=space.objective,
        eval_every=space.eval_every, fail_marker=str(out_dir / ".fail_once") if fail_once else None,
        tracking=tracking, finished_dir=str(out_dir / FINISHED_TRIALS))
    trainable = tune.with_resources(trainable, {"cpu": cpus_per_trial})
    tuner = new_tuner(trainable, space, storage, num_samples, cpus_per_trial, fail_once, finished)
    results = tuner.fit()
    errored = frozenset((r.metrics or {}).get("trial_id") for r in results if r.error)
    if end_stopped_trials(tracking, errored):
        log.info("search %s: trial runs left open in MLflow ended (KILLED: stopped early; FAILED: errored)", space.name)
    return write_results(pipeline, space, results, out_dir)


def start_or_resume(out_dir: Path, search: str, resume: bool) -> list[dict]:
    """The finished trials a resumed search keeps; a new search first removes the records an
    earlier search of this name wrote (only its own JSON files), so none of them is replayed."""
    finished = finished_trials(out_dir)
    if resume:
        log.info("resuming search %s: %d finished trial(s) recorded in %s are kept, the rest run", search,
                 len(finished), out_dir / FINISHED_TRIALS)
        if not finished:
            log.warning("nothing to resume in %s: every trial runs", out_dir / FINISHED_TRIALS)
        return finished
    for record in (out_dir / FINISHED_TRIALS).glob("*.json"):
        record.unlink()
    return []


def write_results(pipeline, space: SearchSpace, results, out_dir: Path) -> dict:
    rows = []
    for r in results:
        params = {k: v for k, v in (r.config or {}).items() if not k.startswith("_")}
        m = r.metrics or {}
        rows.append({"trial_id": m.get("trial_id", r.path and Path(r.path).name), **params,
                     space.objective: m.get(space.objective), "steps": m.get("step"),  # fewer: ASHA stopped it
                     "status": "ERROR" if r.error else "TERMINATED"})
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(out_dir / "trials.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    ok = [r for r in rows if r.get(space.objective) is not None and r["status"] != "ERROR"]
    ok.sort(key=lambda r: -r[space.objective])

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    md = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    md += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in ok + [r for r in rows if r not in ok]]
    write_text_atomically(out_dir / "trials.md", "\n".join(md) + "\n")
    summary = {"search": space.name, "objective": space.objective, "trials": len(rows),
               "errored": sum(r["status"] == "ERROR" for r in rows)}
    if ok:
        best = {k: ok[0][k] for k in space.params if k in ok[0]}
        cfg = apply_trial_params(pipeline.cfg, best, space.loss)
        write_text_atomically(out_dir / "best_config.yaml", 
            f"# best trial of search {space.name}: {space.objective} = {ok[0][space.objective]:.4f}\n"
            f"# run it:  madpo run -c {out_dir / 'best_config.yaml'} --name best\n" + cfg.to_yaml())
        summary.update(best=best, best_value=ok[0][space.objective])
        plot_results(space, ok, out_dir / "search.png")
    return summary


def plot_results(space: SearchSpace, rows: list[dict], path: Path) -> None:
    """A heatmap for a 2-D grid, else the metric over the two hyperparameters that matter most."""
    plt = pyplot()
    import numpy as np

    numeric = [k for k in space.params if all(isinstance(r.get(k), (int, float)) for r in rows)]
    if not numeric:
        return
    y = np.array([r[space.objective] for r in rows], dtype=float)

    def importance(k):
        x = np.array([r[k] for r in rows], dtype=float)
        if x.std() == 0 or y.std() == 0:
            return 0.0
        rx, ry = x.argsort().argsort(), y.argsort().argsort()  # Spearman: correlation of ranks
        return abs(float(np.corrcoef(rx, ry)[0, 1]))

    keys = sorted(numeric, key=importance, reverse=True)[:2]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if len(keys) == 2 and space.search == "grid":
        xs = sorted({r[keys[0]] for r in rows})
        ys = sorted({r[keys[1]] for r in rows})
        grid = np.full((len(ys), len(xs)), np.nan)
        for r in rows:
            grid[ys.index(r[keys[1]]), xs.index(r[keys[0]])] = r[space.objective]
        im = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(xs)), [f"{v:g}" for v in xs])
        ax.set_yticks(range(len(ys)), [f"{v:g}" for v in ys])
        for i in range(len(ys)):
            for j in range(len(xs)):
                if not math.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", color="w", fontsize=8)
    elif len(keys) == 2:
        im = ax.scatter([r[keys[0]] for r in rows], [r[keys[1]] for r in rows], c=y, cmap="viridis", s=60)
    else:
        im = None
        ax.plot([r[keys[0]] for r in rows], y, "o")
    ax.set_xlabel(keys[0])
    if len(keys) == 2:
        ax.set_ylabel(keys[1])
    if im is not None:
        fig.colorbar(im, ax=ax, label=space.objective)
    ax.set_title(f"{space.name}: {space.objective}")
    fig.tight_layout()
    save(fig, path, dpi=120)
