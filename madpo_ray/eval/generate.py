"""Batch generation for `madpo compare` and `madpo eval`: every model of a comparison sampled at
every temperature in one generation engine (`madpo_ray.generation`), held by a Ray actor, each
model's rows cached in a parquet while the settings and weights match.

Rows: model, prompt_id, temperature, sample, text, num_tokens. Temperature 0 is greedy and drawn
once per prompt; every other temperature n times.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

from madpo_ray.console import quiet_libraries
from madpo_ray.generation import SampleSpec, make_generator, read_generations, sample_model, write_generations
from madpo_ray.io import write_json
from madpo_ray.runtime import init_ray, largest_node_cpus, worker_env

log = logging.getLogger("madpo_ray.generate")


class GenerationActor:
    """One generation engine in a Ray actor; `ray.remote(GenerationActor)` in the driver.

    Keeping the engine in an actor isolates vLLM's processes from the driver, and lets a
    cluster place it on a GPU node (`num_gpus=1`) while the driver stays on the head."""

    def __init__(self, backend: str = "auto", **kwargs):
        quiet_libraries()
        kwargs.setdefault("threads", max(1, os.cpu_count() or 1))  # the actor holds its node's cores
        self.generator = make_generator(backend, many_models=True, **kwargs)

    def backend(self) -> str:
        return self.generator.name

    def sample_model(self, model_dir: str, label: str, prompt_ids: list, prompts: list, spec: SampleSpec):
        return sample_model(self.generator, model_dir, label, prompt_ids, prompts, spec)


def generate_for_models(cfg, models: list[tuple[str, int, Path]], ids: list[str], prompts: list[str],
                        out_dir: Path, draws_multiplier: Optional[dict[str, int]] = None) -> tuple[list[dict], list[dict]]:
    """Samples of every (label, seed, folder) at every temperature in one generation actor;
    each model's cached in its own parquet, reused while the settings and weights match.

    draws_multiplier: label -> how many times `eval.samples_per_prompt` that model draws at
    temperature > 0. `madpo compare` gives the SFT policy one set per training seed, so its
    per-prompt mean averages as many draws as a method's seeds together and the SFT side of a
    paired difference is no noisier than the method's."""
    base = SampleSpec.from_config(cfg)
    spec = {m: replace(base, samples_per_prompt=base.samples_per_prompt * (draws_multiplier or {}).get(m, 1))
            for m, _, _ in models}
    path = {(m, s): Path(out_dir) / f"{m}__seed{s}.parquet" for m, s, _ in models}
    prompts_digest = hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()

    def cache_key(m: str, model_dir: Path) -> dict:
        """What a cached parquet must match: the sampling settings, the prompts (ids and text: a
        user dataset's ids are p0..pN in every split), the weights' mtime."""
        weights = sorted(Path(model_dir).glob("*.safetensors"))
        return {"spec": asdict(spec[m]), "prompt_ids": ids, "prompts_sha256": prompts_digest,
                "backend": cfg.eval.backend, "weights_mtime": [w.stat().st_mtime for w in weights]}

    def cached(m, s, d) -> bool:
        key_file = path[(m, s)].with_suffix(".key.json")
        return path[(m, s)].exists() and key_file.exists() and json.loads(key_file.read_text()) == json.loads(
            json.dumps(cache_key(m, d)))

    todo = [(m, s, d) for m, s, d in models if not cached(m, s, d)]
    timings = []
    if todo:
        actor, call = generation_actor(cfg)
        backend = call(actor.backend)
        log.info("generating %d models x %d prompts at temperatures %s (%d samples each above 0) with %s",
                 len(todo), len(ids), list(base.temperatures), base.samples_per_prompt, backend)
        for m, s, d in todo:
            rows, t = call(actor.sample_model, str(d), m, ids, prompts, spec[m])
            write_generations(rows, path[(m, s)])
            write_json(path[(m, s)].with_suffix(".key.json"), cache_key(m, d))
            timings.append(t)
            log.info("  %s%s: %d completions, %.0f tok/s, load %.1fs (%s)", m, "" if s < 0 else f" seed {s}",
                     len(rows), t["tokens_per_s"], t["load_seconds"], backend)
        if cfg.ray.backend == "ray":  # free its CPUs now, not when the handle is collected
            import ray

            ray.kill(actor)
    rows = []
    for m, s, _ in models:
        for r in read_generations(path[(m, s)]):
            r.update(method=m, seed=s)
            rows.append(r)
    return rows, timings


def generation_actor(cfg):
    """(generator, call): a Ray actor holding one engine, or (ray.backend=local) the same class in
    this process; `call(method, *args)` runs a method of either and returns its result."""
    if cfg.ray.backend == "local":
        return GenerationActor(cfg.eval.backend, seed=cfg.eval.seed), lambda method, *args: method(*args)
    import ray

    init_ray(cfg.ray)
    # The engine binds every core of its node; hold that many CPUs (one node's worth: more, e.g.
    # the whole cluster's, can never be placed and the actor would wait forever; or
    # eval.generation_cpus), or one GPU on a GPU cluster.
    cpus = cfg.eval.generation_cpus or min(largest_node_cpus(), float(os.cpu_count() or 1))
    actor = ray.remote(GenerationActor).options(num_cpus=max(1.0, cpus), num_gpus=1 if cfg.ray.use_gpu else 0,
                                                runtime_env={"env_vars": worker_env()}).remote(
        cfg.eval.backend, seed=cfg.eval.seed)
    return actor, lambda method, *args: ray.get(method.remote(*args))
