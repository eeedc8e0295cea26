"""`madpo compare`: DPO, IPO, beta-DPO and MADPO from the same SFT model and scored pairs,
over several training seeds, judged at every decoding temperature. This module orchestrates;
training is the policy stage through `launcher.launch`, generation `eval.generate`, judging `eval.heldout`,
the report `eval.report`.

    runs/<name>/compare/
      <method>/seed<k>/model/            trained policy (+ metrics.json, DONE record)
      generations/<method>__seed<k>.parquet   samples at every temperature
      results.json, table.md             mean gold reward / RM score / win rates with 95% CIs
      gold_vs_temperature.png            one line per method, error bars

Stages before policy are the pipeline's and are reused. Each (method, seed) training is a Ray
task of `compare.cpus_per_training` CPUs, so the cluster runs as many at once as it has room
for; one whose DONE record matches its settings and the current scored pairs is never redone,
and an interrupted one resumes from its last checkpoint.

`compare.ablations` adds MADPO's two ablations (with MADPO's settings, so only the clipping of
c differs); `compare.settings=tuned` gives each method the best settings of its own finished `madpo tune`
search of its loss. `compare.tiers` repeats everything once per data-quality tier, each in its
own run folder `<name>-<tier>` (a tier is other pairs, so another reward model and scores), and
writes a combined report:

    runs/<name>/compare_tiers/   results.json, table.md, gold_vs_temperature_by_tier.png

`compare.lr_grid` repeats the untuned comparison at every learning rate of the grid (every method
at compare.reference_beta and that lr, in compare/lr<lr>/), with one combined report in
compare/lr_grid/: matched settings, one MADPO-minus-baseline difference per grid point.

Every report reads the validation split. `compare.final` (`madpo compare --final`) is the one
explicit final step: the same trainings judged on the sealed test split, written beside them in
final/ (compare/final/, compare_tiers/final/, compare/lr_grid/final/) and recorded in the run's
final_readings.jsonl.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from madpo_ray.config import ConfigError, LossConfig, MethodConfig, PipelineConfig, load_config
from madpo_ray.console import quiet_libraries
from madpo_ray.data.scored import load_policy_examples
from madpo_ray.engine.sessions import LocalSession
from madpo_ray.eval.generate import generate_for_models
from madpo_ray.eval.heldout import SFT_LABEL, eval_prompts, judge_rows, record_final_reading
from madpo_ray.io import write_json, write_text_atomically
from madpo_ray.launcher import Training, launch, tracking_for
from madpo_ray.layout import BEFORE_POLICY, DEVELOPMENT_SPLIT, SEALED_SPLIT, RunLayout, is_testbed, model_folder
from madpo_ray.pipeline import Pipeline
from madpo_ray.provenance import StageRecord, begin_training, settings_of
from madpo_ray.runlock import RunLock
from madpo_ray.runtime import init_ray, worker_env
from madpo_ray.stages.outputs import StageOutput
from madpo_ray.tracking import ensure_experiment

log = logging.getLogger("madpo_ray.compare")

ABLATIONS = ("madpo_amplify", "madpo_regularize")  # the paper's "amplify only" and "regularise only"
POLICY_KEYS = ("margin_noise",)  # method overrides that are policy settings, not loss parameters
SEARCH_HINT = "madpo tune --config {loss}_gold"  # the shipped validation search of each loss (madpo_ray/tune_configs/)


def loss_for_method(cfg: PipelineConfig, loss: str) -> LossConfig:
    """The loss config a method starts from before its overrides. With the reference settings
    (the default) every method takes its loss's defaults and the shared reference beta, never the
    run config's loss parameters, which may have been tuned for one method; with the tuned settings
    the overrides carry everything the method's own search chose."""
    if cfg.compare.settings == "reference":
        return LossConfig(name=loss, beta=cfg.compare.reference_beta)
    return LossConfig(name=loss)


def method_config(cfg: PipelineConfig, method: MethodConfig, seed: int) -> PipelineConfig:
    """The pipeline config of one (method, seed) training: the method's loss at the comparison's
    settings (`loss_for_method`), the reference lr unless an override sets one, its overrides, the seed."""
    sets: dict = {"policy.loss": loss_for_method(cfg, method.loss), "policy.optim.seed": seed}
    if cfg.compare.settings == "reference":
        sets["policy.optim.lr"] = cfg.compare.reference_lr
    for key, value in method.overrides.items():
        path = key if key.startswith(("optim.", "loss.")) or key in POLICY_KEYS else f"loss.{key}"
        sets[f"policy.{path}"] = value
    return cfg.derive(sets)


def training_settings(cfg: PipelineConfig) -> dict:
    """What a finished training's DONE record must match to be reused."""
    return settings_of(cfg.model_dump(mode="json"), ("policy", "model.dtype", "model.lora"))


def canonical_key(key: str) -> str:
    """A method override's key as `method_config` reads it: "loss.beta" and "beta" are one key."""
    return key[len("loss."):] if key.startswith("loss.") else key


@dataclass
class TunedSettings:
    """The best settings of a finished `madpo tune` search for one loss, as method overrides."""

    overrides: dict
    source: Path  # its best_config.yaml


def tuned_settings(loss: str, tune_dirs: Sequence[Path]) -> Optional[TunedSettings]:
    """The newest finished search (one with a best_config.yaml) whose best config trains `loss`:
    every loss parameter and the learning rate its best trial trained with. `tune_dirs` are tried
    in order (the run's own searches first); a best_config.yaml this version cannot read is
    skipped with a warning."""
    for tune_dir in tune_dirs:
        found = []
        for f in sorted(Path(tune_dir).glob("*/best_config.yaml")):
            try:
                best = load_config(f)  # yaml.safe_load and the config's own validation
            except ConfigError as e:
                log.warning("compare: ignoring %s: %s", f, e)
                continue
            if best.policy.loss.name == loss:
                found.append((f.stat().st_mtime, str(f), best))
        if found:
            _, f, best = max(found, key=lambda x: (x[0], x[1]))
            overrides = {**best.policy.loss.kwargs(), "optim.lr": best.policy.optim.lr}
            return TunedSettings(overrides, Path(f))
    return None


def source_label(path: Path, run_dir: Path) -> str:
    """A tuned file as the report names it: relative to the run (tune/<search>/best_config.yaml),
    else to the runs folder (<other run>/tune/...)."""
    for root in (run_dir, run_dir.parent):
        try:
            return str(Path(path).resolve().relative_to(Path(root).resolve()))
        except ValueError:
            continue
    return str(path)


def compared_methods(cfg: PipelineConfig, tune_dirs: Sequence[Path] = (),
                     run_dir: Optional[Path] = None) -> tuple[list[MethodConfig], dict[str, dict[str, str]]]:
    """The methods a comparison trains, and per method where each override came from.

    With compare.settings=tuned every method takes its own search's settings under its own
    overrides (which win), and a method without a finished search is an error that names the
    search to run: never a silent fallback to another method's settings. With compare.ablations
    the two ablations take MADPO's resolved overrides, so they differ from it only in how c is clipped."""
    c, run_dir = cfg.compare, Path(run_dir or cfg.run_dir)
    methods, origin, missing = [], {}, []
    for m in c.methods:
        overrides = {canonical_key(k): v for k, v in m.overrides.items()}
        origin[m.name] = {k: "compare.methods overrides" for k in overrides}
        tuned = tuned_settings(m.loss, tune_dirs) if c.settings == "tuned" else None
        if c.settings == "tuned" and tuned is None:
            missing.append(m.loss)
        for k, v in (tuned.overrides.items() if tuned else ()):
            if k not in overrides:
                overrides[k] = v
                origin[m.name][k] = source_label(tuned.source, run_dir)
        methods.append(m.model_copy(update={"overrides": overrides}))
    if missing:
        searched = ", ".join(str(d) for d in tune_dirs) or "no tune folder"
        raise ConfigError(f"compare.settings=tuned: no finished search for {', '.join(sorted(set(missing)))} in "
                          f"{searched}; run {'; '.join(SEARCH_HINT.format(loss=x) for x in sorted(set(missing)))} "
                          "(validation only), or compare at the reference settings without --tuned")
    if c.ablations:
        ref = next((m for m in methods if m.name == "madpo"), None)
        for loss in ABLATIONS:
            if loss not in [m.name for m in methods]:
                methods.append(MethodConfig(loss=loss, overrides=dict(ref.overrides) if ref else {}))
                origin[loss] = {k: f"{v}, as madpo" for k, v in origin.get("madpo", {}).items()} if ref else {}
    return methods, origin


def default_source(cfg: PipelineConfig, key: str) -> str:
    """Where a setting that no override names comes from."""
    if cfg.compare.settings == "reference" and key in ("beta", "lr"):
        return f"compare.reference_{key} (untuned, shared by every method)"
    return "policy.optim (run config)" if key == "lr" else "loss defaults"


def method_settings(cfg: PipelineConfig, methods: list[MethodConfig], origin: dict[str, dict[str, str]]) -> list[dict]:
    """Per method, every loss parameter and the learning rate it trains with, and each one's source."""
    out = []
    for m in methods:
        mc = method_config(cfg, m, cfg.compare.seeds[0])
        settings, src = mc.policy.loss.resolved(), origin.get(m.name, {})
        sources = {k: src.get(k) or default_source(cfg, k) for k in settings}
        settings["lr"] = mc.policy.optim.lr
        sources["lr"] = src.get("optim.lr") or default_source(cfg, "lr")
        out.append({"method": m.name, "loss": m.loss, "settings": settings, "sources": sources})
    return out


def protocol(cfg: PipelineConfig) -> dict:
    """What the report says, above every table and in the plot, about how settings were chosen."""
    c = cfg.compare
    if c.settings == "tuned":
        return {"mode": "tuned", "title": "tuned: each method at its own validation-tuned settings",
                "text": "every method trains at the best settings of its own loss's finished `madpo tune` search "
                        "(selected on the validation split); the settings list below names each search."}
    return {"mode": "reference", "title": "untuned: every method at the same reference settings",
            "text": f"beta {c.reference_beta:g} and lr {c.reference_lr:g} for every method (compare.reference_beta, "
                    "compare.reference_lr: the MADPO paper's shared recipe), every other loss parameter at its "
                    "loss's default; nothing was tuned for any method, and an untuned difference can be a step-size "
                    "effect. Each method at its own validation-tuned settings: `madpo compare --tuned`."}


def train_method(base_config: dict, method: dict, seed: int, scored_train: str, sft_dir: str, out_dir: str,
                 upstream: Optional[str], tracking: Optional[dict] = None, threads: int = 1) -> dict:
    """One (method, seed) training in this process (the Ray task body), through the launcher.
    Resumable: checkpoints go under out_dir/checkpoints until the model is saved."""
    quiet_libraries()
    torch.set_num_threads(max(1, threads))
    m = MethodConfig.model_validate(method)
    cfg = method_config(PipelineConfig.model_validate(base_config), m, seed)
    out = Path(out_dir)
    session = LocalSession({"train": load_policy_examples(scored_train, cfg.policy.loss.name)},
                           checkpoint_root=str(out / "checkpoints"))
    training = Training("policy", cfg, sft_dir, StageOutput(model_folder(out), out / "train_metrics.json"), tracking,
                        options={"label": f"compare/{m.name}/seed{seed}"})
    t0 = time.time()
    result = launch(training, session)
    # result.metrics carries the final training "loss"; the settings live under "policy".
    metrics = {**result.metrics, "method": m.name, "seed": seed, "policy": cfg.policy.model_dump(mode="json"),
               "steps": result.steps, "seconds": time.time() - t0, "loss_history": result.loss_history}
    write_json(out / "metrics.json", metrics)
    StageRecord.write(out, training_settings(cfg), upstream)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return metrics


class Comparison:
    def __init__(self, pipeline, tune_dirs: Optional[Sequence[Path]] = None, out_dir: Optional[Path] = None,
                 command: str = "madpo compare --final"):
        """tune_dirs: where `compare.settings=tuned` looks for finished searches (default: this run's tune/);
        out_dir: where trainings, generations and the report go (default: the run's compare/); with
        compare.final the generations and report of the sealed test split go to out_dir/final/."""
        self.p = pipeline
        self.cfg: PipelineConfig = pipeline.cfg
        self.layout = pipeline.layout
        self.out_dir = Path(out_dir) if out_dir is not None else self.layout.compare_dir
        self.final = self.cfg.compare.final
        self.split = SEALED_SPLIT if self.final else DEVELOPMENT_SPLIT
        self.report_dir = self.out_dir / "final" if self.final else self.out_dir
        self.command = command  # what the ledger says read the sealed split
        self.rows: list[dict] = []  # the judged samples, for callers that analyse further (madpo study)
        self.prompt_ids: list[str] = []
        dirs = [self.layout.tune_dir] if tune_dirs is None else list(tune_dirs)
        self.methods, self.origin = compared_methods(self.cfg, dirs, self.layout.run_dir)

    def training_dir(self, method: str, seed: int) -> Path:
        return self.layout.training_dir(method, seed, self.out_dir)

    def models(self) -> list[tuple[str, int, Path]]:
        """(method, seed, model folder) of everything judged; the SFT policy is seed -1."""
        return [(SFT_LABEL, -1, self.layout.model_dir("sft"))] + [
            (m.name, s, model_folder(self.training_dir(m.name, s))) for m in self.methods
            for s in self.cfg.compare.seeds]

    def finished(self, method: MethodConfig, seed: int, upstream: Optional[str]) -> Optional[dict]:
        """The metrics of a training that can be reused, else None (and its stale folder removed)."""
        d = self.training_dir(method.name, seed)
        rec = StageRecord.read(d)
        if rec is None:
            return None
        reason = rec.why_stale(training_settings(method_config(self.cfg, method, seed)), upstream, "score")
        if reason is None:
            return json.loads((d / "metrics.json").read_text())
        log.warning("compare: %s seed %d must be trained again: %s", method.name, seed, reason)
        shutil.rmtree(d)
        return None

    def train_all(self) -> dict:
        """Every missing (method, seed) as a Ray task (as many at once as the cluster has CPUs for),
        or one after another in this process with ray.backend=local."""
        import ray

        c, lay = self.cfg.compare, self.layout
        upstream = lay.record("score").record_id
        todo, done = [], {}
        for m in self.methods:
            for seed in c.seeds:
                previous = self.finished(m, seed, upstream)
                if previous is not None:
                    done[(m.name, seed)] = previous
                else:
                    d = self.training_dir(m.name, seed)
                    begin_training(d, d / "checkpoints", training_settings(method_config(self.cfg, m, seed)), upstream)
                    todo.append(((m.name, seed), (self.cfg.model_dump(mode="json"), m.model_dump(), seed,
                                                  str(lay.scored_path("train")), str(lay.model_dir("sft")),
                                                  str(d), upstream, self.tracking(d, m, seed))))
        log.info("compare: %d trainings (%d already done)", len(todo) + len(done), len(done))
        if todo:
            ensure_experiment(todo[0][1][-1])  # before the parallel tasks, which would each create it
        if self.cfg.ray.backend == "local":
            for key, args in todo:
                done[key] = train_method(*args, threads=max(1, os.cpu_count() or 1))
        else:
            init_ray(self.cfg.ray)
            task = ray.remote(train_method).options(num_cpus=c.cpus_per_training, max_retries=2,
                                                    runtime_env={"env_vars": worker_env()})
            threads = max(1, int(c.cpus_per_training))
            self.wait_for({task.remote(*args, threads=threads): key for key, args in todo}, done)
        return {f"{k[0]}/seed{k[1]}": {"steps": v["steps"], "seconds": v["seconds"], "final_loss": v.get("loss")}
                for k, v in done.items()}

    def tracking(self, folder: Path, method: MethodConfig, seed: int) -> Optional[dict]:
        """A comparison training is tracked under its folder's path in the run ("compare/madpo/seed0")."""
        training = Path(folder).resolve().relative_to(self.layout.run_dir).as_posix()
        return tracking_for(self.cfg, training, method_config(self.cfg, method, seed).policy.model_dump(mode="json"))

    @staticmethod
    def wait_for(pending: dict, done: dict) -> None:
        import ray

        t0, total = time.time(), len(pending) + len(done)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            key = pending.pop(ready[0])
            done[key] = ray.get(ready[0])  # a task that failed its retries raises here, with its traceback
            log.info("compare: trained %s seed %d in %.0fs (%d/%d, %.0fs elapsed)", key[0], key[1],
                     done[key]["seconds"], len(done), total, time.time() - t0)

    def run(self) -> dict:
        """The whole comparison as the run folder's one writer."""
        self.layout.run_dir.mkdir(parents=True, exist_ok=True)
        with RunLock(self.layout.run_dir):
            return self.run_locked()

    def run_locked(self) -> dict:
        from madpo_ray.eval.report import paired_analysis, write_report

        t0 = time.time()
        self.p.run(BEFORE_POLICY)
        self.report_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomically(self.report_dir / "config.yaml", self.cfg.to_yaml())
        t_train = time.time()
        trainings = self.train_all()
        t_gen = time.time()
        ids, prompts, _ = eval_prompts(self.cfg, self.layout, self.split)
        sft_sets = len(self.cfg.compare.seeds)  # the SFT policy draws as often as a method's seeds together
        rows, generation = generate_for_models(self.cfg, self.models(), ids, prompts, self.report_dir / "generations",
                                               draws_multiplier={SFT_LABEL: sft_sets})
        t_judge = time.time()
        judged = judge_rows(self.cfg, self.layout, rows, self.split)
        col = judged["column"]
        paired = paired_analysis(rows, col, ids) if rows and col in rows[0] else {}
        self.rows, self.prompt_ids = rows, ids
        final = record_final_reading(self.layout, self.report_dir, self.command, ids, prompts) if self.final else None
        return write_report(self.cfg, self.report_dir, judged, prompts=len(ids), final=final,
                            sft_samples_per_prompt=self.cfg.eval.samples_per_prompt * sft_sets,
                            seeds=self.cfg.compare.seeds, methods=[m.model_dump() for m in self.methods],
                            protocol=protocol(self.cfg),
                            method_settings=method_settings(self.cfg, self.methods, self.origin), paired=paired,
                            trainings=trainings, generation=generation,
                            seconds={"pipeline": t_train - t0, "train": t_gen - t_train, "generate": t_judge - t_gen,
                                     "judge": time.time() - t_judge, "total": time.time() - t0})


# --------------------------------------------------------------------------- several tiers
def tier_run_name(name: str, tier: str) -> str:
    return f"{name}-{tier}"


def tier_config(cfg: PipelineConfig, tier: str) -> PipelineConfig:
    """One tier's run: this config with data.tier set, its own run name, and no tiers of its own."""
    return cfg.derive({"data.tier": tier, "name": tier_run_name(cfg.name, tier), "compare.tiers": None})


def compare_tiers(cfg: PipelineConfig) -> dict:
    """The comparison once per tier of compare.tiers, each in its own run `<name>-<tier>` (a tier's
    pairs differ, so its reward model and scores do too; every stage is reused when up to date),
    then one report across tiers in this run's compare_tiers/ (its final/ with compare.final).
    Tuned settings are looked up in the tier's run first, then in this run."""
    from madpo_ray.eval.report import write_grouped_report

    if not is_testbed(cfg):
        raise ConfigError(f"compare.tiers needs testbed pairs (data.source generated or debian), not "
                          f"{cfg.data.source!r}: the tier picks which testbed pairs are drawn")
    base = RunLayout.of(cfg)
    base.run_dir.mkdir(parents=True, exist_ok=True)
    per_tier = {}
    with RunLock(base.run_dir):
        for tier in cfg.compare.tiers or [cfg.data.tier]:
            p = Pipeline(tier_config(cfg, tier))
            log.info("compare: tier %s in %s", tier, p.layout.run_dir)
            dirs = list(dict.fromkeys([p.layout.tune_dir, base.tune_dir]))
            per_tier[tier] = {**Comparison(p, tune_dirs=dirs).run(), "run_dir": str(p.layout.run_dir)}
        return write_grouped_report(combined_dir(base.compare_tiers_dir, cfg), per_tier, "tier")


def combined_dir(root: Path, cfg: PipelineConfig) -> Path:
    """Where a report over several comparisons goes: root, or root/final for the sealed split."""
    return root / "final" if cfg.compare.final else root


def lr_label(lr: float) -> str:
    return f"{lr:g}"


def compare_lr_grid(cfg: PipelineConfig) -> dict:
    """The untuned comparison at every lr of compare.lr_grid, each in compare/lr<lr>/ of this run
    (the stages before policy are shared), then one report across the grid in compare/lr_grid/."""
    from madpo_ray.eval.report import write_grouped_report

    layout = RunLayout.of(cfg)
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    per_lr = {}
    with RunLock(layout.run_dir):
        for lr in cfg.compare.lr_grid:
            point = cfg.derive({"compare.reference_lr": lr, "compare.lr_grid": None})
            log.info("compare: lr %g (every method at beta %g)", lr, cfg.compare.reference_beta)
            comparison = Comparison(Pipeline(point), out_dir=layout.compare_dir / f"lr{lr_label(lr)}")
            per_lr[lr_label(lr)] = comparison.run_locked()
        return write_grouped_report(combined_dir(layout.compare_dir / "lr_grid", cfg), per_lr, "lr")
