"""Runs the stages in order into a run directory, skipping the ones whose artifacts are complete.

    runs/<name>/
      config.yaml             the exact config of this run
      data/                   documents and/or validated pairs (+ validation report)
      base/                   tokenizer + from-scratch base model (tiny default only)
      sft/model/              reference policy pi_ref (HF folder)
      pairs/                  preference pairs with testbed gold scores
      reward/model/           reward model (AutoModelForSequenceClassification, 1 label)
      score/scored/split=train|eval/   scored parquet (reference log-probs, rewards, margins)
      policy/<loss>/model/    trained policy
      summary.json, summary.md
    Each stage folder holds metrics.json and a DONE marker written last.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from madpo_ray.config import PipelineConfig, save_config
from madpo_ray.data.collate import tokenize_pairs, tokenize_sft
from madpo_ray.data.preference import ValidationReport, load_pairs, validate_rows
from madpo_ray.io import read_jsonl, write_json, write_jsonl

log = logging.getLogger("madpo_ray.pipeline")
STAGES = ("data", "sft", "pairs", "reward", "score", "policy", "eval")
TESTBED_SOURCES = ("generated", "debian")


class Pipeline:
    def __init__(self, cfg: PipelineConfig, fault: Optional[dict] = None):
        self.cfg = cfg
        self.run_dir = cfg.run_dir.resolve()
        self.fault = fault or {}  # {"stage": "policy", "step": 3}: SIGKILL a worker once (tests)
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ helpers
    def stage_dir(self, stage: str) -> Path:
        if stage == "policy":
            return self.run_dir / "policy" / self.cfg.policy.loss.name
        return self.run_dir / stage

    def is_done(self, stage: str) -> bool:
        return (self.stage_dir(stage) / "DONE").exists()

    def mark_done(self, stage: str, metrics: dict) -> None:
        d = self.stage_dir(stage)
        write_json(d / "metrics.json", metrics)
        (d / "DONE").write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))

    @property
    def is_testbed(self) -> bool:
        return self.cfg.data.source in TESTBED_SOURCES

    @property
    def base_model(self) -> str:
        return self.cfg.model.name_or_path or str(self.run_dir / "base")

    def _loop_config(self, stage: str, **paths) -> dict:
        cfg = {"pipeline": self.cfg.model_dump(mode="json"), **{k: str(v) for k, v in paths.items()}}
        if self.fault.get("stage") == stage:
            cfg.update(fail_at_step=int(self.fault["step"]), marker_dir=str(self.run_dir / ".faults"))
            if self.fault.get("batch_log"):
                cfg["batch_log_path"] = str(self.stage_dir(stage) / "batches.log")
        return cfg

    def _train(self, stage: str, train_loop, examples: list, model_dir: str) -> dict:
        from madpo_ray.runtime import init_ray, run_trainer

        d = self.stage_dir(stage)
        d.mkdir(parents=True, exist_ok=True)
        examples_path = d / "examples.pt"
        torch.save(examples, examples_path)
        init_ray(self.cfg.ray)
        storage = self.run_dir / "ray"
        name = self.trainer_name(stage)
        run_trainer(train_loop, self._loop_config(stage, model_dir=model_dir, examples_path=examples_path,
                                                  out_dir=d / "model", metrics_path=d / "train_metrics.json",
                                                  checkpoint_root=storage / name),
                    self.cfg.ray, name=name, storage_path=storage)
        return json.loads((d / "train_metrics.json").read_text())

    def trainer_name(self, stage: str) -> str:
        """Ray Train run name; its checkpoints live in run_dir/ray/<name>/."""
        return f"{stage}-{self.cfg.policy.loss.name}" if stage == "policy" else stage

    def _tokenizer(self):
        from madpo_ray.models import load_tokenizer

        return load_tokenizer(self.base_model if self.cfg.model.tokenizer is None else self.cfg.model.tokenizer)

    # ------------------------------------------------------------------ stages
    def stage_data(self) -> dict:
        d = self.stage_dir("data")
        c = self.cfg.data
        metrics: dict = {"source": c.source}
        if c.source == "generated":
            from madpo_ray.data.corpus.generated import generate_splits

            splits = generate_splits(c.num_documents, c.num_eval_documents, c.corpus_seed)
            write_jsonl([x.to_dict() for x in splits["train"]], d / "train_docs.jsonl")
            write_jsonl([x.to_dict() for x in splits["test"]], d / "test_docs.jsonl")
        elif c.source == "debian":
            from madpo_ray.data.corpus.debian import load_debian_split

            rng = random.Random(c.corpus_seed)
            train = load_debian_split("train")
            test = load_debian_split("test")
            write_jsonl(rng.sample(train, min(c.num_documents, len(train))), d / "train_docs.jsonl")
            write_jsonl(rng.sample(test, min(c.num_eval_documents, len(test))), d / "test_docs.jsonl")
        else:
            pairs, report = load_pairs(c.source, c.split, c.strict)
            log.info(report.summary())
            metrics["train_validation"] = report.to_metrics()
            if c.eval_split:
                try:
                    eval_pairs, eval_report = load_pairs(c.source, c.eval_split, c.strict)
                    metrics["eval_validation"] = eval_report.to_metrics()
                except Exception as e:  # no such split: hold out 5% instead
                    log.warning("no eval split %r (%s); holding out 5%% of train", c.eval_split, e)
                    eval_pairs = []
            else:
                eval_pairs = []
            if not eval_pairs:
                rng = random.Random(c.corpus_seed)
                rng.shuffle(pairs)
                n_eval = max(1, len(pairs) // 20)
                eval_pairs, pairs = pairs[:n_eval], pairs[n_eval:]
            if c.max_pairs:
                pairs = pairs[:c.max_pairs]
            write_jsonl(pairs, d / "pairs_train.jsonl")
            write_jsonl(eval_pairs, d / "pairs_eval.jsonl")
            metrics.update(train_pairs=len(pairs), eval_pairs=len(eval_pairs))
        if self.cfg.model.name_or_path is None:
            from madpo_ray.models import build_tiny_base

            if self.is_testbed:
                docs = read_jsonl(d / "train_docs.jsonl")
                texts = [x["document"] for x in docs] + [x["reference"] for x in docs]
            else:
                texts = [str(p[k]) for p in read_jsonl(d / "pairs_train.jsonl") for k in ("prompt", "chosen", "rejected")]
            build_tiny_base(texts, self.cfg.model, self.run_dir / "base", seed=self.cfg.sft.optim.seed)
        return metrics

    def stage_sft(self) -> dict:
        from madpo_ray.stages import sft

        data = self.stage_dir("data")
        c = self.cfg.data
        if self.is_testbed:
            rows = [{"prompt": c.prompt_template.format(document=x["document"]), "response": " " + x["reference"]}
                    for x in read_jsonl(data / "train_docs.jsonl")]
        else:
            rows = [{"prompt": p["prompt"], "response": p["chosen"]} for p in read_jsonl(data / "pairs_train.jsonl")]
        examples = tokenize_sft(self._tokenizer(), rows, c.max_prompt_length, c.max_length)
        return {"examples": len(examples), **self._train("sft", sft.train_loop_per_worker, examples, self.base_model)}

    def stage_pairs(self) -> dict:
        """Testbed: sample summaries from the SFT policy, pair them, label Bradley-Terry by gold reward."""
        d = self.stage_dir("pairs")
        data = self.stage_dir("data")
        c = self.cfg.data
        if not self.is_testbed:
            for split in ("train", "eval"):
                write_jsonl(read_jsonl(data / f"pairs_{split}.jsonl"), d / f"{split}.jsonl")
            return {"source": c.source}
        from madpo_ray.data.testbed import build_pairs
        from madpo_ray.eval.generate import generate_transformers
        from madpo_ray.models import load_causal_lm, load_tokenizer

        torch.set_num_threads(max(1, os.cpu_count() or 1))
        sft_dir = str(self.stage_dir("sft") / "model")
        model, tok = load_causal_lm(sft_dir), load_tokenizer(sft_dir)
        metrics = {}
        for split, docs_file in (("train", "train_docs.jsonl"), ("eval", "test_docs.jsonl")):
            docs = read_jsonl(data / docs_file)
            prompts = [c.prompt_template.format(document=x["document"]) for x in docs]
            t0 = time.time()
            samples: dict[str, list[str]] = {x["doc_id"]: [] for x in docs}
            for k in range(c.samples_per_document):
                texts = generate_transformers(model, tok, prompts, temperature=1.0, seed=c.corpus_seed * 100 + k,
                                              max_new_tokens=self.cfg.eval.max_new_tokens, batch_size=64,
                                              max_prompt_length=c.max_prompt_length)
                for x, t in zip(docs, texts):
                    samples[x["doc_id"]].append(t)
            log.info("pairs/%s: sampled %d summaries in %.1fs", split, len(docs) * c.samples_per_document,
                     time.time() - t0)
            pairs = build_pairs(docs, tier=c.tier, sharpness=c.label_sharpness, seed=c.corpus_seed,
                                policy_samples=samples, prompt_template=c.prompt_template)
            report = ValidationReport(source=f"testbed/{split}")
            pairs = validate_rows(list(enumerate(pairs)), report, c.strict)
            if split == "train" and c.max_pairs:
                pairs = pairs[:c.max_pairs]
            write_jsonl(pairs, d / f"{split}.jsonl")
            metrics[split] = {"pairs": len(pairs), "validation": report.to_metrics(),
                              "label_agrees_with_gold": sum(p["true_margin"] > 0 for p in pairs) / max(1, len(pairs)),
                              "mean_abs_true_margin": sum(abs(p["true_margin"]) for p in pairs) / max(1, len(pairs))}
        return metrics

    def _tokenized_pairs(self, split: str) -> tuple[list[dict], dict]:
        c = self.cfg.data
        rows = read_jsonl(self.stage_dir("pairs") / f"{split}.jsonl")
        report = ValidationReport(source=f"tokenize/{split}")
        exs = tokenize_pairs(self._tokenizer(), rows, c.max_prompt_length, c.max_length, c.overlong, report, c.strict)
        by_id = {r.get("row_id", i): r for i, r in enumerate(rows)}
        keep = ("pair_id", "gold_chosen", "gold_rejected", "true_margin", "chosen_kind", "rejected_kind")
        for ex in exs:
            src = by_id[ex["row_id"]]
            ex.update({k: src[k] for k in keep if k in src and k not in ex})
            # Conversational rows are message lists; parquet wants one type per column.
            ex["prompt"], ex["chosen"], ex["rejected"] = (str(src["prompt"]), str(src["chosen"]), str(src["rejected"]))
        return exs, report.to_metrics()

    def stage_reward(self) -> dict:
        from madpo_ray.stages import reward

        exs, report = self._tokenized_pairs("train")
        strip = [{k: ex[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for ex in exs]
        return {"examples": len(strip), "tokenize": report,
                **self._train("reward", reward.train_loop_per_worker, strip, str(self.stage_dir("sft") / "model"))}

    def stage_score(self) -> dict:
        from madpo_ray.models import check_model_folder
        from madpo_ray.runtime import init_ray
        from madpo_ray.stages.score import assert_no_nan, read_partition, score_with_ray

        for stage in ("sft", "reward"):  # before any Ray work: a clear message, not a worker traceback
            check_model_folder(str(self.stage_dir(stage) / "model"))
        init_ray(self.cfg.ray)
        examples, metrics = [], {}
        for split in ("train", "eval"):
            exs, report = self._tokenized_pairs(split)
            for ex in exs:
                ex.pop("margin", None)  # the reward model's margin replaces any given one
                ex["split"] = split
            examples += exs
            metrics[split] = {"tokenize": report}
        t0 = time.time()
        out = score_with_ray(examples, self.stage_dir("sft") / "model", self.stage_dir("reward") / "model",
                             self.stage_dir("score") / "scored", batch_size=self.cfg.score.batch_size,
                             num_actors=self.cfg.score.num_actors)
        secs = time.time() - t0
        metrics.update(pairs=len(examples), seconds=secs, pairs_per_s=len(examples) / max(secs, 1e-9))
        for split in ("train", "eval"):
            rows = read_partition(out, split)
            assert_no_nan(rows, f"{out}/split={split}")
            m = metrics[split]
            m.update(pairs=len(rows), rm_accuracy_vs_labels=sum(r["margin"] > 0 for r in rows) / max(1, len(rows)))
            if rows and "true_margin" in rows[0]:
                m["rm_accuracy_vs_true_margin"] = sum((r["margin"] > 0) == (r["true_margin"] > 0)
                                                      for r in rows) / len(rows)
        return metrics

    def scored_path(self, split: str) -> Path:
        return self.stage_dir("score") / "scored" / f"split={split}"

    def stage_policy(self) -> dict:
        from madpo_ray.models import check_model_folder
        from madpo_ray.stages import policy

        check_model_folder(str(self.stage_dir("sft") / "model"))
        exs = policy.load_policy_examples(self.scored_path("train"), self.cfg.policy.loss.name)
        return {"examples": len(exs), **self._train("policy", policy.train_loop_per_worker, exs,
                                                     str(self.stage_dir("sft") / "model"))}

    def stage_eval(self) -> dict:
        from madpo_ray.eval.summary import evaluate_run

        return evaluate_run(self)

    # ------------------------------------------------------------------ driver
    def run(self, stages: tuple[str, ...] = STAGES, force: bool = False) -> dict:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.yaml")
        results = {}
        for stage in stages:
            if not force and self.is_done(stage):
                log.info("== %s: complete, skipping (delete %s to redo)", stage, self.stage_dir(stage) / "DONE")
                results[stage] = json.loads((self.stage_dir(stage) / "metrics.json").read_text())
                continue
            if force:  # a forced redo must not resume from the old run's checkpoints
                shutil.rmtree(self.run_dir / "ray" / self.trainer_name(stage), ignore_errors=True)
            log.info("== %s: starting", stage)
            t0 = time.time()
            metrics = getattr(self, f"stage_{stage}")()
            metrics["wall_seconds"] = time.time() - t0
            self.timings[stage] = metrics["wall_seconds"]
            self.mark_done(stage, metrics)
            log.info("== %s: done in %.1fs", stage, metrics["wall_seconds"])
            results[stage] = metrics
        return results
