"""The run folder: every path in it, and the stage order.

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

What each stage's DONE record holds, and when a stage is up to date: provenance.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from madpo_ray.provenance import StageRecord

STAGES = ("data", "sft", "pairs", "reward", "score", "policy", "eval")
# Documents and pairs come in three splits. Training reads "train"; everything that selects
# (early stopping, Tune objectives, calibration) and every development figure (the run summary,
# `madpo eval`, `madpo compare`, `madpo study`) reads "validation". "test" is sealed: only the
# explicit final step (`madpo compare --final`) reads it, and it records each reading.
SPLITS = ("train", "validation", "test")
DEVELOPMENT_SPLIT, SEALED_SPLIT = "validation", "test"
TRAINED_STAGES = ("sft", "reward", "policy")  # a model folder each
TRAININGS_RUN = "stages"  # the Ray Train run (one worker group) that trains them: ray_storage/stages/
BEFORE_POLICY = STAGES[:STAGES.index("policy")]
TESTBED_SOURCES = ("generated", "debian")


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

    @property
    def calibration_plot(self) -> Path:
        """A reward ensemble's disagreement against its error on validation (reward.ensemble)."""
        return self.run_dir / "calibration.png"

    # ------------------------------------------------------------------ training storage
    @property
    def ray_storage(self) -> Path:
        return self.run_dir / "ray"

    def trainer_name(self, stage: str) -> str:
        """A training's name among the run's checkpoints: "sft", "reward", "policy-madpo"."""
        return f"{stage}-{self.loss}" if stage == "policy" else stage

    def checkpoint_root(self, stage: str) -> Path:
        """Where a training's checkpoints live: inside the one Ray Train run of the run's trainings."""
        return self.ray_storage / TRAININGS_RUN / self.trainer_name(stage)

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
