"""The Ray Serve deployment serving a policy folder over HTTP (OpenAI-compatible routes).

    serve run madpo_ray.serving.deployment:build_app model=runs/tiny/policy/madpo/model
    serve deploy serve_config.yaml          # replicas and autoscaling (madpo init writes the shipped one)
    madpo serve --model runs/tiny/policy/madpo/model

The routes and schemas live beside this module and do not import Ray; this module only adds
the deployment and how it drives each engine: vLLM's async engine takes every request as it
arrives (continuous batching inside the engine); the transformers engine is blocking, so its
calls run in threads and concurrent requests are grouped by dynamic batching (@serve.batch).
serve/app.py re-exports `build_app` under the older import path `serve.app:build_app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import AsyncIterator, Optional, Union

from fastapi import FastAPI
from ray import serve
from ray.serve.config import RequestRouterConfig

from madpo_ray.config import DEFAULT_PROMPT_TEMPLATE
from madpo_ray.serving.api import ServeSettings, create_app
from madpo_ray.serving.engine import (STREAM_ADMITTED, GenParams, GenResult, RequestCancelled, ServerBusy, StreamEnd,
                                      TransformersEngine)
from madpo_ray.serving.folders import parse_adapter_specs, resolve_adapters, resolve_model_folder, served_name
from madpo_ray.serving.vllm_engine import AsyncVLLMEngine, vllm_supports

log = logging.getLogger("madpo_ray.serve")


def prompt_template_for(model_dir: str) -> Optional[str]:
    """The prompt format the policy was trained with (madpo.json, written by the pipeline)."""
    meta = Path(model_dir) / "madpo.json"
    return json.loads(meta.read_text()).get("prompt_template") if meta.exists() else None


BACKENDS = ("auto", "vllm", "transformers")


VLLM_MAX_ONGOING_REQUESTS = 256  # per replica; the engine batches up to its max_num_seqs and queues the rest

# Serve's router (one per proxy) retries a request queued for a full replica after a backoff that
# grows from 25 ms to 0.5 s. Ray 2.60 keeps a routing task's grown backoff while it hands freed slots
# to the requests queued before its own, and with Serve's defaults a queue deeper than
# max_ongoing_requests drained at 4 requests a second per replica, the replica idle (its access log;
# bench/README.md, "router backoff"). With these, a routing task waits at most 50 ms between tries.
# A serve config that sets any request_router_config key replaces this whole object (test_k8s checks
# that the shipped ones set none).
ROUTER_BACKOFF = RequestRouterConfig(initial_backoff_s=0.01, max_backoff_s=0.05)


ADAPTERS_NEED_VLLM = ("serving LoRA adapters unmerged needs the vLLM backend; with transformers, serve the "
                      "merged model the stage saved beside its adapter (<stage>/model) instead")


def choose_backend(model: str, backend: str, adapters: bool = False) -> tuple[str, str]:
    """(engine, why): `auto` is vLLM when it is installed and can run the model, else transformers.
    With adapters to serve unmerged only vLLM will do."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "transformers":
        if adapters:
            raise ValueError(ADAPTERS_NEED_VLLM)
        return "transformers", "asked for"

    reason = vllm_supports(model)
    if reason is None:
        return "vllm", "async engine, continuous batching"
    if backend == "vllm" or adapters:
        raise ValueError(f"vLLM cannot serve {model}: {reason}" + (f"; {ADAPTERS_NEED_VLLM}" if adapters else ""))
    return "transformers", f"vLLM not used: {reason}"


def load_engine(model: str, backend: str, threads: int, adapters: Optional[dict[str, str]] = None):
    """vLLM is imported only when chosen: an install without it serves with transformers."""
    if backend == "vllm":
        return AsyncVLLMEngine(model, adapters=adapters)
    return TransformersEngine(model, threads=threads)


async def engine_health(engine, timeout_s: float) -> None:
    """Proof that the engine makes progress (unlike /healthz, which only shows that the event loop
    answers). The async engine: one greedy token through the path requests take. The blocking
    engine: a generation step taken within the timeout, or, when it is free, one greedy token;
    never a wait for its lock, which long generations hold, so heavy legal load does not get a
    healthy replica killed, while a stuck one (lock held, no step) still fails."""
    if getattr(engine, "asynchronous", False):
        try:
            await asyncio.wait_for(engine.generate("ok", GenParams(max_tokens=1)), timeout=timeout_s)
        except asyncio.TimeoutError:
            raise RuntimeError(f"engine produced no token in {timeout_s}s") from None
        return
    loop = asyncio.get_running_loop()
    steps, deadline = engine.steps, loop.time() + timeout_s
    while loop.time() < deadline:
        if engine.steps != steps or await asyncio.to_thread(engine.try_probe):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"engine produced no token in {timeout_s}s")


# `serve.ingress()` without an app defers the app to replica start: Serve calls
# `__serve_build_asgi_app__` after `__init__`, so each replica builds its own FastAPI app with
# itself as the backend, and no module state has to carry the backend to the routes.
# The queue is bounded: past max_ongoing + max_queued, Serve answers 503 with Retry-After instead
# of letting latency grow without limit. Serve calls check_health every 10 s; a replica whose
# engine cannot produce one token within the timeout is marked unhealthy and replaced.
# Requests past max_ongoing wait in the router of each proxy, which retries with a backoff
# (ROUTER_BACKOFF).
@serve.deployment(name="PolicyServer", max_ongoing_requests=64, max_queued_requests=256,
                  backpressure_config={"status_code": 503, "retry_after_s": 1}, request_router_config=ROUTER_BACKOFF,
                  health_check_period_s=10, health_check_timeout_s=30, ray_actor_options={"num_cpus": 1})
@serve.ingress()
class PolicyServer:
    def __init__(self, model: str, model_name: Optional[str] = None, threads: int = 1, batching: bool = True,
                 max_batch_size: int = 16, batch_wait_timeout_s: float = 0.01, request_timeout_s: float = 60.0,
                 max_body_bytes: int = 64 * 1024, api_key_env: str = "MADPO_API_KEY", backend: str = "auto",
                 api_key_file: Optional[str] = None, health_timeout_s: float = 20.0,
                 adapters: Optional[dict[str, str]] = None, max_streams: int = 4, **limits):
        logging.basicConfig(level=logging.INFO)
        backend, why = choose_backend(model, backend, adapters=bool(adapters))
        log.info("generation backend: %s (%s)", backend, why)
        adapters = adapters or {}  # resolved by build_app
        self.settings = ServeSettings(model_name=served_name(model, model_name), adapters=tuple(sorted(adapters)),
                                      api_key_env=api_key_env, api_key_file=api_key_file,
                                      max_body_bytes=max_body_bytes, request_timeout_s=request_timeout_s,
                                      prompt_template=prompt_template_for(model) or DEFAULT_PROMPT_TEMPLATE,
                                      **limits)  # require_key, body_timeout_s, body_grace_s, max_slow_bodies
        self.api_key = self.settings.resolve_api_key()  # fails the replica now if the key is misconfigured
        self.engine = load_engine(model, backend, threads, adapters)
        self.asynchronous = getattr(self.engine, "asynchronous", False)
        self.batching = batching and not self.asynchronous  # the async engine batches continuously itself
        self.health_timeout_s = health_timeout_s
        self.max_streams, self.open_streams = max_streams, 0  # streams at once on the blocking engine
        self.stream_pool = ThreadPoolExecutor(max_streams, thread_name_prefix="madpo-stream")
        self.generate_batch.set_max_batch_size(max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        log.info("serving %s with %s (batching=%s, max_batch_size=%d, auth=%s, LoRA adapters: %s)", model, backend,
                 self.batching, max_batch_size, "on" if self.api_key else "off",
                 ", ".join(f"{n}={p}" for n, p in adapters.items()) or "none")

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The replica's HTTP app, with this replica as its backend (called by Serve after __init__)."""
        return create_app(self, self.settings, api_key=self.api_key)

    async def check_health(self) -> None:
        """Serve calls this every health_check_period_s; raising marks the replica unhealthy."""
        await engine_health(self.engine, self.health_timeout_s)

    # ---- backend protocol used by the routes
    async def generate(self, prompt: str, params: GenParams) -> GenResult:
        if self.asynchronous:
            return await self.engine.generate(prompt, params)
        if not self.batching:
            [r] = await self.run_rows([(prompt, params)])
        else:
            r = await self.generate_batch((prompt, params))
        if isinstance(r, BaseException):
            raise r
        return r

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def generate_batch(self, items: list[tuple[str, GenParams]]) -> list:
        """Concurrent requests arrive here together. Each row gets its own result or its own
        exception (Serve hands an exception instance to that caller only), so a bad row never
        fails its neighbours; rows with equal sampling settings share a forward pass."""
        out: list = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, (prompt, p) in enumerate(items):
            if p.cancelled:
                out[i] = RequestCancelled("the caller went away before generation")
                continue
            try:
                self.engine.encode(prompt)
            except Exception as e:  # e.g. a chat over the context: this row's 400, nobody else's
                out[i] = e
                continue
            groups.setdefault(p.key(), []).append(i)
        for idx in groups.values():
            for i, r in zip(idx, await self.run_rows([items[i] for i in idx])):
                out[i] = r
        return out

    async def run_rows(self, rows: list[tuple[str, GenParams]]) -> list:
        """One engine call for the rows; if it fails, each row alone, so only the culprit fails."""
        try:
            return await asyncio.to_thread(self.engine.generate, [p for p, _ in rows], [g for _, g in rows])
        except Exception as e:
            if len(rows) == 1:
                return [e]
            log.warning("batch of %d failed (%s); retrying its rows one by one", len(rows), type(e).__name__)
            return [(await self.run_rows([row]))[0] for row in rows]

    async def stream(self, prompt: str, params: GenParams) -> AsyncIterator[Union[str, StreamEnd]]:
        """STREAM_ADMITTED, then the deltas of one request (then its StreamEnd), each awaited within
        what is left of the request timeout. The blocking engine streams on its own pool of
        `max_streams` threads; one more stream raises ServerBusy before its first item (the route
        answers 503 with Retry-After), so streams can neither queue without bound nor take the
        threads that batches and the health check need."""
        threaded = not self.asynchronous
        if threaded and self.open_streams >= self.max_streams:
            raise ServerBusy(f"this replica is already streaming {self.max_streams} answers; retry shortly")
        self.open_streams += threaded
        try:
            yield STREAM_ADMITTED
            source = self.threaded_stream if threaded else self.engine.stream
            deadline = asyncio.get_running_loop().time() + self.settings.request_timeout_s
            async with contextlib.aclosing(source(prompt, params)) as deltas:  # leaving early aborts the request
                while True:
                    left = max(0.0, deadline - asyncio.get_running_loop().time())
                    try:
                        yield await asyncio.wait_for(anext(deltas), timeout=left)
                    except StopAsyncIteration:
                        return
        finally:
            self.open_streams -= threaded

    def running_requests(self) -> int:
        """Requests inside the engine now (the async engine only; tests and benchmarks read it
        through the deployment handle to see that a client who left freed its slot)."""
        return self.engine.running_requests() if self.asynchronous else 0

    async def threaded_stream(self, prompt: str, params: GenParams) -> AsyncIterator[Union[str, StreamEnd]]:
        """The engine's blocking iterator runs in a thread; deltas, and any error, cross to the
        event loop by a queue. Leaving early (client disconnect, the timeout in `stream`) sets
        the cancel flag that stops the generation."""
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        params.cancel = params.cancel or threading.Event()
        done = object()

        def produce():
            try:
                for delta in self.engine.stream(prompt, params):
                    loop.call_soon_threadsafe(queue.put_nowait, delta)
                    if params.cancelled:
                        break
                loop.call_soon_threadsafe(queue.put_nowait, done)
            except BaseException as e:  # the waiting request gets it instead of waiting forever
                loop.call_soon_threadsafe(queue.put_nowait, e)

        task = loop.run_in_executor(self.stream_pool, produce)
        try:
            while True:
                item = await queue.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            params.cancel.set()
        await task

    def chat_prompt(self, messages: list[dict]) -> str:
        return self.engine.chat_prompt(messages)

    def prompt_tokens(self, prompt: str) -> int:
        """The prompt's length in tokens as the engine will read it (for the request budget)."""
        return len(self.engine.encode(prompt))

    def check_params(self, params: GenParams) -> None:
        """Refuse, before anything is queued or streamed, what the engine would silently not do."""
        check = getattr(self.engine, "check_params", None)
        if check is not None:
            check(params)


def build_app(args: dict) -> serve.Application:
    """Entry point for `serve run madpo_ray.serving.deployment:build_app model=...` and serve config files.

    Args arrive as strings from the command line and config files, hence the casts."""
    if "model" not in args:
        raise ValueError("build_app needs model=<policy folder>")
    kwargs = dict(args)
    for key, cast in (("threads", int), ("max_batch_size", int), ("batch_wait_timeout_s", float),
                      ("request_timeout_s", float), ("max_body_bytes", int), ("health_timeout_s", float),
                      ("body_timeout_s", float), ("body_grace_s", float), ("max_slow_bodies", int),
                      ("max_streams", int)):
        if key in kwargs:
            kwargs[key] = cast(kwargs[key])
    for key in ("batching", "require_key"):
        if key in kwargs:
            kwargs[key] = str(kwargs[key]).lower() not in ("0", "false", "no")
    # Replica options from args only when given (madpo serve); a serve config file sets its own.
    options = {}
    if "num_replicas" in kwargs:
        options["num_replicas"] = int(kwargs.pop("num_replicas"))
    if "num_cpus" in kwargs:
        options["ray_actor_options"] = {"num_cpus": float(kwargs.pop("num_cpus"))}
    for key in ("max_ongoing_requests", "max_queued_requests"):
        if key in kwargs:
            options[key] = int(kwargs.pop(key))
    if isinstance(kwargs.get("adapters"), str):  # `serve run ... adapters=tuned=DIR,other=DIR`
        kwargs["adapters"] = parse_adapter_specs([a for a in kwargs["adapters"].split(",") if a])
    if kwargs.get("adapters"):  # refused here, with the reason, rather than by a replica that keeps restarting
        base_name = served_name(kwargs["model"], kwargs.get("model_name"))
        kwargs["adapters"] = resolve_adapters(kwargs["adapters"], base_name, resolve_model_folder(kwargs["model"]))
    kwargs["backend"], _ = choose_backend(kwargs["model"], kwargs.get("backend", "auto"), bool(kwargs.get("adapters")))
    if kwargs["backend"] == "vllm":
        # vLLM's scheduler queues what it cannot run yet at no cost, and sooner than Serve's router
        # can hand it a freed slot (ROUTER_BACKOFF): let the engine hold the queue.
        options.setdefault("max_ongoing_requests", VLLM_MAX_ONGOING_REQUESTS)
    deployment = PolicyServer.options(**options) if options else PolicyServer
    return deployment.bind(**kwargs)
