"""Held-out evaluation shared by `madpo compare`, `madpo eval` and `madpo study`: which prompts
are judged, the judging of generated rows (testbed gold reward, reward-model score, win rates,
CIs), and the record of every reading of the sealed test split.

Development reads the validation split. The test split is sealed: it is read only by an explicit
final step, which records what it read and when (`record_final_reading`), so a test figure in a
report can be traced to one deliberate reading and a split read many times shows it."""

from __future__ import annotations

import datetime
import hashlib
import json
import uuid
from pathlib import Path
from typing import Optional

import madpo_ray
from madpo_ray.config import PipelineConfig
from madpo_ray.data.prompts import generation_prompts
from madpo_ray.data.scored import read_scored, scored_split
from madpo_ray.eval import judge as J
from madpo_ray.io import read_jsonl, write_json
from madpo_ray.layout import DEVELOPMENT_SPLIT, SEALED_SPLIT, SPLITS, RunLayout, is_testbed
from madpo_ray.models import load_reward_model, load_tokenizer
from madpo_ray.stages.measures import reward_model_scores

SFT_LABEL = "sft"  # the SFT policy's label in every table: the baseline each method is judged against
# One command's readings of the sealed split (a grid or tiers read it once per comparison) count as
# one reading: "earlier readings" are those of other commands.
INVOCATION = uuid.uuid4().hex[:12]


def eval_prompts(cfg: PipelineConfig, layout: RunLayout,
                 split: str = DEVELOPMENT_SPLIT) -> tuple[list[str], list[str], list[Optional[dict]]]:
    """Held-out prompt ids, prompt texts, and (testbed) their documents, eval.num_prompts of them.

    Testbed runs use the split's documents; any other dataset the distinct prompts of the split's
    pairs (its scored pairs). Development passes validation; only a final step passes test."""
    if split not in SPLITS[1:]:
        raise ValueError(f"held-out prompts come from {SPLITS[1:]}, not {split!r}")
    n = cfg.eval.num_prompts
    if is_testbed(cfg):
        docs = read_jsonl(layout.docs_path(split))[:n]

        prompts = generation_prompts(cfg.data, load_tokenizer(str(layout.model_dir("sft"))), [d["document"] for d in docs])
        return [str(d["doc_id"]) for d in docs], prompts, docs
    rows = read_scored(scored_split(layout, split))
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))[:n]
    refs = {}
    for r in rows:
        refs.setdefault(r["prompt"], r["chosen"])  # the labelled-chosen response stands in for a reference
    return ([f"p{i}" for i in range(len(prompts))], prompts,
            [{"reference": refs[x]} for x in prompts])


def record_final_reading(layout: RunLayout, report_dir: Path, command: str, prompt_ids: list[str],
                         prompts: list[str]) -> dict:
    """Write report_dir/final.json and append to the run's ledger: a reading of the sealed test split,
    what it was computed on (the prompts' digest, the package version) and when. Returns the record,
    with the earlier readings of this run's test split (a split read again is no longer fresh)."""
    ledger = layout.final_ledger
    readings = [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()] if ledger.exists() else []
    earlier = [r for r in readings if r.get("invocation") != INVOCATION]
    digest = hashlib.sha256(json.dumps([prompt_ids, prompts]).encode()).hexdigest()
    record = {"split": SEALED_SPLIT, "command": command, "invocation": INVOCATION, "report_dir": str(report_dir),
              "computed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "prompts": len(prompt_ids), "prompts_sha256": digest, "madpo_ray_version": madpo_ray.__version__}
    write_json(Path(report_dir) / "final.json", {**record, "earlier_readings": earlier})
    with open(ledger, "a") as f:
        f.write(json.dumps(record) + "\n")
    return {**record, "earlier_readings": len(earlier)}


def judge_rows(cfg: PipelineConfig, layout: RunLayout, rows: list[dict], split: str = DEVELOPMENT_SPLIT) -> dict:
    """Gold reward (testbed) and reward-model score of every row, then the per-temperature table."""
    ids, prompts, docs = eval_prompts(cfg, layout, split)
    ref_rows = [{"prompt_id": i, "text": d["reference"], "sample": 0} for i, d in zip(ids, docs)]
    reference: dict = {}
    if is_testbed(cfg):
        J.add_gold(rows, dict(zip(ids, docs)))
        J.add_gold(ref_rows, dict(zip(ids, docs)))
        reference["gold"] = {r["prompt_id"]: r["gold"] for r in ref_rows}
    rm_dir = layout.model_dir("reward")
    if rm_dir.exists():
        score = reward_model_scorer(str(rm_dir), str(layout.model_dir("sft")))
        J.add_reward_model(rows, dict(zip(ids, prompts)), score)
        J.add_reward_model(ref_rows, dict(zip(ids, prompts)), score)
        reference["rm"] = {r["prompt_id"]: r["rm"] for r in ref_rows}
    n_boot = cfg.eval.bootstrap_samples
    table = J.judge(rows, ids, baseline=SFT_LABEL, reference=reference, n_boot=n_boot)
    column = "gold" if is_testbed(cfg) else "rm"
    return {"table": table, "column": column, "split": split,
            "reference": {k: float(sum(v.values()) / len(v)) for k, v in reference.items()}}


def reward_model_scorer(rm_dir: str, tokenizer_dir: str):
    tok = load_tokenizer(tokenizer_dir)
    rm = load_reward_model(rm_dir, pad_token_id=tok.pad_token_id).eval()
    return lambda prompts, texts: reward_model_scores(rm, tok, prompts, texts, batch_size=64)
