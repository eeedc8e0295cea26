"""Start the Ray Serve application from Python (`madpo serve`, tests, benchmarks)."""

from __future__ import annotations

import logging
import os
import time
from typing import Optional

log = logging.getLogger(__name__)


def serve_runtime_env(extra_env: Optional[dict] = None) -> dict:
    """Replicas import the deployment from the installed package; they read the API key and the
    offline flags from their environment, which Ray only passes on through the runtime_env."""
    env = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}
    if os.environ.get("MADPO_API_KEY"):
        env["MADPO_API_KEY"] = os.environ["MADPO_API_KEY"]
    return {"env_vars": {**env, **(extra_env or {})}}


def run_server(model: str, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1, num_cpus: float = 1.0,
               batching: bool = True, max_batch_size: int = 16, address: Optional[str] = None,
               blocking: bool = False, app_name: str = "madpo", route_prefix: str = "/", **app_args):
    """Deploy the policy server on a local (or given) Ray cluster; returns once the app is ready."""
    import ray
    from ray import serve

    from madpo_ray.serving.deployment import build_app

    if not ray.is_initialized():
        env = serve_runtime_env()
        if address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=address or os.environ["RAY_ADDRESS"], runtime_env=env)
        else:
            ray.init(runtime_env=env, include_dashboard=True, dashboard_host="127.0.0.1")

    serve.start(http_options={"host": host, "port": port})
    application = build_app({"model": model, "batching": batching, "max_batch_size": max_batch_size,
                             "num_replicas": replicas, "num_cpus": num_cpus, **app_args})
    t0 = time.time()
    handle = serve.run(application, name=app_name, route_prefix=route_prefix, blocking=False)
    log.info("serving %s at http://%s:%d (ready in %.1fs)", model, host, port, time.time() - t0)
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return handle
