"""The Ray Serve deployment serving a policy folder over HTTP (OpenAI-compatible routes).

    serve run serve.app:build_app model=runs/tiny/policy/madpo/model
    serve deploy serve/config.yaml          # replicas and autoscaling from the config file
    madpo serve --model runs/tiny/policy/madpo/model

The routes and schemas live beside this module and do not import Ray; this module only adds
the deployment, dynamic batching (@serve.batch) and threading of the blocking model calls.
serve/app.py re-exports `build_app` so the import path in serve config files stays the same.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import AsyncIterator, Optional

from fastapi import FastAPI
from ray import serve

from madpo_ray.config import DEFAULT_PROMPT_TEMPLATE
from madpo_ray.serving.api import ServeSettings, create_app
from madpo_ray.serving.engine import GenParams, GenResult, TransformersEngine, apply_stop

log = logging.getLogger("madpo_ray.serve")


def prompt_template_for(model_dir: str) -> Optional[str]:
    """The prompt format the policy was trained with (madpo.json, written by the pipeline)."""
    meta = Path(model_dir) / "madpo.json"
    return json.loads(meta.read_text()).get("prompt_template") if meta.exists() else None


def load_engine(model: str, backend: str, threads: int):
    """vLLM is imported only when asked for: most installs (and CI) have only transformers."""
    if backend == "vllm":
        from madpo_ray.serving.vllm_engine import VLLMEngine

        return VLLMEngine(model)
    if backend == "transformers":
        return TransformersEngine(model, threads=threads)
    raise ValueError(f"backend must be 'transformers' or 'vllm', got {backend!r}")


# `serve.ingress()` without an app defers the app to replica start: Serve calls
# `__serve_build_asgi_app__` after `__init__`, so each replica builds its own FastAPI app with
# itself as the backend, and no module state has to carry the backend to the routes.
@serve.deployment(name="PolicyServer", max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
@serve.ingress()
class PolicyServer:
    def __init__(self, model: str, model_name: Optional[str] = None, threads: int = 1, batching: bool = True,
                 max_batch_size: int = 16, batch_wait_timeout_s: float = 0.01, request_timeout_s: float = 60.0,
                 max_body_bytes: int = 64 * 1024, api_key_env: str = "MADPO_API_KEY", backend: str = "transformers"):
        logging.basicConfig(level=logging.INFO)
        self.engine = load_engine(model, backend, threads)
        self.batching = batching
        self.generate_batch.set_max_batch_size(max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.settings = ServeSettings(model_name=model_name or Path(model).parent.name or "madpo-policy",
                                      api_key_env=api_key_env, max_body_bytes=max_body_bytes,
                                      request_timeout_s=request_timeout_s,
                                      prompt_template=prompt_template_for(model) or DEFAULT_PROMPT_TEMPLATE)
        log.info("serving %s with %s (batching=%s, max_batch_size=%d)", model, backend, batching, max_batch_size)

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The replica's HTTP app, with this replica as its backend (called by Serve after __init__)."""
        return create_app(self, self.settings)

    # ---- backend protocol used by the routes
    async def generate(self, prompt: str, params: GenParams) -> GenResult:
        if not self.batching:
            [r] = await asyncio.to_thread(self.engine.generate, [prompt], params)
            return r
        return await self.generate_batch((prompt, params))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def generate_batch(self, items: list[tuple[str, GenParams]]) -> list[GenResult]:
        """Concurrent requests arrive here together; those with equal sampling settings share a forward pass."""
        groups: dict[tuple, list[int]] = {}
        for i, (_, p) in enumerate(items):
            groups.setdefault(p.key() + (p.seed,), []).append(i)
        out: list[Optional[GenResult]] = [None] * len(items)
        for idx in groups.values():
            params = items[idx[0]][1]
            results = await asyncio.to_thread(self.engine.generate, [items[i][0] for i in idx], params)
            for i, r in zip(idx, results):
                stop = items[i][1].stop  # stop strings may differ inside a group
                if stop != params.stop:
                    r.text, _ = apply_stop(r.text, stop)
                out[i] = r
        return out

    async def stream(self, prompt: str, params: GenParams) -> AsyncIterator[str]:
        """The engine's blocking iterator runs in a thread; deltas cross to the event loop by a queue."""
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def produce():
            try:
                for delta in self.engine.stream(prompt, params):
                    loop.call_soon_threadsafe(queue.put_nowait, delta)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        task = loop.run_in_executor(None, produce)
        while (delta := await queue.get()) is not None:
            yield delta
        await task

    def chat_prompt(self, messages: list[dict]) -> str:
        return self.engine.chat_prompt(messages)


def build_app(args: dict) -> serve.Application:
    """Entry point for `serve run serve.app:build_app model=...` and serve config files.

    Args arrive as strings from the command line and config files, hence the casts."""
    if "model" not in args:
        raise ValueError("build_app needs model=<policy folder>")
    kwargs = dict(args)
    for key, cast in (("threads", int), ("max_batch_size", int), ("batch_wait_timeout_s", float),
                      ("request_timeout_s", float), ("max_body_bytes", int)):
        if key in kwargs:
            kwargs[key] = cast(kwargs[key])
    if "batching" in kwargs:
        kwargs["batching"] = str(kwargs["batching"]).lower() not in ("0", "false", "no")
    # Replica options from args only when given (madpo serve); a serve config file sets its own.
    options = {}
    if "num_replicas" in kwargs:
        options["num_replicas"] = int(kwargs.pop("num_replicas"))
    if "num_cpus" in kwargs:
        options["ray_actor_options"] = {"num_cpus": float(kwargs.pop("num_cpus"))}
    deployment = PolicyServer.options(**options) if options else PolicyServer
    return deployment.bind(**kwargs)
