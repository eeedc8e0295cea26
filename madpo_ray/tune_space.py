"""The Tune search-space schema (madpo_ray/tune_configs/*.yaml): which parameters, how each is sampled,
the objective, the scheduler. Pure pydantic, no Ray: a bad search space fails with the key named
before any cluster starts. The tunable loss parameters are LossConfig's fields, so a loss that
gains a parameter is tunable without editing this file."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from madpo_ray.config import ConfigError, LossConfig, check_loss_name, check_path_component
from madpo_ray.losses import get_policy_loss

# The shipped search spaces, package data; `madpo init` copies them out.
SEARCH_SPACES = resources.files("madpo_ray") / "tune_configs"
LOSS_PARAMS = frozenset(LossConfig.model_fields)  # "name" included: a search may pick the loss
OPTIM_PARAMS = frozenset({"lr", "epochs", "weight_decay", "warmup_ratio"})
TUNABLE = LOSS_PARAMS | OPTIM_PARAMS
# objectives that sample a summary per validation document at every one of eval.temperatures
GOLD_BY_TEMPERATURE = ("gold_reward_temperatures", "gold_reward_worst_temperature")
OBJECTIVES = ("heldout_preference_accuracy", "gold_preference_accuracy", "implicit_reward_accuracy", "gold_reward",
              *GOLD_BY_TEMPERATURE, "rm_reward")


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
    # gold_reward: testbed gold reward of greedy summaries of validation documents
    # gold_reward_temperatures: its mean over eval.temperatures (one summary per document each);
    # gold_reward_worst_temperature: its lowest over them (a policy that holds up at every temperature)
    # rm_reward: the frozen reward model's score of greedy completions of held-out prompts (any dataset)
    objective: Literal[OBJECTIVES] = "heldout_preference_accuracy"  # type: ignore[valid-type]
    search: Literal["random", "grid", "optuna"] = "random"
    num_samples: int = Field(8, ge=1)
    scheduler: SchedulerSpec = SchedulerSpec()
    eval_every: int = Field(10, ge=1)  # optimiser steps between held-out evaluations (ASHA's time unit)
    params: dict[str, ParamSpec]
    fixed: dict[str, Any] = {}  # pipeline overrides applied to every trial, e.g. policy.optim.epochs: 1

    @field_validator("name")
    @classmethod
    def _one_folder(cls, name: str) -> str:
        return check_path_component(name, "search name")  # tune/<name>/ in the run folder

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
    def _params_belong_to_the_loss(self):
        if "name" not in self.params:  # a search over losses checks each trial's config instead
            check_loss_name(self.loss)
            get_policy_loss(self.loss).check_params({k: None for k in self.params if k in LOSS_PARAMS})
        return self

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
    """A YAML path (a user's own file wins), or the name of a shipped search space."""
    p = Path(path)
    if not p.exists():
        p = SEARCH_SPACES / f"{path}.yaml"
        if not p.is_file():
            names = sorted(f.name[:-5] for f in SEARCH_SPACES.iterdir() if f.name.endswith(".yaml"))
            raise ConfigError(f"search space {str(path)!r} is neither a file nor a shipped one ({', '.join(names)})")
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
