"""Typed pipeline configuration: pydantic models, YAML presets, dotted CLI overrides.

    cfg = load_config("tiny", ["policy.loss.beta=0.2", "ray.num_workers=1"])

Every model forbids unknown keys, so a typo fails before any Ray work starts, with a
message that names the dotted key and the value it was given.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from madpo_ray.io import write_text_atomically
from madpo_ray.losses import POLICY_LOSSES, get_policy_loss

# The shipped presets, package data (found in a wheel as in a checkout); `madpo init` copies them out.
PRESETS = resources.files("madpo_ray") / "configs"
# How a document becomes a prompt, unless data.prompt_template says otherwise. Saved with every
# model (madpo.json) so a server formats prompts as the policy was trained.
DEFAULT_PROMPT_TEMPLATE = "{document}\nTL;DR:"


class ConfigError(ValueError):
    """A bad config file or override; the message names the key and the value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(_Strict):
    """LoRA adapters (peft) on the attention projections; the reference recipe's defaults.
    The reward model's score head always trains in full."""

    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, mods: list[str]) -> list[str]:
        if not mods:
            raise ValueError("target_modules is empty")
        return mods


class ModelConfig(_Strict):
    """`name_or_path` None builds the tiny from-scratch model; otherwise any HF name or folder.

    dtype is the one dtype policy: every stage loads its models in it (training and scoring alike),
    so the policy's step-0 log-probs equal the stored reference log-probs."""

    name_or_path: Optional[str] = None
    tokenizer: Optional[str] = None  # defaults to name_or_path
    vocab_size: int = Field(2048, ge=300)
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(256, ge=8)
    max_position_embeddings: int = Field(512, ge=32)
    # The from-scratch model with sliding-window attention of this many tokens (a Mistral-shaped
    # model): the windowed path of the pair forward, end to end. None: a plain Llama.
    sliding_window: Optional[int] = Field(None, ge=2)
    dtype: Literal["float32", "bfloat16"] = "float32"
    lora: Optional[LoraConfig] = None  # null: full fine-tuning
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    # One sequence [prompt, chosen, rejected] per pair (the prompt computed once), or the two-sequence
    # fallback for attention implementations that cannot take a custom mask (madpo_ray/pair_forward.py).
    pair_forward: Literal["shared_prompt", "two_sequence"] = "shared_prompt"

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        return self


class DataConfig(_Strict):
    """Where preference pairs come from and how they are tokenised.

    source: "generated" (the embedded corpus + testbed labels), "debian" (the local Debian
    corpus cache + testbed labels), or a path / HF dataset name holding prompt/chosen/rejected.
    """

    source: str = "generated"
    split: str = "train"
    eval_split: Optional[str] = "test"  # the sealed test split: only `madpo compare --final` reads it
    validation_split: Optional[str] = None  # early stopping and tuning read it; null = hold out part of train
    validation_fraction: float = Field(0.05, gt=0, lt=0.5)  # share of train held out for a split the data lacks
    num_documents: int = Field(1500, ge=8)  # testbed: training documents
    num_validation_documents: int = Field(100, ge=4)  # testbed: documents for selection (early stopping, Tune)
    num_eval_documents: int = Field(100, ge=4)  # testbed: sealed test documents, read only by the final step
    corpus_seed: int = 0
    tier: Literal["high", "medium", "low"] = "medium"
    samples_per_document: int = Field(2, ge=1, le=16)  # SFT samples drawn per prompt for the testbed
    # More rounds of one SFT sample each, only for documents with fewer distinct samples than their
    # policy-vs-policy pairs need (identical samples make no pair; a draw that still cannot be
    # filled is skipped and counted in pairs/metrics.json, never replaced by another kind of pair).
    max_extra_sample_rounds: int = Field(6, ge=0, le=32)
    label_sharpness: float = Field(1.0, gt=0)  # Bradley-Terry: P(a > b) = sigmoid(sharpness * (gold_a - gold_b))
    label_noise: float = Field(0.0, ge=0, lt=0.5)  # testbed: share of labels flipped regardless of the gap
    # generated corpus: share of demonstrations (SFT targets) that leave out the language, which the
    # gold reward prefers in (madpo_ray/data/corpus/generated.py)
    terse_share: float = Field(0.0, ge=0, le=1)
    pairs_per_document: int = Field(1, ge=1, le=8)  # testbed: pairs drawn per document (distinct when possible)
    max_pairs: Optional[int] = Field(None, ge=1)
    max_prompt_length: int = Field(192, ge=4)
    max_length: int = Field(256, ge=8)
    strict: bool = False  # fail on the first bad row instead of skipping and counting it
    overlong: Literal["truncate", "skip"] = "truncate"  # see madpo_ray/data/collate.py
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    chat: bool = False  # wrap the prompt in the tokenizer's chat template (instruction-tuned models)

    @model_validator(mode="after")
    def _sealed_split_apart(self):
        """The sealed test split is neither the training nor the development split."""
        if self.eval_split is not None and self.eval_split in (self.split, self.validation_split):
            raise ValueError(f"eval_split {self.eval_split!r} is also the training or validation split: the sealed "
                             "test split must be a split of its own (null holds part of train out for it)")
        return self

    @model_validator(mode="after")
    def _lengths(self):
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be < max_length ({self.max_length})")
        if "{document}" not in self.prompt_template:
            raise ValueError("prompt_template must contain '{document}'")
        return self


class OptimConfig(_Strict):
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    epochs: int = Field(1, ge=1)
    max_steps: Optional[int] = Field(None, ge=1)  # optimizer steps; caps epochs
    per_device_batch_size: int = Field(8, ge=1)
    effective_batch_size: int = Field(32, ge=1)  # global; gradient accumulation fills the gap
    checkpoint_every: int = Field(50, ge=1)  # optimizer steps between checkpoints
    report_every: int = Field(10, ge=1)  # steps between log lines and tracked metrics (Ray Train gets checkpoints only)
    # Held-out evaluation every eval_every optimiser steps (and at the end) where the stage has a
    # validation split; None: off. Training stops after `patience` evaluations in a row without a
    # lower held-out loss, and the best evaluation's weights are kept.
    eval_every: Optional[int] = Field(None, ge=1)
    patience: int = Field(3, ge=1)
    seed: int = 0
    bf16: Literal["auto", "on", "off"] = "auto"  # autocast where the device supports it
    group_by_length: bool = True  # batches of similar lengths (less padding); false: plain shuffle


def check_path_component(value: str, what: str) -> str:
    """`value` as one folder name: run names and method/eval labels become folders under runs/, so a
    '/', a '..' or a control character would write somewhere else or make a name no one can type."""
    bad = [c for c in value if ord(c) < 32 or c == "\x7f"]
    if not value or value in (".", "..") or "/" in value or "\\" in value or bad:
        raise ValueError(f"{what} {value!r} must be one folder name: not empty, not '.' or '..', without '/', "
                         "'\\' or control characters")
    return value


def check_loss_name(name: str) -> str:
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(POLICY_LOSSES)}")
    return name


class LossConfig(_Strict):
    """A registered loss and the parameters set for it. A parameter left unset (None) takes the
    loss's own default (declared with the loss in madpo_ray/losses.py: beta 0.1, c_max 4, lam 1,
    tau ln 999, ...); a parameter the loss does not take is an error that names it. The fields
    are every parameter some loss takes (a test keeps them in step with the registry)."""

    name: str = "madpo"
    beta: Optional[float] = Field(None, gt=0)
    label_smoothing: Optional[float] = Field(None, ge=0, lt=0.5)  # dpo
    c_max: Optional[float] = Field(None, gt=1)  # madpo*
    lam: Optional[float] = Field(None, gt=0)  # madpo*
    tau: Optional[float] = Field(None, gt=0)  # madpo*
    alpha: Optional[float] = None  # beta_dpo
    rho: Optional[float] = Field(None, ge=0, lt=1)  # beta_dpo
    momentum: Optional[float] = Field(None, ge=0, lt=1)  # beta_dpo

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        return check_loss_name(name)

    @model_validator(mode="after")
    def _params_belong_to_the_loss(self):
        get_policy_loss(self.name).check_params(self.kwargs())
        return self

    def kwargs(self) -> dict[str, Any]:
        """The parameters set for this loss (unset ones are left to the loss's defaults)."""
        return {k: v for k, v in self.model_dump(exclude={"name"}).items() if v is not None}

    def resolved(self) -> dict[str, Any]:
        """Every parameter this loss trains with: its registered defaults, then the ones set here.
        The one answer to "which beta / tau did it use" (reports, model cards, margin diagnostics)."""
        return {**get_policy_loss(self.name).params, **self.kwargs()}

    def switched_to(self, name: str, **params: Any) -> "LossConfig":
        """This config for another loss: keeps the parameters that loss also takes, sets `params`."""
        accepted = get_policy_loss(check_loss_name(name)).params
        kept = {k: v for k, v in self.kwargs().items() if k in accepted}
        return LossConfig(name=name, **{**kept, **params})


class StageConfig(_Strict):
    optim: OptimConfig = OptimConfig()


class RewardStageConfig(StageConfig):
    """The reward model. `ensemble: K` (K >= 2) trains K linear score heads on one shared backbone,
    each on its own bootstrap resample of the pairs (Poisson(1) weights, seeded), for about the cost
    of one model; scoring then stores each pair's margin as the heads' mean and their standard
    deviation (`margin_std`, what madpo_expected weighs by). None: one head, as the paper trains."""

    optim: OptimConfig = OptimConfig(lr=3e-4, epochs=1)
    ensemble: Optional[int] = Field(None, ge=2)


class PolicyStageConfig(StageConfig):
    optim: OptimConfig = OptimConfig(lr=5e-5, epochs=1)
    loss: LossConfig = LossConfig()
    # Standard deviation of Gaussian noise added to the reward-model margins before training (seeded
    # by optim.seed): a simulated reward-model error for `madpo study rm-noise`. 0 = the margins as scored.
    margin_noise: float = Field(0.0, ge=0)


class ScoreConfig(_Strict):
    batch_size: int = Field(32, ge=1)
    num_actors: int = Field(2, ge=1)
    # auto: on a cluster (ray.address set) or for at least `parallel_min_pairs` pairs, the run's Ray
    # Train workers (up already for the trainings: no start, no CPUs change hands); else a plain
    # loop in the driver. ray_data: a Ray Data actor pool of num_actors (it pays ~24 s to start its
    # actors on 2 cores, bench/score_throughput.py, and the trainings' workers stop to free its CPUs).
    backend: Literal["auto", "workers", "ray_data", "local"] = "auto"
    parallel_min_pairs: int = Field(4000, ge=0)
    # Where the pairs' margins come from: the trained reward model, or the dataset's own `margin`
    # column (no reward model is trained; every pair must then have a finite margin).
    margins_from: Literal["reward_model", "data"] = "reward_model"


class EvalConfig(_Strict):
    """Held-out evaluation: the run summary uses greedy decoding of num_prompts prompts;
    `madpo eval` and `madpo compare` sample at every temperature (see madpo_ray/eval/)."""

    num_prompts: int = Field(32, ge=1)
    max_new_tokens: int = Field(24, ge=1)
    temperatures: list[float] = [0.0, 0.25, 0.5, 0.75, 1.0]
    samples_per_prompt: int = Field(4, ge=1)  # at temperature > 0; greedy decoding is drawn once
    backend: Literal["auto", "vllm", "transformers"] = "auto"  # every generation (see generation.py); auto: vLLM when installed for compare/eval, transformers for one model in a stage or trial
    seed: int = 0
    bootstrap_samples: int = Field(2000, ge=100)
    generation_cpus: Optional[float] = Field(None, gt=0)  # CPUs the generation actor holds; None = one node's cores

    @field_validator("temperatures")
    @classmethod
    def _temperatures(cls, ts: list[float]) -> list[float]:
        if not ts:
            raise ValueError("temperatures is empty")
        bad = [t for t in ts if not (0.0 <= t <= 5.0) or t != t]
        if bad:
            raise ValueError(f"temperatures must lie in [0, 5]; got {bad}")
        return sorted(set(float(t) for t in ts))


class MethodConfig(_Strict):
    """One line of a comparison: a registered loss and the loss/optimiser settings it differs by."""

    loss: str
    label: Optional[str] = None  # defaults to the loss name; set it to compare two settings of one loss
    overrides: dict[str, Any] = {}  # e.g. {beta: 0.5} or {optim.lr: 1e-4}

    @field_validator("loss")
    @classmethod
    def _registered(cls, name: str) -> str:
        return check_loss_name(name)

    @field_validator("label")
    @classmethod
    def _one_folder(cls, label: Optional[str]) -> Optional[str]:
        return label if label is None else check_path_component(label, "method label")

    @property
    def name(self) -> str:
        return self.label or self.loss


class CompareConfig(_Strict):
    """`madpo compare`. Five seeds by default: a training can collapse (one beta-DPO seed of five in the
    README's run), and with three a single collapse moves its method's mean by a third of the drop
    (not a fifth) and leaves too few seeds to see the spread. Measured on 2 cores: 20 min per tier after its run's
    stages (20 trainings 15 min, generation and judging 5 min), 24 min with them."""

    methods: list[MethodConfig] = [MethodConfig(loss=x) for x in ("dpo", "ipo", "beta_dpo", "madpo")]
    seeds: list[int] = [0, 1, 2, 3, 4]
    cpus_per_training: float = Field(1.0, gt=0)  # each (method, seed) training is one Ray task
    # Data-quality tiers to compare on, each its own run <name>-<tier> (its own pairs, reward model and
    # scores); null: only this run's data.tier, in this run's folder.
    tiers: Optional[list[Literal["high", "medium", "low"]]] = None
    ablations: bool = False  # also train MADPO's ablations madpo_amplify and madpo_regularize (madpo's settings)
    # How every method's beta and learning rate are chosen, the same way for all of them:
    # reference: the untuned reference settings below (and each loss's own defaults), never the run
    #   config's policy settings, which may be tuned for one method (the preset's are MADPO's);
    # tuned: each method's own finished `madpo tune` search (its best_config.yaml; selected on
    #   validation); a method without one is an error that names the search to run.
    # A method's own overrides win in both.
    settings: Literal["reference", "tuned"] = "reference"
    # The MADPO paper's shared recipe (spec: beta 0.1, lr 1e-5 for every method).
    reference_beta: float = Field(0.1, gt=0)
    reference_lr: float = Field(1e-5, gt=0)
    # The one explicit final step: judge on the sealed test split instead of validation, in a report
    # folder of its own (compare/final/), recorded in the run's final_readings.jsonl. Trainings
    # are the development comparison's (reused while their settings match).
    final: bool = False
    # Matched settings across a learning-rate grid: one comparison per lr (every method at
    # reference_beta and that lr, in compare/lr<lr>/), one Holm family over every grid point.
    lr_grid: Optional[list[float]] = None

    @field_validator("lr_grid")
    @classmethod
    def _lr_grid(cls, grid: Optional[list[float]]) -> Optional[list[float]]:
        if grid is not None and (not grid or len({f"{lr:g}" for lr in grid}) != len(grid) or min(grid) <= 0):
            raise ValueError(f"lr_grid must be a non-empty list of distinct positive learning rates (distinct to "
                             f"6 significant digits: each names its folder); got {grid}")
        return grid

    @field_validator("tiers")
    @classmethod
    def _tiers(cls, tiers: Optional[list[str]]) -> Optional[list[str]]:
        if tiers is not None and (not tiers or len(set(tiers)) != len(tiers)):
            raise ValueError(f"tiers must be a non-empty list without repeats; got {tiers}")
        return tiers

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: list[int]) -> list[int]:
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be a non-empty list without repeats; got {seeds}")
        return seeds

    @field_validator("methods")
    @classmethod
    def _unique(cls, methods: list[MethodConfig]) -> list[MethodConfig]:
        names = [m.name for m in methods]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"method labels must be unique; repeated: {dup} (set label:)")
        if not methods:
            raise ValueError("methods is empty")
        return methods

    @model_validator(mode="after")
    def _grid_is_matched(self) -> "CompareConfig":
        if self.lr_grid is not None and (self.settings == "tuned" or self.tiers):
            raise ValueError("lr_grid trains every method at the same reference settings at each lr: it cannot be "
                             "combined with settings=tuned (each method its own lr) or with tiers")
        own_lr = [m.name for m in self.methods if "optim.lr" in m.overrides]
        if self.lr_grid is not None and own_lr:
            raise ValueError(f"lr_grid sets every method's lr; methods {own_lr} override optim.lr, which would train "
                             "them at their own lr under every grid point's label")
        return self


class RayConfig(_Strict):
    # "ray": stages on Ray (Train, Data, tasks); "local": the same stages in this one process,
    # without Ray (single machines, notebooks, debugging, accelerator hosts without Ray).
    backend: Literal["ray", "local"] = "ray"
    # ddp: every worker holds the whole model; fsdp: FSDP2 shards parameters, gradients and AdamW
    # state over the workers (models too big for one device; engine/parallel.py).
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # None: RAY_ADDRESS if set (inside a Ray job), else a fresh local cluster; "auto": the cluster a
    # `ray start` on this machine runs; "host:port" or "ray://host:port": that cluster.
    address: Optional[str] = None
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(2, ge=0)
    num_cpus: Optional[int] = Field(None, ge=1)  # for the local cluster; None = all cores

    @model_validator(mode="after")
    def fsdp_needs_workers(self) -> "RayConfig":
        if self.strategy == "fsdp" and self.backend == "local":
            raise ValueError("ray.strategy=fsdp shards the model over Ray Train workers; ray.backend=local runs "
                             "one process: use ray.backend=ray or ray.strategy=ddp")
        return self


class TrackingConfig(_Strict):
    """Experiment tracking (madpo_ray/tracking.py): rank 0 of every training logs its reports.
    Not a stage setting: turning it on or off never redoes a stage."""

    mlflow: bool = True       # MLflow run per training (file store <run>/mlruns unless `uri` is set)
    tensorboard: bool = True  # TensorBoard event files under <run>/tensorboard/<training>
    uri: Optional[str] = None  # an MLflow tracking server (http://host:5000, databricks, ...); None = the file store
    experiment: Optional[str] = None  # MLflow experiment; None = the run's name


class PipelineConfig(_Strict):
    name: str = "tiny"
    runs_dir: str = "runs"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    sft: StageConfig = StageConfig(optim=OptimConfig(lr=1e-3, epochs=2))
    reward: RewardStageConfig = RewardStageConfig()
    score: ScoreConfig = ScoreConfig()
    policy: PolicyStageConfig = PolicyStageConfig()
    eval: EvalConfig = EvalConfig()
    compare: CompareConfig = CompareConfig()
    ray: RayConfig = RayConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("name")
    @classmethod
    def _one_folder(cls, name: str) -> str:
        return check_path_component(name, "run name")

    def derive(self, overrides: "list[str] | dict[str, Any]" = ()) -> "PipelineConfig":
        """A new, validated config: this one with dotted overrides, given as CLI-style strings
        (["policy.optim.lr=1e-5"]) or as {dotted key: value} (values taken as they are, a whole
        section as a dict). The one way code derives a config; errors name the key."""
        raw = self.model_dump(mode="json")
        if isinstance(overrides, dict):
            for key, value in overrides.items():
                *parents, leaf = key.split(".")
                node = raw
                for i, part in enumerate(parents):
                    node = node.setdefault(part, {})
                    if not isinstance(node, dict):
                        raise ConfigError(f"override {key!r}: '{'.'.join(parents[:i + 1])}' is a value, not a section")
                node[leaf] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
            return config_from_dict(raw)
        return config_from_dict(raw, list(overrides))

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------- loading
def _format_validation_error(err: ValidationError, raw: dict) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown config key '{key}' (value {value!r})")
        else:
            lines.append(f"config key '{key}': {e['msg']} (got {value!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like dotted.key=value")
    key, raw_value = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw_value!r}: {e}") from None
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{'.'.join(parts[:i + 1])}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return raw


def config_from_dict(raw: dict, overrides: Optional[list[str]] = None) -> PipelineConfig:
    raw = apply_overrides(raw or {}, overrides or [])
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, raw)) from None


def resolve_preset(path_or_name: str | Path):
    """A path (a user's own file wins), or the name of a shipped preset ("tiny": the package's
    configs/tiny.yaml). Returns something with read_text()."""
    p = Path(path_or_name)
    if p.exists():
        return p
    candidate = PRESETS / f"{path_or_name}.yaml"
    if candidate.is_file():
        return candidate
    names = sorted(f.name[:-5] for f in PRESETS.iterdir() if f.name.endswith(".yaml"))
    raise ConfigError(f"config {str(path_or_name)!r} is neither a file nor a shipped preset ({', '.join(names)})")


def load_config(path_or_name: str | Path | None = None, overrides: Optional[list[str]] = None) -> PipelineConfig:
    raw: dict = {}
    if path_or_name is not None:
        path = resolve_preset(path_or_name)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    return config_from_dict(raw, overrides)


def save_config(cfg: PipelineConfig, path: Path) -> None:
    write_text_atomically(path, cfg.to_yaml())
