"""Provenance: what each stage's output was made from, so a rerun redoes exactly what changed.

A stage's DONE record holds the settings it was made with (the config keys in STAGE_SETTINGS)
and the id of the upstream stage's record it was built on. A stage is up to date only if both
still match, so a changed setting redoes that stage and, through the ids, everything downstream;
an unchanged rerun skips it. A STARTED record tells a rerun whether an interrupted training's
checkpoints were made with the same settings and inputs (`begin_training`)."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

from madpo_ray.io import write_json

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
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def read(cls, folder: Path, name: str = "DONE") -> Optional["StageRecord"]:
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
    folder = Path(folder)
    started = StageRecord.read(folder, "STARTED")
    if force or started is None or started.why_stale(settings, upstream) is not None or (folder / "DONE").exists():
        shutil.rmtree(checkpoint_root, ignore_errors=True)
    (folder / "DONE").unlink(missing_ok=True)
    StageRecord.write(folder, settings, upstream, "STARTED")
