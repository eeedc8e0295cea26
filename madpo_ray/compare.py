"""`madpo compare`: DPO, IPO, beta-DPO and MADPO from the same SFT model and scored pairs,
over several training seeds, judged at every decoding temperature. This module orchestrates;
training is `stages.policy.train_policy`, generation `eval.generate`, judging `eval.heldout`,
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
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from madpo_ray.config import MethodConfig, PipelineConfig, config_from_dict
from madpo_ray.eval.heldout import SFT_LABEL
from madpo_ray.layout import BEFORE_POLICY, StageRecord, begin_training, model_folder, settings_of

log = logging.getLogger("madpo_ray.compare")


def method_config(cfg: PipelineConfig, method: MethodConfig, seed: int) -> PipelineConfig:
    """The pipeline config of one (method, seed) training: the method's loss (keeping the base
    config's loss parameters it also takes), its overrides, and the seed."""
    raw = cfg.model_dump(mode="json")
    raw["policy"]["loss"] = cfg.policy.loss.switched_to(method.loss).model_dump()
    sets = [f"policy.optim.seed={seed}"]
    for key, value in method.overrides.items():
        path = key if key.startswith(("optim.", "loss.")) else f"loss.{key}"
        sets.append(f"policy.{path}={json.dumps(value)}")
    return config_from_dict(raw, sets)


def training_settings(cfg: PipelineConfig) -> dict:
    """What a finished training's DONE record must match to be reused."""
    return settings_of(cfg.model_dump(mode="json"), ("policy", "model.dtype", "model.lora"))


def train_method(base_config: dict, method: dict, seed: int, scored_train: str, sft_dir: str, out_dir: str,
                 upstream: Optional[str], threads: int = 1) -> dict:
    """One (method, seed) training in this process (the Ray task body), through `train_policy`.
    Resumable: checkpoints go under out_dir/checkpoints until the model is saved."""
    import torch

    from madpo_ray.data.scored import load_policy_examples
    from madpo_ray.engine.sessions import LocalSession
    from madpo_ray.io import write_json
    from madpo_ray.stages.policy import train_policy
    from madpo_ray.stages.worker import StageOutput, quiet_libraries

    quiet_libraries()
    torch.set_num_threads(max(1, threads))
    m = MethodConfig.model_validate(method)
    cfg = method_config(PipelineConfig.model_validate(base_config), m, seed)
    out = Path(out_dir)
    session = LocalSession({"train": load_policy_examples(scored_train, cfg.policy.loss.name)},
                           checkpoint_root=str(out / "checkpoints"))
    t0 = time.time()
    result = train_policy(cfg, session, model_dir=sft_dir, out=StageOutput(model_folder(out), out / "train_metrics.json"),
                          label=f"compare/{m.name}/seed{seed}")
    # result.metrics carries the final training "loss"; the settings live under "policy".
    metrics = {**result.metrics, "method": m.name, "seed": seed, "policy": cfg.policy.model_dump(mode="json"),
               "steps": result.steps, "seconds": time.time() - t0, "loss_history": result.loss_history}
    write_json(out / "metrics.json", metrics)
    StageRecord.write(out, training_settings(cfg), upstream)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return metrics


class Comparison:
    def __init__(self, pipeline):
        self.p = pipeline
        self.cfg: PipelineConfig = pipeline.cfg
        self.layout = pipeline.layout

    def models(self) -> list[tuple[str, int, Path]]:
        """(method, seed, model folder) of everything judged; the SFT policy is seed -1."""
        c = self.cfg.compare
        return [(SFT_LABEL, -1, self.layout.model_dir("sft"))] + [
            (m.name, s, model_folder(self.layout.training_dir(m.name, s))) for m in c.methods for s in c.seeds]

    def finished(self, method: MethodConfig, seed: int, upstream: Optional[str]) -> Optional[dict]:
        """The metrics of a training that can be reused, else None (and its stale folder removed)."""
        d = self.layout.training_dir(method.name, seed)
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

        from madpo_ray.runtime import init_ray, worker_env

        c, lay = self.cfg.compare, self.layout
        upstream = lay.record("score").record_id
        todo, done = [], {}
        for m in c.methods:
            for seed in c.seeds:
                previous = self.finished(m, seed, upstream)
                if previous is not None:
                    done[(m.name, seed)] = previous
                else:
                    d = lay.training_dir(m.name, seed)
                    begin_training(d, d / "checkpoints", training_settings(method_config(self.cfg, m, seed)), upstream)
                    todo.append(((m.name, seed), (self.cfg.model_dump(mode="json"), m.model_dump(), seed,
                                                  str(lay.scored_path("train")), str(lay.model_dir("sft")),
                                                  str(lay.training_dir(m.name, seed)), upstream)))
        log.info("compare: %d trainings (%d already done)", len(todo) + len(done), len(done))
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
        from madpo_ray.runlock import RunLock

        self.layout.run_dir.mkdir(parents=True, exist_ok=True)
        with RunLock(self.layout.run_dir):
            return self.run_locked()

    def run_locked(self) -> dict:
        from madpo_ray.eval.generate import generate_for_models
        from madpo_ray.eval.heldout import eval_prompts, judge_rows
        from madpo_ray.eval.report import write_report

        t0 = time.time()
        self.p.run(BEFORE_POLICY)
        self.layout.compare_dir.mkdir(parents=True, exist_ok=True)
        (self.layout.compare_dir / "config.yaml").write_text(self.cfg.to_yaml())
        t_train = time.time()
        trainings = self.train_all()
        t_gen = time.time()
        ids, prompts, _ = eval_prompts(self.cfg, self.layout)
        rows, generation = generate_for_models(self.cfg, self.models(), ids, prompts,
                                               self.layout.compare_dir / "generations")
        t_judge = time.time()
        judged = judge_rows(self.cfg, self.layout, rows, [m.name for m in self.cfg.compare.methods])
        return write_report(self.cfg, self.layout.compare_dir, judged, prompts=len(ids),
                            seeds=self.cfg.compare.seeds, methods=[m.model_dump() for m in self.cfg.compare.methods],
                            trainings=trainings, generation=generation,
                            seconds={"pipeline": t_train - t0, "train": t_gen - t_train, "generate": t_judge - t_gen,
                                     "judge": time.time() - t_judge, "total": time.time() - t0})
