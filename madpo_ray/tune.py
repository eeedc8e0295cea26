"""Ray Tune over the policy stage: MADPO's weighting hyperparameters (c_max, tau, lam), beta, lr.

Each trial is a *function trainable on one worker* running the same training engine as the
policy stage (`stages/common.fit` with a Tune session), not a TorchTrainer per trial: on small
clusters a TorchTrainer inside a trial adds ~20 s of start-up and a second placement group per
trial (the starvation of ray-project/ray#54305); one worker per trial lets `max_concurrent_trials`
equal the free CPUs. Every trial reads the same scored parquet: nothing is re-scored.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from madpo_ray.config import ConfigError, PipelineConfig

log = logging.getLogger("madpo_ray.tune")
TUNE_CONFIGS_DIR = Path(__file__).resolve().parent.parent / "tune_configs"
LOSS_PARAMS = {"c_max", "tau", "lam", "beta", "label_smoothing", "alpha", "rho", "name"}
OPTIM_PARAMS = {"lr", "epochs", "weight_decay", "warmup_ratio"}
TUNABLE = LOSS_PARAMS | OPTIM_PARAMS
OBJECTIVES = ("heldout_preference_accuracy", "gold_preference_accuracy", "implicit_reward_accuracy", "gold_reward",
              "rm_reward")


class ParamSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["uniform", "loguniform", "choice", "grid"]
    low: Optional[float] = None
    high: Optional[float] = None
    values: Optional[list[Union[float, int, str]]] = None

    @model_validator(mode="after")
    def _bounds(self):
        if self.type in ("uniform", "loguniform"):
            if self.low is None or self.high is None:
                raise ValueError(f"{self.type} needs low and high")
            if self.low > self.high:
                raise ValueError(f"low ({self.low}) > high ({self.high})")
            if self.low == self.high:
                raise ValueError(f"empty range: low == high == {self.low}")
            if self.type == "loguniform" and self.low <= 0:
                raise ValueError(f"loguniform needs low > 0, got {self.low}")
        else:
            if not self.values:
                raise ValueError(f"{self.type} needs a non-empty values list")
        return self

    def to_tune(self):
        from ray import tune

        if self.type == "uniform":
            return tune.uniform(self.low, self.high)
        if self.type == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.type == "choice":
            return tune.choice(self.values)
        return tune.grid_search(self.values)


class SchedulerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["none", "asha"] = "asha"
    grace_period: int = Field(2, ge=1)  # reports before a trial can be stopped
    reduction_factor: float = Field(3, gt=1)


class SearchSpace(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    loss: str = "madpo"
    # heldout_preference_accuracy: policy likelihood ranks the labelled-chosen response first (eval pairs)
    # gold_preference_accuracy: the same against the testbed's true margins
    # gold_reward: testbed gold reward of greedy summaries of test documents
    # rm_reward: the frozen reward model's score of greedy completions of held-out prompts (any dataset)
    objective: Literal[OBJECTIVES] = "heldout_preference_accuracy"  # type: ignore[valid-type]
    search: Literal["random", "grid", "optuna"] = "random"
    num_samples: int = Field(8, ge=1)
    scheduler: SchedulerSpec = SchedulerSpec()
    eval_every: int = Field(10, ge=1)  # optimiser steps between held-out evaluations (ASHA's time unit)
    params: dict[str, ParamSpec]
    fixed: dict[str, Any] = {}  # pipeline overrides applied to every trial, e.g. policy.optim.epochs: 1

    @field_validator("params")
    @classmethod
    def _known(cls, params: dict) -> dict:
        unknown = sorted(set(params) - TUNABLE)
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown}; tunable: {sorted(TUNABLE)}")
        if not params:
            raise ValueError("params is empty")
        return params

    @model_validator(mode="after")
    def _grid_consistency(self):
        grids = [k for k, p in self.params.items() if p.type == "grid"]
        if self.search == "grid" and len(grids) != len(self.params):
            raise ValueError(f"search: grid needs every param of type grid; not grid: "
                             f"{sorted(set(self.params) - set(grids))}")
        if self.search == "optuna" and grids:
            raise ValueError(f"optuna cannot sample grid params {grids}; use uniform/loguniform/choice")
        return self


def load_search_space(path: Union[str, Path]) -> SearchSpace:
    p = Path(path)
    if not p.exists():
        candidate = TUNE_CONFIGS_DIR / f"{path}.yaml"
        if not candidate.exists():
            raise ConfigError(f"search space {str(path)!r} not found (nor {candidate})")
        p = candidate
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    try:
        return SearchSpace.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(x) for x in err["loc"])
            lines.append(f"{key}: {err['msg']}")
        raise ConfigError(f"{p}: invalid search space:\n  " + "\n  ".join(lines)) from None


def apply_trial_params(cfg: PipelineConfig, params: dict, loss: str) -> PipelineConfig:
    """The pipeline config a trial trains with."""
    from madpo_ray.config import config_from_dict

    raw = cfg.model_dump(mode="json")
    raw["policy"]["loss"]["name"] = params.get("name", loss)
    for k, v in params.items():
        if k in LOSS_PARAMS and k != "name":
            raw["policy"]["loss"][k] = v
        elif k in OPTIM_PARAMS:
            raw["policy"]["optim"][k] = v
    return config_from_dict(raw)


# --------------------------------------------------------------------------- the trial
def trial(params: dict, *, base_config: dict, scored_train: str, scored_eval: str, test_docs: Optional[str],
          model_dir: str, loss: str, objective: str, eval_every: int, fail_marker: Optional[str] = None,
          reward_dir: Optional[str] = None) -> None:
    """One Tune trial: policy training from the shared scored parquet, held-out metrics every eval_every steps."""
    import torch

    from madpo_ray.config import PipelineConfig
    from madpo_ray.data.collate import PairCollator
    from madpo_ray.eval.summary import pair_logprobs, preference_metrics
    from madpo_ray.models import load_causal_lm, load_tokenizer
    from madpo_ray.stages._worker import quiet_libraries
    from madpo_ray.stages.common import RayTuneSession, fit
    from madpo_ray.stages.policy import PolicyStep, load_policy_examples, read_scored

    quiet_libraries()
    torch.set_num_threads(1)
    cfg = apply_trial_params(PipelineConfig.model_validate(base_config), params, loss)
    if fail_marker and not Path(fail_marker).exists() and params.get("_fail_once"):
        Path(fail_marker).write_text("failed once")
        raise RuntimeError("fault injection: this trial fails on its first attempt")
    examples = load_policy_examples(scored_train, cfg.policy.loss.name)
    eval_rows = read_scored(scored_eval)
    tok = load_tokenizer(model_dir)
    docs = None
    if objective == "gold_reward" and test_docs:
        from madpo_ray.io import read_jsonl

        docs = read_jsonl(Path(test_docs))[:cfg.eval.num_prompts]
    rm, rm_prompts = None, []
    if objective == "rm_reward":
        from madpo_ray.models import load_reward_model

        rm = load_reward_model(reward_dir, pad_token_id=tok.pad_token_id).eval()
        rm_prompts = list(dict.fromkeys(r["prompt"] for r in eval_rows))[:cfg.eval.num_prompts]

    def evaluate(model) -> dict:
        pc, pr = pair_logprobs(model, eval_rows, tok.pad_token_id)
        m = preference_metrics(eval_rows, pc, pr)
        out = {"heldout_preference_accuracy": m["policy_preference_accuracy"],
               "implicit_reward_accuracy": m["policy_implicit_reward_accuracy"]}
        if "policy_gold_preference_accuracy" in m:
            out["gold_preference_accuracy"] = m["policy_gold_preference_accuracy"]
        if docs is not None:
            from madpo_ray.eval.summary import greedy_gold_reward

            out["gold_reward"], _ = greedy_gold_reward(model, tok, docs, cfg)
        if rm is not None:
            from madpo_ray.eval.generate import generate_transformers
            from madpo_ray.eval.summary import reward_model_scores

            texts = generate_transformers(model, tok, rm_prompts, max_new_tokens=cfg.eval.max_new_tokens)
            scores = reward_model_scores(rm, tok, rm_prompts, texts)
            out["rm_reward"] = sum(scores) / len(scores)
        return out

    optim = cfg.policy.optim.model_copy(update={"report_every": eval_every, "checkpoint_every": eval_every})
    step = PolicyStep(cfg.policy.loss, optim.seed)
    fit(load_causal_lm(model_dir), examples, PairCollator(tok.pad_token_id), step, optim,
        stage=f"tune/{cfg.policy.loss.name}", extra_state={"beta_dpo": step.beta_state},
        session=RayTuneSession(torch.device("cpu")), eval_fn=evaluate)


# --------------------------------------------------------------------------- the search
def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def run_search(pipeline, space: SearchSpace, *, resume: bool = False, num_samples: Optional[int] = None,
               cpus_per_trial: float = 1.0, fail_once: bool = False) -> dict:
    """Run (or resume) the search; writes trials.csv/.md, best_config.yaml and a plot."""
    from ray import tune

    from madpo_ray.runtime import init_ray

    init_ray(pipeline.cfg.ray)
    out_dir = pipeline.run_dir / "tune" / space.name
    out_dir.mkdir(parents=True, exist_ok=True)
    storage = (pipeline.run_dir / "tune").resolve()
    fail_marker = str(out_dir / ".fail_once") if fail_once else None
    trainable = tune.with_parameters(
        trial, base_config=pipeline.cfg.model_dump(mode="json"),
        scored_train=str(pipeline.scored_path("train")), scored_eval=str(pipeline.scored_path("eval")),
        test_docs=str(pipeline.stage_dir("data") / "test_docs.jsonl") if pipeline.is_testbed else None,
        model_dir=str(pipeline.stage_dir("sft") / "model"), loss=space.loss, objective=space.objective,
        eval_every=space.eval_every, fail_marker=fail_marker,
        reward_dir=str(pipeline.stage_dir("reward") / "model"))
    trainable = tune.with_resources(trainable, {"cpu": cpus_per_trial})
    path = storage / space.name
    if resume and tune.Tuner.can_restore(str(path)):
        log.info("resuming search %s from %s", space.name, path)
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    else:
        if resume:
            log.warning("nothing to resume at %s; starting a new search", path)
        param_space = {k: p.to_tune() for k, p in space.params.items()}
        if fail_once:  # tests: one extra trial that fails on its first attempt (an interrupted search)
            param_space["_fail_once"] = tune.grid_search([False, True])
        search_alg = None
        if space.search == "optuna":
            try:
                from ray.tune.search.optuna import OptunaSearch
            except ImportError as e:
                raise ConfigError("search: optuna needs `pip install optuna` (the `tune` extra)") from e
            search_alg = OptunaSearch()
        scheduler = None
        if space.scheduler.type == "asha":
            from ray.tune.schedulers import ASHAScheduler

            scheduler = ASHAScheduler(grace_period=space.scheduler.grace_period,
                                      reduction_factor=space.scheduler.reduction_factor,
                                      max_t=10_000)
        concurrent = max(1, int(cluster_cpus() // cpus_per_trial))
        samples = 1 if space.search == "grid" else (num_samples or space.num_samples)
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric=space.objective, mode="max", search_alg=search_alg,
                                        scheduler=scheduler, num_samples=samples,
                                        max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name=space.name, storage_path=str(storage),
                                      failure_config=tune.FailureConfig(max_failures=0),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
        log.info("search %s: %s, %s trials, %d at a time, objective %s", space.name, space.search,
                 "grid" if space.search == "grid" else samples, concurrent, space.objective)
    results = tuner.fit()
    return write_results(pipeline, space, results, out_dir)


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
    (out_dir / "trials.md").write_text("\n".join(md) + "\n")
    summary = {"search": space.name, "objective": space.objective, "trials": len(rows),
               "errored": sum(r["status"] == "ERROR" for r in rows)}
    if ok:
        best = {k: ok[0][k] for k in space.params if k in ok[0]}
        cfg = apply_trial_params(pipeline.cfg, best, space.loss)
        (out_dir / "best_config.yaml").write_text(
            f"# best trial of search {space.name}: {space.objective} = {ok[0][space.objective]:.4f}\n"
            f"# run it:  madpo run -c {out_dir / 'best_config.yaml'} --name best\n" + cfg.to_yaml())
        summary.update(best=best, best_value=ok[0][space.objective])
        plot_results(space, ok, out_dir / "search.png")
    return summary


def plot_results(space: SearchSpace, rows: list[dict], path: Path) -> None:
    """A heatmap for a 2-D grid, else the metric over the two hyperparameters that matter most."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
