"""Start the Ray Serve application from Python (`madpo serve`, tests, benchmarks): `run_server` for one
app and its cluster; `app_spec` + `deploy_apps` for several apps on a running cluster at once."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import time
from typing import Optional

from madpo_ray.runtime import cluster_address
from madpo_ray.serving.api import API_KEY_FILE_ENV
from madpo_ray.serving.folders import resolve_model_folder

log = logging.getLogger(__name__)


class InsecureServeError(ValueError):
    """Refusing to expose an unauthenticated server beyond this machine. A ValueError, so that
    `madpo serve` reports it in one line (its usage errors), not as a traceback."""


def serve_runtime_env(extra_env: Optional[dict] = None) -> dict:
    """Replicas import the deployment from the installed package and read the offline flags
    from the runtime_env. The API key is deliberately NOT copied here: a runtime_env is shown
    by the dashboard and the state API. Replicas read it from their own environment (a local
    cluster inherits the driver's; on Kubernetes a Secret sets it) or, better, from the file
    named by $MADPO_API_KEY_FILE (a path, not a secret, so it may travel)."""
    env = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}
    if os.environ.get(API_KEY_FILE_ENV):
        env[API_KEY_FILE_ENV] = os.environ[API_KEY_FILE_ENV]
    return {"env_vars": {**env, **(extra_env or {})}}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, has_key: bool, insecure: bool, what: str = "") -> None:
    """Binding beyond loopback without a key would give anyone on the network the model."""
    if not is_loopback(host) and not has_key and not insecure:
        raise InsecureServeError(
            f"refusing to serve on {host}{what} without an API key: set MADPO_API_KEY_FILE (a file holding the key) "
            f"or MADPO_API_KEY, bind 127.0.0.1, or pass --insecure to serve unauthenticated on purpose")


# Serve's proxy ends a request after this much more than the app's own request timeout and body
# deadline: the app answers 504/408 first; Serve's 408 is the backstop for a handler that never returns.
PROXY_TIMEOUT_MARGIN_S = 30.0


def proxy_request_timeout_s(app_args: dict) -> float:
    return (float(app_args.get("request_timeout_s", 60.0)) + float(app_args.get("body_timeout_s", 10.0))
            + PROXY_TIMEOUT_MARGIN_S)


def serve_controller():
    """The running Serve controller's actor handle: what it holds is what the proxies and replicas
    were given, where Serve's public API only says whether apps are running."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)


def proxy_http_options():
    """The HTTP options Serve's proxies run with, from Serve's controller: on a cluster where Serve
    was already running, `serve.start` keeps the proxies it has, whatever host was asked for."""
    import ray

    return ray.get(serve_controller().get_http_config.remote())


def start_proxies(host: str, port: int, app_args: dict, insecure: bool) -> bool:
    """Start Serve's proxies (or find the running ones), refuse an address they actually listen on
    beyond loopback without a key, and say whether the replicas must require a key: yes whenever
    the driver has one or the proxies are public, so a replica without the key in its own
    environment refuses to start instead of serving openly."""
    from ray import serve

    has_key = key_configured(app_args.get("api_key_env", "MADPO_API_KEY"), app_args.get("api_key_file"))
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": proxy_request_timeout_s(app_args)})
    actual = proxy_http_options()
    if (actual.host, actual.port) != (host, port):
        log.warning("Serve was already running: its proxies listen on %s:%s, not on the %s:%s asked for",
                    actual.host, actual.port, host, port)
    check_exposure(actual.host, has_key, insecure, what=" (where Serve's proxies already listen)")
    return not insecure and (has_key or not is_loopback(actual.host))


def replica_refusal(app_name: str) -> Optional[str]:
    """Why the app's replicas refused to start over the key, in one line, from Serve's status of
    the app (serve.run's own error only says that the deployment failed); None for other failures."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    texts = [app.message] + [d.message for d in app.deployments.values()] if app else []
    lines = [line for text in texts for line in (text or "").splitlines() if "ApiKeyError:" in line]
    return lines[-1].split("ApiKeyError:", 1)[1].strip() if lines else None


def key_configured(api_key_env: str = "MADPO_API_KEY", api_key_file: Optional[str] = None) -> bool:
    return bool(api_key_file or os.environ.get(API_KEY_FILE_ENV) or os.environ.get(api_key_env, "").strip())


def direct_ingress_env(port: int) -> dict[str, str]:
    """The variables that turn on Ray Serve's direct ingress (experimental in Ray 2.60): each ingress
    replica also serves HTTP itself, on port+1, port+2, ... of its node, so a request there skips
    the proxy actor, the hop that cost our vLLM deployment about 30% of its streamed throughput
    (bench/README.md, serve_load). Serve reads them when its processes start."""
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port + 1),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 100),
            # Serve holds a stopping replica 30 s so load balancers can drop it; there is none locally.
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S":
                os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")}


def enable_direct_ingress(port: int, address: Optional[str]) -> None:
    """Check that direct ingress can be set up: only for the local cluster about to start (on an
    existing one it is the nodes' environment, docs/cluster.md), with room for the replica ports."""
    import ray


    if ray.is_initialized() or cluster_address(address) != "local":
        raise ValueError("--direct-ingress applies to the local cluster madpo serve starts; on an existing "
                         "cluster start its nodes with RAY_SERVE_ENABLE_DIRECT_INGRESS=1 instead")
    if not 1024 <= port <= 65535 - 100:
        raise ValueError(f"--direct-ingress needs --port between 1024 and {65535 - 100} (replicas take the 100 "
                         f"ports above it), got {port}")


@contextlib.contextmanager
def environ(values: dict[str, str]):
    """These environment variables for the block, then the previous ones again: a local cluster's
    processes take the driver's environment when ray.init starts them, and keep it."""
    previous = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def init_cluster(address: str, port: int, direct_ingress: bool) -> None:
    """Join the given cluster, or start a local one (its dashboard on loopback only)."""
    import ray

    env = serve_runtime_env()
    if address != "local":
        ray.init(address=address, runtime_env=env)
    else:
        with environ(direct_ingress_env(port) if direct_ingress else {}):  # the cluster's processes keep them
            ray.init(address="local", runtime_env=env, include_dashboard=True, dashboard_host="127.0.0.1")


def app_spec(model: str, *, app_name: str = "madpo", route_prefix: str = "/", replicas: int = 1,
             num_cpus: float = 1.0, batching: bool = True, max_batch_size: int = 16, **app_args) -> dict:
    """One app to deploy: its model folder resolved and its engine chosen, the checks that need no
    cluster, so that a bad folder or adapter is refused before anything starts."""
    from madpo_ray.serving.deployment import choose_backend

    model = resolve_model_folder(model)
    backend, why = choose_backend(model, app_args.pop("backend", "auto"), bool(app_args.get("adapters")))
    log.info("%s: generation backend %s (%s)", app_name, backend, why)
    return {"name": app_name, "route_prefix": route_prefix,
            "args": {"model": model, "batching": batching, "max_batch_size": max_batch_size,
                     "num_replicas": replicas, "num_cpus": num_cpus, "backend": backend, **app_args}}


def deploy_apps(specs: list[dict], *, host: str = "127.0.0.1", port: int = 8000, insecure: bool = False) -> list:
    """Deploy apps (from app_spec) on the running cluster in one step, so their replicas start side
    by side; returns their handles once every app is ready."""
    from ray import serve

    from madpo_ray.serving.deployment import build_app

    targets = []
    for spec in specs:
        require_key = start_proxies(host, port, spec["args"], insecure)
        targets.append(serve.RunTarget(build_app({**spec["args"], "require_key": require_key}), name=spec["name"],
                                       route_prefix=spec["route_prefix"]))
    t0 = time.time()
    try:
        handles = serve.run_many(targets, blocking=False)
    except RuntimeError:
        refusal = next(filter(None, (replica_refusal(spec["name"]) for spec in specs)), None)
        if refusal is None:
            raise
        raise InsecureServeError(f"the replicas refused to start: {refusal}") from None
    for spec in specs:
        log.info("serving %s at http://%s:%d%s (ready in %.1fs)", spec["args"]["model"], host, port,
                 spec["route_prefix"].rstrip("/"), time.time() - t0)
    return handles


def run_server(model: str, *, host: str = "127.0.0.1", port: int = 8000, address: Optional[str] = None,
               blocking: bool = False, insecure: bool = False, direct_ingress: bool = False, **app_args):
    """Deploy the policy server on a local (or given) Ray cluster; returns once the app is ready.
    app_args: app_spec's (app_name, route_prefix, replicas, num_cpus, batching, ...)."""
    import ray
    from ray import serve

    check_exposure(host, key_configured(app_args.get("api_key_env", "MADPO_API_KEY"), app_args.get("api_key_file")),
                   insecure)  # before anything starts; start_proxies checks where the proxies really listen
    spec = app_spec(model, **app_args)
    address = cluster_address(address)
    started_here = not ray.is_initialized() and address == "local"
    if direct_ingress:
        enable_direct_ingress(port, address)
    if not ray.is_initialized():
        init_cluster(address, port, direct_ingress)
    if blocking:  # from here a stop (Ctrl-C, SIGTERM from `kill` or a container) shuts down what started
        signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        [handle] = deploy_apps([spec], host=host, port=port, insecure=insecure)
        if direct_ingress:
            log.info("direct ingress: the replica also serves at http://%s:%d without the proxy hop (more replicas "
                     "on a node take the next free ports up to %d)", host, port + 1, port + 100)
        while blocking:
            time.sleep(3600)
    except KeyboardInterrupt:
        if not blocking:
            raise
        if started_here:
            log.info("shutting down Serve and the local cluster")
            serve.shutdown()
        else:  # a shared cluster: take down our app only, not every Serve app on it
            log.info("deleting the app %s from the cluster", spec["name"])
            serve.delete(spec["name"])
        ray.shutdown()
        return None
    return handle


def stop_on_sigterm(signum, frame):
    """SIGTERM as Ctrl-C, so the blocking server stops Serve and the cluster it started instead of
    leaving them running behind a killed driver."""
    raise KeyboardInterrupt
