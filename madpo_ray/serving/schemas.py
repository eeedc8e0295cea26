"""Request/response schemas following OpenAI's, with limits that turn absurd input into 4xx."""

from __future__ import annotations

import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_TOKENS_LIMIT = 256
MAX_N = 8
MAX_PROMPT_CHARS = 8000
MAX_PROMPTS = 16
# prompts x n x max_tokens: one request may not ask for more generated tokens than this, so a
# single client cannot hold a replica for minutes (16 prompts x 8 x 256 would be 32,768).
MAX_TOTAL_TOKENS = 2048
# n x (prompt tokens + max_tokens) summed over the prompts, counted after tokenising (api.check_request):
# 16 prompts x n=8 of a full 448-token context were ~57k prompt tokens under the generated-only budget.
MAX_REQUEST_TOKENS = 16384
# torch.manual_seed (and vLLM's generator) take a 64-bit seed; a larger one killed the generation thread.
MAX_SEED = 2**63 - 1


def check_text(value: str, field: str) -> str:
    """Strings must be encodable: a lone surrogate (valid in JSON escapes) crashes the tokenizer."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{field} is not valid Unicode text (lone surrogate)") from None
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False  # a last chunk with the request's token usage, as OpenAI's


class _Req(BaseModel):
    # OpenAI clients send fields we do not use (logprobs, user, ...): accept and ignore them.
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    max_tokens: int = Field(32, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    stream_options: Optional[StreamOptions] = None

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v, info):
        if v is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed with stream=true")
        return v

    def usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if isinstance(v, str):
            v = [v]
        if v is not None and (len(v) > 4 or any(not s or len(s) > 64 for s in v)):
            raise ValueError("stop takes at most 4 non-empty strings of at most 64 characters")
        return [check_text(s, "stop") for s in v] if v is not None else v

    def prompt_count(self) -> int:
        return 1

    @model_validator(mode="after")
    def _budget(self):
        """The total generation a request may ask for, checked before anything is queued."""
        total = self.prompt_count() * self.n * self.max_tokens
        if total > MAX_TOTAL_TOKENS:
            raise ValueError(f"prompts x n x max_tokens = {total} exceeds the per-request budget of "
                             f"{MAX_TOTAL_TOKENS} generated tokens")
        return self


class CompletionRequest(_Req):
    prompt: Union[str, list[str]]

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        prompts = [v] if isinstance(v, str) else v
        if not prompts or len(prompts) > MAX_PROMPTS:
            raise ValueError(f"prompt must be a string or a list of 1-{MAX_PROMPTS} strings")
        for p in prompts:
            check_text(p, "prompt")
            if not p.strip():
                raise ValueError("prompt must not be empty")
            if len(p) > MAX_PROMPT_CHARS:
                raise ValueError(f"prompt is {len(p)} characters; the limit is {MAX_PROMPT_CHARS}")
        return v

    def prompt_count(self) -> int:
        return 1 if isinstance(self.prompt, str) else len(self.prompt)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str = Field(..., max_length=MAX_PROMPT_CHARS)

    @field_validator("content")
    @classmethod
    def _content(cls, v):
        return check_text(v, "content")


class ChatCompletionRequest(_Req):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=32)


class SummarizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    document: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    model: Optional[str] = None  # a served adapter's name, as on the OpenAI routes
    max_tokens: int = Field(32, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(0.0, ge=0.0, le=2.0)

    @field_validator("document")
    @classmethod
    def _doc(cls, v):
        check_text(v, "document")
        if not v.strip():
            raise ValueError("document must not be empty")
        return v


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(model: str, texts: list[str], finish: list[str], prompt_tokens: int,
                        completion_tokens: int) -> dict:
    return {"id": _id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": t, "finish_reason": f, "logprobs": None}
                        for i, (t, f) in enumerate(zip(texts, finish))],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_response(model: str, texts: list[str], finish: list[str], prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": _id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f}
                        for i, (t, f) in enumerate(zip(texts, finish))],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(model: str, chunk_id: str, text: str, finish: Optional[str] = None) -> dict:
    return {"id": chunk_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


def chat_chunk(model: str, chunk_id: str, delta: dict, finish: Optional[str] = None) -> dict:
    return {"id": chunk_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def usage_chunk(model: str, chunk_id: str, kind: str, prompt_tokens: int, completion_tokens: int) -> dict:
    """The stream's last data chunk under `stream_options.include_usage`: no choices, the usage."""
    return {"id": chunk_id, "object": kind, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def error_body(message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
