"""A batched transformers generation engine for serving (the vLLM engine plugs in beside it)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from madpo_ray.data.collate import encode_prompt


@dataclass
class GenParams:
    max_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    stop: Optional[list[str]] = None
    seed: Optional[int] = None

    def key(self) -> tuple:
        """Requests sharing this key can go through one `generate` call."""
        return (self.max_tokens, self.temperature, self.top_p)


@dataclass
class GenResult:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


def apply_stop(text: str, stop: Optional[list[str]]) -> tuple[str, bool]:
    if not stop:
        return text, False
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class TransformersEngine:
    def __init__(self, model_dir: str, threads: int = 1, max_prompt_tokens: int = 448):
        from madpo_ray.models import load_causal_lm, load_tokenizer

        torch.set_num_threads(threads)
        self.model_dir = model_dir
        self.tokenizer = load_tokenizer(model_dir)
        self.model = load_causal_lm(model_dir).eval()
        self.max_prompt_tokens = max_prompt_tokens
        self.lock = threading.Lock()  # one generate at a time per replica; batching does the rest

    def encode(self, prompt: str) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)[-self.max_prompt_tokens:]

    def chat_prompt(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _kwargs(self, p: GenParams) -> dict:
        kw = dict(max_new_tokens=p.max_tokens, pad_token_id=self.tokenizer.pad_token_id,
                  eos_token_id=self.tokenizer.eos_token_id, do_sample=p.temperature > 0)
        if p.temperature > 0:
            kw.update(temperature=p.temperature, top_p=p.top_p, top_k=0)
        return kw

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], params: GenParams) -> list[GenResult]:
        """One padded batch for prompts sharing the same sampling parameters."""
        ids = [self.encode(p) for p in prompts]
        width = max(map(len, ids))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        attn = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        with self.lock:
            if params.seed is not None:
                torch.manual_seed(params.seed)
            out = self.model.generate(input_ids=input_ids, attention_mask=attn, **self._kwargs(params))
        results = []
        eos = self.tokenizer.eos_token_id
        for row, x in zip(out[:, width:], ids):
            toks = row.tolist()
            ended = eos in toks
            toks = toks[:toks.index(eos)] if ended else [t for t in toks if t != pad]
            text, stopped = apply_stop(self.tokenizer.decode(toks, skip_special_tokens=True), params.stop)
            results.append(GenResult(text, "stop" if ended or stopped else "length", len(x), len(toks)))
        return results

    def stream(self, prompt: str, params: GenParams) -> Iterator[str]:
        """Text deltas as they are generated (TextIteratorStreamer in a worker thread)."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        ids = torch.tensor([self.encode(prompt)])

        def run():
            with torch.no_grad(), self.lock:
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                                    **self._kwargs(params))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        sent = ""
        for piece in streamer:
            candidate, stopped = apply_stop(sent + piece, params.stop)
            if candidate[len(sent):]:
                yield candidate[len(sent):]
            sent = candidate
            if stopped:
                break
        thread.join(timeout=60)
