"""FastAPI routes: /v1/completions and /v1/chat/completions (both with SSE streaming), /v1/models, /healthz,
/v1/summarize. Every bad request gets a 4xx with an OpenAI-style error body; nothing a client
sends can produce a stack trace or stop the server.

The routes call a *backend* handed to `create_app` and kept on the app (`app.state`), so two
apps in one process never share one: in production the backend is the Ray Serve replica
(madpo_ray/serving/deployment.py), which batches concurrent requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import AsyncIterator, Callable, Optional, Protocol, Union

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from madpo_ray.config import DEFAULT_PROMPT_TEMPLATE
from madpo_ray.data.chat import ClientInputError, NoChatTemplate
from madpo_ray.serving.engine import GenParams, GenResult, RequestCancelled, ServerBusy, StreamAdmitted, StreamEnd
from madpo_ray.serving.schemas import (MAX_REQUEST_TOKENS, ChatCompletionRequest, CompletionRequest, SummarizeRequest,
                                       chat_chunk, chat_response, completion_chunk, completion_response, error_body,
                                       usage_chunk)
from madpo_ray.serving.streaming import coalesce

log = logging.getLogger("madpo_ray.serve")


API_KEY_FILE_ENV = "MADPO_API_KEY_FILE"


class ApiKeyError(RuntimeError):
    """The API key is configured but unusable (empty variable, missing or empty file): refuse to
    serve rather than silently serving without authentication."""


REQUIRE_KEY_ENV = "MADPO_REQUIRE_KEY"  # "1" on a replica: no key found is an error, not "auth off"


@dataclass
class ServeSettings:
    model_name: str = "madpo-policy"
    adapters: tuple[str, ...] = ()  # LoRA adapters served beside the base, unmerged; `model` picks one
    api_key_env: str = "MADPO_API_KEY"  # when this variable is set, requests need `Authorization: Bearer <it>`
    max_body_bytes: int = 64 * 1024
    request_timeout_s: float = 60.0
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE  # the trained policy's own comes from its madpo.json
    api_key_file: Optional[str] = None  # or $MADPO_API_KEY_FILE: a file (e.g. a mounted Secret) holding the key
    # Told by whoever deploys (madpo serve for a public bind, the shipped serving/config.yaml): a replica that
    # finds no key then refuses to start instead of serving openly. Or $MADPO_REQUIRE_KEY=1.
    require_key: bool = False
    body_timeout_s: float = 10.0  # the whole body must arrive within this (else 408)
    body_grace_s: float = 1.0  # a body still arriving after this needs one of the slow-body slots
    max_slow_bodies: int = 8  # per replica: past it, 503 with Retry-After (max_ongoing_requests is 64)
    # Streamed events ready within this many ms (up to stream_coalesce_events of them) leave the
    # replica as one write: one Ray object through Serve's proxy instead of one per token. 0: off.
    stream_coalesce_ms: float = 5.0
    stream_coalesce_events: int = 16

    def key_required(self) -> bool:
        return self.require_key or os.environ.get(REQUIRE_KEY_ENV, "").strip().lower() in ("1", "true", "yes")

    def resolve_api_key(self) -> Optional[str]:
        """The key from a file (preferred: never in an environment dump) or the variable; None
        only when neither is set and no key is required. Set-but-empty is an error, not "auth off"."""
        path = self.api_key_file or os.environ.get(API_KEY_FILE_ENV)
        if path:
            try:
                key = Path(path).read_text().strip()
            except OSError as e:
                raise ApiKeyError(f"cannot read the API key file {path}: {e.strerror}") from None
            if not key:
                raise ApiKeyError(f"the API key file {path} is empty")
            return key
        if self.api_key_env in os.environ:
            key = os.environ[self.api_key_env].strip()
            if not key:
                raise ApiKeyError(f"${self.api_key_env} is set but empty; unset it to serve without a key")
            return key
        if self.key_required():
            raise ApiKeyError(f"this replica must require an API key but finds none: set {API_KEY_FILE_ENV} "
                              f"(a file holding the key) or ${self.api_key_env} in the replica's environment")
        return None


def key_matches(header: str, key: str) -> bool:
    """`Bearer <key>`, the scheme in any case (RFC 9110: schemes are case-insensitive). The key is
    compared in constant time: response timing does not reveal how much of a guess was right."""
    scheme, _, token = header.strip().partition(" ")
    same = hmac.compare_digest(token.strip().encode("utf-8", "replace"), key.encode("utf-8"))
    return same and scheme.lower() == "bearer"


class Backend(Protocol):
    async def generate(self, prompt: str, params: GenParams) -> GenResult: ...

    def stream(self, prompt: str, params: GenParams) -> AsyncIterator[Union[str, StreamEnd]]:
        """Text deltas, then one StreamEnd (why it ended, token counts)."""

    def chat_prompt(self, messages: list[dict]) -> str: ...

    # Optional: `prompt_tokens(prompt) -> int` (the request budget counts prompts after tokenising)
    # and `check_params(params)` (raises ClientInputError for what the engine cannot do).


def backend_of(request: Request) -> Backend:
    """The backend of the app serving this request (given to `create_app`)."""
    backend = request.app.state.backend
    if backend is None:
        raise RuntimeError("this app was created without a backend: create_app(backend, settings)")
    return backend


def settings_of(request: Request) -> ServeSettings:
    """The settings of the app serving this request (given to `create_app`)."""
    return request.app.state.settings


def _error(status: int, message: str, kind: str = "invalid_request_error", param: Optional[str] = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(message, kind, param))


BODY_METHODS = ("POST", "PUT", "PATCH")


class SlowBodies:
    """Per-replica count of requests still sending their body after the grace period, capped:
    a few slow uploads are served, a crowd of them cannot hold every request slot."""

    def __init__(self, cap: int):
        self.cap, self.taken = cap, 0

    def take(self) -> bool:
        if self.taken >= self.cap:
            return False
        self.taken += 1
        return True

    def give(self) -> None:
        self.taken -= 1


class RequestGate:
    """Every request passes here before any route, in this order: the key (headers only, so a
    client without one is answered 401 before a byte of its body is read), the declared size,
    then the body itself, under a total deadline (408) and, once it is slow, a per-replica cap
    on slow bodies (503). A body over the limit is 413 before the app parses it.

    Plain ASGI rather than `@app.middleware("http")`: Starlette's BaseHTTPMiddleware relays every
    streamed chunk through an extra task and memory stream, and behind it a client that left
    mid-stream was sometimes not noticed until the answer had been generated to its end (1 of 3
    runs of tests/serving/test_serve_vllm.py's disconnect test; 0 of 7 without it)."""

    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings = self.state.settings
        refusal = refusal_on_headers(scope, self.state.api_key, settings.max_body_bytes)
        if refusal is None and scope.get("method") in BODY_METHODS:
            body, refusal = await read_body(receive, settings, self.state.slow_bodies)
            if body is None and refusal is None:
                return None  # the client left while sending: nobody to answer
            receive = replay(body, receive)
        if refusal is not None:
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)


def refusal_on_headers(scope, key: Optional[str], limit: int) -> Optional[JSONResponse]:
    """401 without the key (on every route but /healthz), 413 for a declared size over the limit:
    decided on the headers alone."""
    headers = dict(scope.get("headers") or [])
    path, root = scope.get("path", ""), scope.get("root_path", "")
    relative = path[len(root):] if root and path.startswith(root) else path
    if key and relative != "/healthz" and not key_matches(headers.get(b"authorization", b"").decode("latin-1"), key):
        resp = _error(401, "missing or invalid API key (Authorization: Bearer <key>)", "authentication_error")
        resp.headers["WWW-Authenticate"] = 'Bearer realm="madpo"'
        return resp
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return _error(413, f"request body exceeds {limit} bytes", "request_too_large")
    return None


async def collect(receive, limit: int, chunks: list[bytes]) -> str:
    """Body messages into `chunks` until the last one: "ok", "too_big" or "gone" (a disconnect)."""
    size = 0
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            return "gone"
        chunks.append(msg.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            return "too_big"
        if not msg.get("more_body"):
            return "ok"


async def read_body(receive, settings: ServeSettings, slow: SlowBodies) -> tuple[Optional[bytes], Optional[JSONResponse]]:
    """(body, None), or (None, the refusal), or (None, None) when the client left. A body still
    arriving after the grace period takes a slow-body slot (none free: 503 with Retry-After) and
    must be complete by `body_timeout_s` in all (else 408): a client that trickles its body
    holds a request slot for seconds, not for as long as it likes."""
    chunks: list[bytes] = []
    reader = asyncio.ensure_future(collect(receive, settings.max_body_bytes, chunks))
    try:
        done, _ = await asyncio.wait({reader}, timeout=settings.body_grace_s)
        if not done:
            if not slow.take():
                resp = _error(503, "too many requests are still sending their body; retry shortly", "overloaded")
                resp.headers["Retry-After"] = "1"
                return None, resp
            try:
                done, _ = await asyncio.wait({reader}, timeout=max(0.0, settings.body_timeout_s - settings.body_grace_s))
            finally:
                slow.give()
            if not done:
                return None, _error(408, f"the request body did not arrive within {settings.body_timeout_s:g}s",
                                    "timeout")
        outcome = reader.result()
    finally:
        reader.cancel()  # a no-op once it is done; otherwise stops waiting on the client
    if outcome == "too_big":
        return None, _error(413, f"request body exceeds {settings.max_body_bytes} bytes", "request_too_large")
    return (b"".join(chunks), None) if outcome == "ok" else (None, None)


def replay(body: bytes, receive):
    """A receive that gives the body read by the gate once, then the connection's own messages
    (a disconnect while the answer streams)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _validation_message(exc: RequestValidationError) -> tuple[str, Optional[str]]:
    errs = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errs):
        return "malformed JSON body", None
    parts, param = [], None
    for e in errs[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        field = ".".join(loc) or "body"
        param = param or field
        parts.append(f"{field}: {e.get('msg')}")
    return "; ".join(parts), param


def create_app(backend: Optional[Backend] = None, settings: Optional[ServeSettings] = None,
               api_key: Optional[str] = None) -> FastAPI:
    """The HTTP app around one backend. Backend, settings and the key (resolved once, here)
    live on `app.state`, where the routes, the error handlers and the middleware read them."""
    app = FastAPI(title="madpo-ray policy server", version="0.1.0",
                  description="OpenAI-compatible completions from a MADPO-trained policy.")
    app.state.backend, app.state.settings = backend, settings or ServeSettings()
    app.state.api_key = api_key if api_key is not None else app.state.settings.resolve_api_key()
    app.state.slow_bodies = SlowBodies(app.state.settings.max_slow_bodies)
    _add_error_handlers(app)
    app.add_middleware(RequestGate, state=app.state)
    app.include_router(router)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every failure leaves as an OpenAI-style error body; internals never reach the client."""

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return _error(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        # e.g. a body that is not decodable at all (found by tests/test_fuzz.py): same error shape
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _error(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(ClientInputError)
    async def on_client_input(request: Request, exc: ClientInputError):
        return _error(400, str(exc), param=exc.param)

    @app.exception_handler(NoChatTemplate)
    async def on_no_template(request: Request, exc: NoChatTemplate):
        return _error(501, str(exc), "not_implemented", param=exc.param)

    @app.exception_handler(ServerBusy)
    async def on_busy(request: Request, exc: ServerBusy):
        resp = _error(503, str(exc), "overloaded")
        resp.headers["Retry-After"] = "1"
        return resp

    @app.exception_handler(RequestCancelled)
    async def on_cancelled(request: Request, exc: RequestCancelled):
        return _error(499, str(exc), "request_cancelled")

    @app.exception_handler(UnknownModel)
    async def on_unknown_model(request: Request, exc: UnknownModel):
        return _error(404, str(exc), param="model")

    @app.exception_handler(asyncio.TimeoutError)
    async def on_timeout(request: Request, exc: asyncio.TimeoutError):
        return _error(504, f"generation took longer than {settings_of(request).request_timeout_s}s", "timeout")

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception):  # a server bug: say so, without internals
        log.exception("unhandled error on %s", request.url.path)
        return _error(500, "internal error while generating; the server keeps running", "server_error")


# The routes are the same for every app; what differs (backend, settings) comes from request.app.state.
router = APIRouter()


async def _run(request: Request, prompts: list[str], params: GenParams, n: int) -> list[GenResult]:
    """n samples of each prompt, concurrently (the backend batches them), under the request timeout.

    Every call gets its own GenParams (nothing shared across requests), its sample index (seeded
    samples of one request differ by it) and one cancel flag: when the request times out, is
    cancelled by a disconnect, or one sample fails, the flag stops the rest of its generation
    instead of letting it run on unseen. Greedy samples are all the same answer: computed once."""
    backend = backend_of(request)
    cancel = threading.Event()
    copies = 1 if params.greedy else n
    calls = [backend.generate(p, replace(params, cancel=cancel, sample=k)) for p in prompts for k in range(copies)]
    try:
        results = await asyncio.wait_for(asyncio.gather(*calls), timeout=settings_of(request).request_timeout_s)
    finally:
        cancel.set()
    return [r for r in results for _ in range(n // copies)]


def check_request(backend: Backend, prompts: list[str], params: GenParams, n: int) -> None:
    """What the engine cannot do, and the request's budget of prompt plus generated tokens, counted
    after tokenising and before anything is queued: every sample of a prompt reads the prompt again,
    so a few long prompts with a large n cost far more than their generated tokens say."""
    check = getattr(backend, "check_params", None)
    if check is not None:
        check(params)
    count = getattr(backend, "prompt_tokens", None)
    if count is None:
        return
    total = n * sum(count(p) + params.max_tokens for p in prompts)
    if total > MAX_REQUEST_TOKENS:
        raise ClientInputError(f"n x (prompt tokens + max_tokens), summed over prompts, is {total}: over the "
                               f"per-request budget of {MAX_REQUEST_TOKENS} tokens", param="prompt")


def _params(req) -> GenParams:
    return GenParams(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                     stop=list(req.stop) if req.stop else None, seed=req.seed)


@router.get("/healthz")
async def healthz(request: Request):
    return {"status": "ok", "model": settings_of(request).model_name}


@router.get("/v1/models")
async def models(request: Request):
    settings, now = settings_of(request), int(time.time())
    base = {"id": settings.model_name, "object": "model", "created": now, "owned_by": "madpo-ray"}
    return {"object": "list", "data": [base] + [{**base, "id": name, "parent": settings.model_name}
                                                 for name in settings.adapters]}


class UnknownModel(ValueError):
    """The request names a model this server does not serve (only when it serves adapters)."""


def served_model(request: Request, asked: Optional[str], params: GenParams) -> str:
    """The name answered under. `model` naming an adapter sets it on the request's params; a server
    of one model answers to any name (as before adapters), one with adapters refuses unknown names
    rather than silently answering a typo with the base model."""
    settings = settings_of(request)
    if asked in settings.adapters:
        params.adapter = asked
        return asked
    if settings.adapters and asked not in (None, settings.model_name):
        served = ", ".join((settings.model_name,) + settings.adapters)
        raise UnknownModel(f"model {asked!r} is not served here; the models are: {served}")
    return settings.model_name


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    params = _params(req)
    name = served_model(request, req.model, params)
    check_request(backend_of(request), prompts, params, req.n)
    if req.stream:
        if req.n != 1 or len(prompts) != 1:
            return _error(400, "stream supports one prompt with n=1", param="stream")
        chunk_id = f"cmpl-{uuid.uuid4().hex[:24]}"
        events = _events(await open_stream(backend_of(request), prompts[0], params),
                         lambda text, finish: completion_chunk(name, chunk_id, text or "", finish),
                         usage_of=_usage_of(req, name, chunk_id, "text_completion"))
        return streaming_response(request, events, immediate=1)
    results = await _run(request, prompts, params, req.n)
    return completion_response(name, [r.text for r in results],
                               [r.finish_reason for r in results], sum(r.prompt_tokens for r in results[::req.n]),
                               sum(r.completion_tokens for r in results))


@router.post("/v1/chat/completions")
async def chat(req: ChatCompletionRequest, request: Request):
    params = _params(req)
    name = served_model(request, req.model, params)  # an unknown model is a 404 before the chat is rendered
    backend = backend_of(request)
    prompt = backend.chat_prompt([m.model_dump() for m in req.messages])
    check_request(backend, [prompt], params, req.n)
    if req.stream:
        if req.n != 1:
            return _error(400, "stream supports n=1 only", param="n")
        chunk_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        events = _events(await open_stream(backend, prompt, params),
                         lambda text, finish: chat_chunk(name, chunk_id, {} if text is None else {"content": text}, finish),
                         opening=chat_chunk(name, chunk_id, {"role": "assistant", "content": ""}),
                         usage_of=_usage_of(req, name, chunk_id, "chat.completion.chunk"))
        return streaming_response(request, events, immediate=2)  # the role chunk and the first token
    results = await _run(request, [prompt], params, req.n)
    return chat_response(name, [r.text for r in results], [r.finish_reason for r in results],
                         results[0].prompt_tokens, sum(r.completion_tokens for r in results))


def streaming_response(request: Request, events: AsyncIterator[str], immediate: int) -> StreamingResponse:
    """Server-sent events, the first `immediate` at once and the rest coalesced (serving/streaming.py)."""
    s = settings_of(request)
    return StreamingResponse(coalesce(events, s.stream_coalesce_ms / 1000, s.stream_coalesce_events, immediate),
                             media_type="text/event-stream")


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


def _usage_of(req, name: str, chunk_id: str, kind: str) -> Optional[Callable[[StreamEnd], dict]]:
    """The maker of the stream's usage chunk when the request asked for one, else None."""
    if not req.usage_in_stream():
        return None
    return lambda end: usage_chunk(name, chunk_id, kind, end.prompt_tokens, end.completion_tokens)


async def open_stream(backend: Backend, prompt: str, params: GenParams) -> tuple[AsyncIterator, list]:
    """The backend's stream with its first item read, before the route answers 200: a refusal there
    (a replica at its stream limit) is then a proper status code. Returns the stream and the items
    read that are deltas (none when the first was the replica's StreamAdmitted). A stream left
    unread is closed when it is collected, which frees its place."""
    deltas = backend.stream(prompt, params)
    try:
        first = await anext(deltas)
    except StopAsyncIteration:
        return deltas, []
    return deltas, [] if isinstance(first, StreamAdmitted) else [first]  # by type: Serve pickles the replica's globals


async def _events(opened: tuple[AsyncIterator, list], chunk, opening: Optional[dict] = None,
                  usage_of: Optional[Callable[[StreamEnd], dict]] = None) -> AsyncIterator[str]:
    """Server-sent events: `chunk(text, finish_reason)` frames each delta and the closing chunk
    in the route's format; the backend's StreamEnd gives the closing chunk's finish_reason and
    the usage chunk. Once the stream has started, a failure can only be reported in-band, and
    the server keeps serving."""
    if opening:
        yield _sse(opening)
    end = None
    try:
        async with contextlib.aclosing(opened[0]) as deltas:  # leaving early ends generation
            async for delta in with_first(opened[1], deltas):
                if isinstance(delta, StreamEnd):
                    end = delta
                else:
                    yield _sse(chunk(delta, None))
        yield _sse(chunk(None, end.finish_reason if end else "stop"))  # "stop": a backend without a StreamEnd
        if usage_of and end:
            yield _sse(usage_of(end))
    except Exception:
        log.exception("stream failed")
        yield _sse(error_body("generation failed", "server_error"))
    yield "data: [DONE]\n\n"


async def with_first(first: list, rest: AsyncIterator) -> AsyncIterator:
    for item in first:
        yield item
    async for item in rest:
        yield item


@router.post("/v1/summarize")
async def summarize(req: SummarizeRequest, request: Request):
    params = GenParams(max_tokens=req.max_tokens, temperature=req.temperature)
    name = served_model(request, req.model, params)
    prompt = settings_of(request).prompt_template.format(document=req.document)
    check_request(backend_of(request), [prompt], params, 1)
    [result] = await _run(request, [prompt], params, 1)
    return {"summary": result.text.strip(), "finish_reason": result.finish_reason, "model": name}
