"""The run folder: every path in it, the stage order, and each stage's provenance.

    runs/<name>/
      config.yaml             the config of the latest command on this run
      data/                   documents and/or validated pairs (+ validation report)
      base/                   tokenizer + from-scratch base model (tiny default only)
      sft/model/              reference policy pi_ref (HF folder)
      pairs/{train,eval}.jsonl  preference pairs (testbed: with gold scores)
      reward/model/           reward model (AutoModelForSequenceClassification, 1 label)
      score/scored/split=train|eval/   scored parquet (reference log-probs, rewards, margins)
      policy/<loss>/model/    trained policy
      eval/                   the run summary's metrics; summary.json, summary.md beside it
      compare/, tune/         `madpo compare` and `madpo tune` (compare/final/: the sealed test split's report)
      final_readings.jsonl    every reading of the sealed test split by a final step
      ray/<trainer>/          Ray Train storage: checkpoints of interrupted trainings
      mlruns/                 MLflow file store: one run per training (stages, Tune trials, compare)
      tensorboard/<training>/ TensorBoard event files of each training
      logs/madpo.log          the full log of every pipeline command on this run (Ray's output too)
    Each stage folder holds metrics.json and a DONE record written last.

Provenance: a stage's DONE record holds the settings it was made with (the config keys in
STAGE_SETTINGS) and the id of the upstream stage's record it was built on. A stage is up to
date only if both still match, so a changed setting redoes that stage and, through the ids,
everything downstream; an unchanged rerun skips it.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from madpo_ray.io import write_json

STAGES = ("data", "sft", "pairs", "reward", "score", "policy", "eval")
# Documents and pairs come in three splits. Training reads "train"; everything that selects
# (early stopping, Tune objectives, calibration) and every development figure (the run summary,
# `madpo eval`, `madpo compare`, `madpo study`) reads "validation". "test" is sealed: only the
# explicit final step (`madpo compare --final`) reads it, and it records each reading.
SPLITS = ("train", "validation", "test")
DEVELOPMENT_SPLIT, SEALED_SPLIT = "validation", "test"
TRAINED_STAGES = ("sft", "reward", "policy")  # a Ray Train run and a model folder each
BEFORE_POLICY = STAGES[:STAGES.index("policy")]
TESTBED_SOURCES = ("generated", "debian")
MODEL_SHAPE_KEYS = ("model.name_or_path", "model.tokenizer", "model.vocab_size", "model.hidden_size",
                    "model.num_layers", "model.num_heads", "model.intermediate_size", "model.max_position_embeddings",
                    "model.sliding_window")

# The config keys each stage's output depends on (a section name covers all its keys). Ray
# placement (ray.*), scoring batch sizes and actor counts change speed, not results: not listed.
STAGE_SETTINGS: dict[str, tuple[str, ...]] = {
    "data": MODEL_SHAPE_KEYS + ("data.source", "data.split", "data.eval_split", "data.validation_split",
                                "data.validation_fraction", "data.num_documents", "data.num_validation_documents",
                                "data.num_eval_documents", "data.corpus_seed", "data.terse_share", "data.strict",
                                "data.max_pairs",
                                "score.margins_from",
                                "sft.optim.seed"),
    "sft": ("sft", "model.dtype", "model.lora", "data.max_prompt_length", "data.max_length",
            "data.prompt_template", "data.chat"),
    "pairs": ("data.tier", "data.samples_per_document", "data.max_extra_sample_rounds", "data.label_sharpness",
              "data.label_noise", "data.pairs_per_document", "eval.max_new_tokens"),
    "reward": ("reward", "data.overlong", "model.pair_forward", "score.margins_from"),
    "score": ("policy.optim.bf16", "ray.use_gpu", "score.margins_from"),  # scoring runs under the policy's autocast
    "policy": ("policy",),
    "eval": ("eval.num_prompts",),
}


def is_testbed(cfg) -> bool:
    """Whether the run's pairs come from the testbed (documents with a known gold reward)."""
    return cfg.data.source in TESTBED_SOURCES


def model_folder(stage_folder: Path) -> Path:
    """The HF model folder inside a stage (or compare training) folder (merged, if LoRA trained it)."""
    return Path(stage_folder) / "model"


def adapter_folder(stage_folder: Path) -> Path:
    """The LoRA adapter (peft) beside the merged model folder, when LoRA trained the stage."""
    return Path(stage_folder) / "adapter"


def upstream_of(stage: str) -> Optional[str]:
    i = STAGES.index(stage)
    return STAGES[i - 1] if i else None


def settings_of(config: dict, keys: tuple[str, ...]) -> dict[str, Any]:
    """The values of dotted `keys` in a config dump, sections flattened to their leaf keys."""
    out: dict[str, Any] = {}

    def flatten(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                flatten(f"{prefix}.{k}", v)
        else:
            out[prefix] = value

    for key in keys:
        node: Any = config
        for part in key.split("."):
            node = node[part]
        flatten(key, node)
    return out


@dataclass
class StageRecord:
    """The DONE record: what a finished stage was made from."""

    record_id: str
    settings: dict
    upstream: Optional[str]  # record_id of the upstream stage this one was built on
    finished: str
    settings_hash: str = ""  # sha256 of the settings: one string to compare runs by

    @staticmethod
    def hash_of(settings: dict) -> str:
        import hashlib

        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def read(cls, folder: Path, name: str = "DONE") -> Optional["StageRecord"]:
        from dataclasses import fields

        try:
            raw = json.loads((Path(folder) / name).read_text())
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in raw.items() if k in known})  # a newer version's extra keys are ignored
        except (OSError, ValueError, TypeError, AttributeError):  # absent, or written before provenance
            return None

    @classmethod
    def write(cls, folder: Path, settings: dict, upstream: Optional[str], name: str = "DONE") -> "StageRecord":
        settings = json.loads(json.dumps(settings))
        rec = cls(uuid.uuid4().hex, settings, upstream, time.strftime("%Y-%m-%dT%H:%M:%S"), cls.hash_of(settings))
        write_json(Path(folder) / name, asdict(rec))
        return rec

    def why_stale(self, settings: dict, upstream: Optional[str], upstream_name: str = "upstream") -> Optional[str]:
        """None if this record still vouches for the stage, else the reason it does not."""
        wanted = json.loads(json.dumps(settings))
        changed = sorted(k for k in set(wanted) | set(self.settings) if wanted.get(k) != self.settings.get(k))
        if changed:
            shown = ", ".join(f"{k}: {self.settings.get(k)!r} -> {wanted.get(k)!r}" for k in changed[:4])
            return f"settings changed ({shown}{', ...' if len(changed) > 4 else ''})"
        if upstream != self.upstream:
            return f"{upstream_name} was redone since"
        return None


def begin_training(folder: Path, checkpoint_root: Path, settings: dict, upstream: Optional[str],
                   force: bool = False) -> None:
    """Before a (re)run of a stage or a compare training: keep an interrupted run's checkpoints only
    if its STARTED record shows the same settings and inputs, and it is not being forced or redone."""
    import shutil

    folder = Path(folder)
    started = StageRecord.read(folder, "STARTED")
    if force or started is None or started.why_stale(settings, upstream) is not None or (folder / "DONE").exists():
        shutil.rmtree(checkpoint_root, ignore_errors=True)
    (folder / "DONE").unlink(missing_ok=True)
    StageRecord.write(folder, settings, upstream, "STARTED")


class RunLayout:
    """Every path of one run folder. `loss` picks which policy/<loss>/ the policy stage means."""

    def __init__(self, run_dir: Path, loss: str = "madpo"):
        self.run_dir = Path(run_dir).resolve()
        self.loss = loss

    @classmethod
    def of(cls, cfg) -> "RunLayout":
        return cls(cfg.run_dir, cfg.policy.loss.name)

    # ------------------------------------------------------------------ stages
    def stage_dir(self, stage: str) -> Path:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        return self.run_dir / "policy" / self.loss if stage == "policy" else self.run_dir / stage

    def model_dir(self, stage: str) -> Path:
        return model_folder(self.stage_dir(stage))

    def adapter_dir(self, stage: str) -> Path:
        return adapter_folder(self.stage_dir(stage))

    def done_path(self, stage: str) -> Path:
        return self.stage_dir(stage) / "DONE"

    def metrics_path(self, stage: str) -> Path:
        return self.stage_dir(stage) / "metrics.json"

    def train_metrics_path(self, stage: str) -> Path:
        return self.stage_dir(stage) / "train_metrics.json"

    def record(self, stage: str) -> Optional[StageRecord]:
        return StageRecord.read(self.stage_dir(stage))

    def is_done(self, stage: str) -> bool:
        return self.done_path(stage).exists()

    def read_metrics(self, stage: str) -> dict:
        return json.loads(self.metrics_path(stage).read_text())

    # ------------------------------------------------------------------ files inside stages
    @property
    def config_path(self) -> Path:
        return self.run_dir / "config.yaml"

    @property
    def base_dir(self) -> Path:
        return self.run_dir / "base"

    def docs_path(self, split: str) -> Path:
        """Testbed documents of one of SPLITS."""
        return self.stage_dir("data") / f"{split}_docs.jsonl"

    def input_pairs_path(self, split: str) -> Path:
        """Validated user pairs of one of SPLITS."""
        return self.stage_dir("data") / f"pairs_{split}.jsonl"

    def pairs_path(self, split: str) -> Path:
        return self.stage_dir("pairs") / f"{split}.jsonl"

    @property
    def scored_dir(self) -> Path:
        return self.stage_dir("score") / "scored"

    def scored_path(self, split: str) -> Path:
        return self.scored_dir / f"split={split}"

    @property
    def summary_json(self) -> Path:
        return self.run_dir / "summary.json"

    @property
    def summary_md(self) -> Path:
        return self.run_dir / "summary.md"

    @property
    def curves_plot(self) -> Path:
        """Loss per optimiser step of every training stage, with the validation evaluations."""
        return self.run_dir / "training_curves.png"

    @property
    def margins_plot(self) -> Path:
        """Histograms of the training pairs' reward-model margins and MADPO weights."""
        return self.run_dir / "margins.png"

    # ------------------------------------------------------------------ training storage
    @property
    def ray_storage(self) -> Path:
        return self.run_dir / "ray"

    def trainer_name(self, stage: str) -> str:
        """Ray Train run name; its checkpoints live in ray_storage/<name>/."""
        return f"{stage}-{self.loss}" if stage == "policy" else stage

    def checkpoint_root(self, stage: str) -> Path:
        return self.ray_storage / self.trainer_name(stage)

    @property
    def faults_dir(self) -> Path:
        return self.run_dir / ".faults"

    # ------------------------------------------------------------------ logs and tracking
    def training_key(self, stage: str) -> str:
        """How a stage's training is named in MLflow and TensorBoard: "sft", "reward", "policy/madpo"."""
        return self.stage_dir(stage).relative_to(self.run_dir).as_posix()

    @property
    def mlruns_dir(self) -> Path:
        return self.run_dir / "mlruns"

    def tensorboard_dir(self, key: str) -> Path:
        return self.run_dir / "tensorboard" / key

    @property
    def logs_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def log_path(self) -> Path:
        return self.logs_dir / "madpo.log"

    def progress_path(self, key: str) -> Path:
        """The latest report of a running training, for the driver's progress bar."""
        return self.logs_dir / "progress" / (key.replace("/", "-") + ".json")

    # ------------------------------------------------------------------ other commands
    @property
    def compare_dir(self) -> Path:
        return self.run_dir / "compare"

    def training_dir(self, method: str, seed: int, root: Optional[Path] = None) -> Path:
        """One (method, seed) training of a comparison under `root` (default: compare/)."""
        return (root or self.compare_dir) / method / f"seed{seed}"

    @property
    def compare_tiers_dir(self) -> Path:
        """The combined report of `madpo compare --tiers`."""
        return self.run_dir / "compare_tiers"

    @property
    def final_ledger(self) -> Path:
        """One line per reading of the sealed test split by a final step: what, when, where."""
        return self.run_dir / "final_readings.jsonl"

    def study_dir(self, study: str) -> Path:
        """`madpo study <study>`: its trainings, generations and report."""
        return self.run_dir / "study" / study

    @property
    def tune_dir(self) -> Path:
        return self.run_dir / "tune"
