"""Request/response schemas following OpenAI's, with limits that turn absurd input into 4xx."""

from __future__ import annotations

import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_TOKENS_LIMIT = 256
MAX_N = 8
MAX_PROMPT_CHARS = 8000


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
    seed: Optional[int] = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if isinstance(v, str):
            v = [v]
        if v is not None and (len(v) > 4 or any(not s or len(s) > 64 for s in v)):
            raise ValueError("stop takes at most 4 non-empty strings of at most 64 characters")
        return v


class CompletionRequest(_Req):
    prompt: Union[str, list[str]]

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        prompts = [v] if isinstance(v, str) else v
        if not prompts or len(prompts) > 16:
            raise ValueError("prompt must be a string or a list of 1-16 strings")
        for p in prompts:
            if not p.strip():
                raise ValueError("prompt must not be empty")
            if len(p) > MAX_PROMPT_CHARS:
                raise ValueError(f"prompt is {len(p)} characters; the limit is {MAX_PROMPT_CHARS}")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str = Field(..., max_length=MAX_PROMPT_CHARS)


class ChatCompletionRequest(_Req):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=32)


class SummarizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    document: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    max_tokens: int = Field(32, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(0.0, ge=0.0, le=2.0)

    @field_validator("document")
    @classmethod
    def _doc(cls, v):
        if not v.strip():
            raise ValueError("document must not be empty")
        return v


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion_response(model: str, texts: list[str], finish: list[str], prompt_tokens: int,
                        completion_tokens: int) -> dict:
    return {"id": _id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": t, "finish_reason": f, "logprobs": None}
                        for i, (t, f) in enumerate(zip(texts, finish))],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def chat_response(model: str, texts: list[str], finish: list[str], prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": _id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f}
                        for i, (t, f) in enumerate(zip(texts, finish))],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def chat_chunk(model: str, chunk_id: str, delta: dict, finish: Optional[str] = None) -> dict:
    return {"id": chunk_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def error_body(message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
