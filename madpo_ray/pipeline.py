"""Runs the stages in order into a run folder (paths: `layout.RunLayout`), skipping those that
are up to date and redoing those whose settings or upstream changed (provenance: layout.py).

Each stage method returns its metrics; the driver writes them with the stage's DONE record.
Training stages run on Ray Train, all of a run's trainings on one worker group
(`runtime.TrainingGroup`) that starts with the first training and stops when the run ends: the
driver tokenises, puts the examples in Ray's object store, posts the training, and waits.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import torch

from madpo_ray.config import PipelineConfig, save_config
from madpo_ray.data.collate import tokenize_pairs, tokenize_sft
from madpo_ray.data.corpus.debian import load_debian_split
from madpo_ray.data.corpus.generated import generate_splits
from madpo_ray.data.preference import (DataValidationError, ValidationReport, hold_out_by_prompt, load_pairs,
                                       prompt_key, single_file_without, validate_rows)
from madpo_ray.data.prompts import generation_prompts, prompt_for
from madpo_ray.data.scored import load_policy_examples
from madpo_ray.data.testbed import build_pairs, distinct_samples_needed, pair_composition
from madpo_ray.engine.batching import accumulation_steps
from madpo_ray.engine.sessions import LocalSession
from madpo_ray.generation import Generator, SampleSpec, resolve_backend, stage_generator
from madpo_ray.io import read_jsonl, write_json, write_jsonl
from madpo_ray.launcher import (Training, launch, scoring_job, to_loop_config, tracking_for,
                                train_loop_per_worker)
from madpo_ray.layout import SPLITS, STAGES, TRAINED_STAGES, TRAININGS_RUN, RunLayout, is_testbed, upstream_of
from madpo_ray.models import build_tiny_base, check_model_folder, load_tokenizer
from madpo_ray.provenance import STAGE_SETTINGS, StageRecord, begin_training, settings_of
from madpo_ray.runlock import RunLock
from madpo_ray.runtime import TrainingGroup, init_ray
from madpo_ray.stages.outputs import StageOutput
from madpo_ray.stages.eval import evaluate_run
from madpo_ray.stages.score import score_splits, scoring_backend

log = logging.getLogger("madpo_ray.pipeline")
WORKER_STAGES = (*TRAINED_STAGES, "score")  # the stages whose work the run's Ray Train workers may take


def no_progress(training: str, progress_path) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


class Pipeline:
    """`progress(training, progress_path)` is a context around each training: the CLI draws a
    progress bar from the file rank 0 rewrites at every report; the default draws nothing."""

    def __init__(self, cfg: PipelineConfig, progress: Callable = no_progress):
        self.cfg = cfg
        self.layout = RunLayout.of(cfg)
        self.faults: dict[str, dict] = {}  # tests only: stage -> engine.faults.FaultInjectingSession's options
        self.progress = progress
        self.timings: dict[str, float] = {}
        self.group: Optional[TrainingGroup] = None  # the Ray Train workers, from the first training to the end

    @property
    def run_dir(self):
        return self.layout.run_dir

    @property
    def is_testbed(self) -> bool:
        return is_testbed(self.cfg)

    @property
    def base_model(self) -> str:
        """A hub name, or a local folder made absolute (Ray workers do not share this cwd)."""
        name = self.cfg.model.name_or_path
        if name is None:
            return str(self.layout.base_dir)
        from pathlib import Path

        return str(Path(name).resolve()) if Path(name).exists() else name

    def tokenizer(self):
        return load_tokenizer(self.base_model if self.cfg.model.tokenizer is None else self.cfg.model.tokenizer)

    def prompt_for(self, document: str):
        return prompt_for(self.cfg.data, document)

    # ------------------------------------------------------------------ provenance
    def stage_settings(self, stage: str) -> dict:
        return settings_of(self.cfg.model_dump(mode="json"), STAGE_SETTINGS[stage])

    def upstream_id(self, stage: str) -> Optional[str]:
        up = upstream_of(stage)
        rec = self.layout.record(up) if up else None
        return rec.record_id if rec else None

    def why_stale(self, stage: str) -> Optional[str]:
        """None if the stage is up to date, else why it must run."""
        rec = self.layout.record(stage)
        if rec is None:
            return "not run yet" if not self.layout.is_done(stage) else "made by an older version (no provenance)"
        return rec.why_stale(self.stage_settings(stage), self.upstream_id(stage), upstream_of(stage) or "")

    def begin_stage(self, stage: str, forced: bool = False) -> None:
        """Keep an interrupted training's checkpoints only if they were made with the same settings
        and inputs and the stage is not forced (provenance.begin_training)."""
        begin_training(self.layout.stage_dir(stage), self.layout.checkpoint_root(stage), self.stage_settings(stage),
                       self.upstream_id(stage), force=forced)

    def finish_stage(self, stage: str, metrics: dict) -> None:
        write_json(self.layout.metrics_path(stage), metrics)
        StageRecord.write(self.layout.stage_dir(stage), self.stage_settings(stage), self.upstream_id(stage))

    # ------------------------------------------------------------------ driver
    def run(self, stages: tuple[str, ...] = STAGES, force: tuple[str, ...] = ()) -> dict:
        """Run `stages` in order; a stage in `force` is redone even if up to date. One writer per run
        folder: a second `madpo run`/`tune` on it fails at once, naming the first (runlock.py)."""
        if {"pairs", "eval"} & set(stages):  # they generate: an engine that is not installed fails now, not hours in
            resolve_backend(self.cfg.eval.backend, many_models=False)
        self.layout.run_dir.mkdir(parents=True, exist_ok=True)
        with RunLock(self.layout.run_dir):
            try:
                return self.run_locked(stages, force)
            finally:
                self.stop_workers()

    def stop_workers(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None

    def run_locked(self, stages: tuple[str, ...], force: tuple[str, ...]) -> dict:
        save_config(self.cfg, self.layout.config_path)
        results = {}
        for i, stage in enumerate(stages):
            if not set(stages[i:]) & set(WORKER_STAGES):
                self.stop_workers()  # nothing left for them: their CPUs and memory go to what follows
            reason = "forced" if stage in force else self.why_stale(stage)
            if reason is None:
                log.info("== %s: up to date, skipping", stage)
                results[stage] = self.layout.read_metrics(stage)
                continue
            log.info("== %s: running (%s)", stage, reason)
            self.begin_stage(stage, forced=stage in force)
            t0 = time.time()
            metrics = self.stage_bodies()[stage]()
            metrics["wall_seconds"] = self.timings[stage] = time.time() - t0
            self.finish_stage(stage, metrics)
            log.info("== %s: done in %.1fs", stage, metrics["wall_seconds"])
            results[stage] = metrics
        return results

    def train(self, stage: str, examples: list[dict], model_dir, order_by: str = "index",
              validation: Optional[list[dict]] = None) -> dict:
        """Train a stage on `examples` (in `order_by` order: "index" is their order here); returns
        its training metrics. `validation` examples (the reward stage's early stopping) reach every
        worker whole. ray.backend=ray: on the run's worker group; local: this process."""
        lay = self.layout
        workers = 1 if self.cfg.ray.backend == "local" else self.cfg.ray.num_workers
        accumulation_steps(getattr(self.cfg, stage).optim, workers, len(examples), stage)  # before any worker starts
        key = lay.training_key(stage)
        training = Training(stage, self.cfg, str(model_dir),
                            StageOutput(lay.model_dir(stage), lay.train_metrics_path(stage), lay.adapter_dir(stage)),
                            tracking=tracking_for(self.cfg, key, self.cfg.model_dump(mode="json")[stage], progress=True),
                            faults=self.faults.get(stage))
        with self.progress(key, lay.progress_path(key)):
            if self.cfg.ray.backend == "local":
                datasets = {"train": examples, **({"validation": validation} if validation else {})}
                launch(training, LocalSession(datasets, checkpoint_root=str(lay.checkpoint_root(stage))))
                placement = {"workers_wait_seconds": 0.0}
            else:
                placement = self.train_on_ray(training, examples, order_by, validation)
        return {**json.loads(lay.train_metrics_path(stage).read_text()), **placement}

    def train_on_ray(self, training: Training, examples: list[dict], order_by: str,
                     validation: Optional[list[dict]] = None) -> dict:
        """The training on the run's worker group (started by the first training); the examples
        travel through Ray's object store. Returns how long it waited for the workers, and which
        worker processes took it."""
        import ray

        lay, stage = self.layout, training.stage
        group = self.workers()  # before the first ray.put: that would start a default cluster, not the configured one
        if order_by == "index":
            examples = [{**ex, "index": i} for i, ex in enumerate(examples)]
        datasets = {"train": ray.put(examples)}
        if validation:
            datasets["validation"] = ray.put([{**ex, "index": i} for i, ex in enumerate(validation)])
        return group.run(to_loop_config(training, checkpoint_root=str(lay.checkpoint_root(stage)),
                                        checkpoint_name=lay.trainer_name(stage), datasets=datasets, order_by=order_by))

    def workers(self) -> TrainingGroup:
        """The run's Ray Train worker group, started on first use."""
        if self.group is None:
            since = time.time()
            init_ray(self.cfg.ray)
            self.group = TrainingGroup(train_loop_per_worker, self.cfg.ray, self.layout.ray_storage, TRAININGS_RUN,
                                       starting_since=since, jobs=len(WORKER_STAGES))
        return self.group

    def score_in_workers(self, examples: list[dict], ref_dir, reward_dir, out_dir) -> Path:
        """score.backend=workers: the scoring pass as one job of the run's worker group."""
        import ray

        group = self.workers()  # first: see train_on_ray
        group.run(scoring_job(ray.put(examples), ref_dir, reward_dir, out_dir, self.cfg))
        return out_dir

    # ------------------------------------------------------------------ stages
    def stage_bodies(self) -> dict[str, Callable[[], dict]]:
        """What each stage does, by name; each returns the stage's metrics."""
        return {"data": self.stage_data, "sft": self.stage_sft, "pairs": self.stage_pairs, "reward": self.stage_reward,
                "score": self.stage_score, "policy": self.stage_policy, "eval": self.stage_eval}

    def stage_data(self) -> dict:
        c, lay = self.cfg.data, self.layout
        metrics: dict = {"source": c.source}
        if c.source == "generated":
            splits = generate_splits(c.num_documents, c.num_validation_documents, c.num_eval_documents, c.corpus_seed,
                                     c.terse_share)
            for split in SPLITS:
                write_jsonl([x.to_dict() for x in splits[split]], lay.docs_path(split))
        elif c.source == "debian":
            rng = random.Random(c.corpus_seed)
            sizes = {"train": c.num_documents, "validation": c.num_validation_documents, "test": c.num_eval_documents}
            for split in SPLITS:
                docs = load_debian_split(split)
                write_jsonl(rng.sample(docs, min(sizes[split], len(docs))), lay.docs_path(split))
        else:
            metrics.update(self.load_input_pairs())
            if self.cfg.score.margins_from == "data":  # fail here, before SFT, not at the reward stage
                self.check_data_margins(self.layout.input_pairs_path)
        if self.cfg.model.name_or_path is None:
            self.build_base()
        return metrics

    def load_input_pairs(self) -> dict:
        """A user's preference dataset: validated train, validation and test pairs. Validation is
        its `validation_split` and test its `eval_split`; a split the dataset lacks (a single
        .jsonl/.parquet file has none) is `validation_fraction` of train, held out."""
        c = self.cfg.data
        pairs, report = load_pairs(c.source, c.split, c.strict)
        log.info(report.summary())
        metrics = {"train_validation": report.to_metrics()}
        held = {"validation": self.optional_split(c.validation_split, metrics),
                "test": self.optional_split(c.eval_split, metrics)}
        rng = random.Random(c.corpus_seed)
        n_held = max(1, int(len(pairs) * c.validation_fraction))
        for split in ("test", "validation"):  # a split the dataset lacks is held out of train, whole prompts at a time
            if not held[split]:
                held[split], pairs = hold_out_by_prompt(pairs, n_held, rng)
                log.info("%s: held out %d train pairs of %d prompts (data.validation_fraction=%g)", split,
                         len(held[split]), len({prompt_key(r) for r in held[split]}), c.validation_fraction)
        if c.max_pairs:
            pairs = pairs[:c.max_pairs]
        write_jsonl(pairs, self.layout.input_pairs_path("train"))
        for split, rows in held.items():
            write_jsonl(rows, self.layout.input_pairs_path(split))
        return {**metrics, "train_pairs": len(pairs), **{f"{k}_pairs": len(v) for k, v in held.items()}}

    def optional_split(self, split: Optional[str], metrics: dict) -> list[dict]:
        """The validated pairs of a named split, or [] when none is named or the dataset lacks it."""
        if not split:
            return []
        if single_file_without(self.cfg.data.source, split):
            log.info("%s is a single split: %r is held out of it instead", self.cfg.data.source, split)
            return []
        try:
            rows, report = load_pairs(self.cfg.data.source, split, self.cfg.data.strict)
        except Exception as e:  # noqa: BLE001 - a missing split is reported, not fatal
            log.warning("no split %r in %s (%s)", split, self.cfg.data.source, e)
            return []
        metrics[f"{split}_validation"] = report.to_metrics()
        return rows

    def build_base(self) -> None:
        """The tiny from-scratch default: a BPE tokenizer and a Llama trained on nothing yet."""
        lay = self.layout
        if self.is_testbed:
            docs = read_jsonl(lay.docs_path("train"))
            texts = [x["document"] for x in docs] + [x["reference"] for x in docs]
        else:
            texts = [str(p[k]) for p in read_jsonl(lay.input_pairs_path("train")) for k in ("prompt", "chosen", "rejected")]
        build_tiny_base(texts, self.cfg.model, lay.base_dir, seed=self.cfg.sft.optim.seed)

    def stage_sft(self) -> dict:
        c = self.cfg.data
        if self.is_testbed:
            rows = [{"prompt": self.prompt_for(x["document"]), "response": " " + x["reference"]}
                    for x in read_jsonl(self.layout.docs_path("train"))]
        else:
            rows = [{"prompt": p["prompt"], "response": p["chosen"]}
                    for p in read_jsonl(self.layout.input_pairs_path("train"))]
        examples = tokenize_sft(self.tokenizer(), rows, c.max_prompt_length, c.max_length)
        return {"examples": len(examples), **self.train("sft", examples, self.base_model)}

    def stage_pairs(self) -> dict:
        """Testbed: sample summaries from the SFT policy, pair them, label Bradley-Terry by gold reward."""
        lay = self.layout
        if not self.is_testbed:
            for split in SPLITS:
                write_jsonl(read_jsonl(lay.input_pairs_path(split)), lay.pairs_path(split))
            return {"source": self.cfg.data.source}

        torch.set_num_threads(max(1, os.cpu_count() or 1))
        generator = stage_generator(self.cfg, batch_size=64)
        generator.load(str(lay.model_dir("sft")))
        return {split: self.testbed_pairs(generator, split) for split in SPLITS}

    def testbed_pairs(self, generator: Generator, split: str) -> dict:
        c = self.cfg.data
        docs = read_jsonl(self.layout.docs_path(split))
        prompts = dict(zip((x["doc_id"] for x in docs),
                           generation_prompts(c, generator.tokenizer, [x["document"] for x in docs])))
        t0 = time.time()
        samples, draws = self.sft_samples(generator, prompts)
        log.info("pairs/%s: sampled %d summaries in %.1fs", split, draws, time.time() - t0)
        skipped = Counter()
        pairs = build_pairs(docs, tier=c.tier, sharpness=c.label_sharpness, seed=c.corpus_seed,
                            policy_samples=samples, prompt_for=self.prompt_for, label_noise=c.label_noise,
                            pairs_per_document=c.pairs_per_document, skipped=skipped)
        report = ValidationReport(source=f"testbed/{split}")
        pairs = validate_rows(list(enumerate(pairs)), report, c.strict)
        if split == "train" and c.max_pairs:
            pairs = pairs[:c.max_pairs]
        write_jsonl(pairs, self.layout.pairs_path(split))
        composition = pair_composition(pairs, skipped)
        if skipped:
            log.warning("pairs/%s: %d draws skipped (no new distinct pair of their design): %s", split,
                        sum(skipped.values()), dict(skipped))
        n = max(1, len(pairs))
        return {"pairs": len(pairs), "validation": report.to_metrics(), "sft_samples": draws,
                "composition": composition, "label_agrees_with_gold": sum(p["true_margin"] > 0 for p in pairs) / n,
                "mean_abs_true_margin": sum(abs(p["true_margin"]) for p in pairs) / n}

    def sft_samples(self, generator: Generator, prompts: dict[str, str]) -> tuple[dict[str, list[str]], int]:
        """data.samples_per_document SFT samples per document at T=1, then more draws (at most
        data.max_extra_sample_rounds rounds) for documents with fewer distinct samples than
        pairs_per_document policy-vs-policy pairs need: identical samples make no pair."""
        c = self.cfg.data
        samples: dict[str, list[str]] = {d: [] for d in prompts}
        need, todo, draws = distinct_samples_needed(c.pairs_per_document), list(prompts), 0
        for k in range(c.samples_per_document + c.max_extra_sample_rounds):
            if k >= c.samples_per_document:
                todo = [d for d in todo if len({s.strip() for s in samples[d] if s.strip()}) < need]
            if not todo:
                break
            texts = generator.texts([prompts[d] for d in todo], 1.0, SampleSpec.from_config(self.cfg),
                                    seed=c.corpus_seed * 100 + k)
            for d, t in zip(todo, texts):
                samples[d].append(t)
            draws += len(todo)
        return samples, draws

    def tokenized_pairs(self, split: str) -> tuple[list[dict], dict]:
        c = self.cfg.data
        rows = read_jsonl(self.layout.pairs_path(split))
        report = ValidationReport(source=f"tokenize/{split}")
        exs = tokenize_pairs(self.tokenizer(), rows, c.max_prompt_length, c.max_length, c.overlong, report, c.strict)
        by_id = {r.get("row_id", i): r for i, r in enumerate(rows)}
        keep = ("pair_id", "gold_chosen", "gold_rejected", "true_margin", "chosen_kind", "rejected_kind",
                "pair_design", "label_flipped")
        for ex in exs:
            src = by_id[ex["row_id"]]
            ex.update({k: src[k] for k in keep if k in src and k not in ex})
            # Conversational rows are message lists; parquet wants one type per column.
            ex["prompt"], ex["chosen"], ex["rejected"] = (str(src["prompt"]), str(src["chosen"]), str(src["rejected"]))
        return exs, report.to_metrics()

    def stage_reward(self) -> dict:
        """The reward model on the train pairs; the validation pairs decide early stopping. With
        score.margins_from=data no model is trained: the stage checks every pair has a margin."""
        if self.cfg.score.margins_from == "data":
            log.info("reward: no model trained; margins come from the dataset's 'margin' column")
            return {"margins_from": "data", **self.check_data_margins(self.layout.pairs_path)}
        ids = ("prompt_ids", "chosen_ids", "rejected_ids")
        (exs, report), (val, _) = self.tokenized_pairs("train"), self.tokenized_pairs("validation")
        strip = [{k: ex[k] for k in ids} for ex in exs]
        validation = [{k: ex[k] for k in ids} for ex in val]
        return {"examples": len(strip), "validation_examples": len(validation), "tokenize": report,
                **self.train("reward", strip, self.layout.model_dir("sft"), validation=validation)}

    def check_data_margins(self, path_of) -> dict:
        """Every pair of every split (`path_of(split)`) must carry a margin (validated finite when
        loaded); a pair without one is an error naming its rows, before any training."""
        counts = {}
        for split in SPLITS:
            rows = read_jsonl(path_of(split))
            missing = [r.get("row_id", i) for i, r in enumerate(rows) if r.get("margin") is None]
            if missing:
                raise DataValidationError(
                    f"score.margins_from=data: {len(missing)} {split} pair(s) have no 'margin' (rows {missing[:10]}"
                    f"{'...' if len(missing) > 10 else ''}); give every pair a margin, or train a reward model")
            counts[f"{split}_pairs_with_margin"] = len(rows)
        return counts

    def stage_score(self) -> dict:
        models = ("sft",) if self.cfg.score.margins_from == "data" else ("sft", "reward")
        for stage in models:  # before any Ray work: a clear message, not a worker traceback
            check_model_folder(str(self.layout.model_dir(stage)))
        tokenized = {split: self.tokenized_pairs(split) for split in SPLITS}
        tokenized = {split: t for split, t in tokenized.items() if t[0]}  # a split tokenising skipped whole
        if scoring_backend(self.cfg, sum(len(exs) for exs, _ in tokenized.values())) == "ray_data":
            self.stop_workers()  # Ray Data's scoring actors need the CPUs (or GPUs) the training workers hold
            init_ray(self.cfg.ray)
        return score_splits(self.layout, tokenized, self.cfg, in_workers=self.score_in_workers)

    def stage_policy(self) -> dict:
        check_model_folder(str(self.layout.model_dir("sft")))
        path = self.layout.scored_path("train")
        examples = load_policy_examples(path, self.cfg.policy.loss.name)  # checked here, before any training
        return {"examples": len(examples), **self.train("policy", examples, self.layout.model_dir("sft"), "row_id")}

    def stage_eval(self) -> dict:
        return evaluate_run(self.cfg, self.layout)
