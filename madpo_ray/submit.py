"""Send a `madpo` command to any Ray cluster through the Ray Jobs API.

Ray 2.60 clusters use token authentication by default: the token comes from `--token`,
`RAY_AUTH_TOKEN`, or the cluster's `~/.ray/auth_token` on this machine, travels only in
the Authorization header, and is never printed or put in the job's metadata.
"""

from __future__ import annotations

import os
import shlex
import time
import warnings
from pathlib import Path
from typing import Iterable, Optional

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Never upload these with the working_dir: environments, artifacts, caches, VCS.
UPLOAD_EXCLUDES = [".venv", "runs", ".git", "**/__pycache__", ".pytest_cache", ".hypothesis", "*.egg-info",
                   "build", "dist"]
# ... and never secrets: a working_dir lands on every node and in the cluster's package cache.
SECRET_EXCLUDES = [".env", ".env.*", "**/.env", "*.pem", "*.key", ".netrc", "**/.netrc", "kubeconfig", "**/kubeconfig",
                   ".kube", ".ray", "**/.ray", "*.p12", "id_rsa*", "api_key"]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(RuntimeError):
    """Cannot reach or authenticate to the cluster; the message says which and what to do."""


def resolve_token(token: Optional[str] = None) -> Optional[str]:
    if token:
        return token.strip()
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    return path.read_text().strip() if path.exists() else None


def warn_if_token_in_clear(address: str, token: Optional[str]) -> Optional[str]:
    """A bearer token over plain HTTP to another host can be read by anyone on the path."""
    from urllib.parse import urlparse

    from madpo_ray.serving.launch import is_loopback

    url = urlparse(address if "://" in address else f"http://{address}")
    if not token or url.scheme != "http" or is_loopback(url.hostname or ""):
        return None
    message = (f"warning: sending the Ray auth token over plain HTTP to {url.hostname}; use https:// or a "
               f"tunnel (kubectl port-forward, ssh -L) to 127.0.0.1")
    warnings.warn(message, stacklevel=3)
    return message


def client(address: Optional[str] = None, token: Optional[str] = None):
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_DASHBOARD_ADDRESS") or DEFAULT_ADDRESS
    tok = resolve_token(token)
    warn_if_token_in_clear(address, tok)
    headers = {"Authorization": f"Bearer {tok}"} if tok else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as e:  # connection refused, 401/403 from the dashboard, bad URL
        msg = str(e)
        if tok:
            msg = msg.replace(tok, "***")
        hint = " (is token authentication on? pass --token or set RAY_AUTH_TOKEN)" if "401" in msg or "403" in msg else ""
        raise SubmitError(f"cannot reach the Ray job server at {address}: {msg}{hint}") from None


def build_runtime_env(working_dir: Path = PROJECT_ROOT, pip: Optional[list[str]] = None,
                      env_vars: Optional[dict[str, str]] = None) -> dict:
    env = {"working_dir": str(working_dir), "excludes": UPLOAD_EXCLUDES + SECRET_EXCLUDES,
           "env_vars": dict(env_vars or {})}
    if pip:
        env["pip"] = pip
    return env


def submit(command: Iterable[str], *, address: Optional[str] = None, token: Optional[str] = None,
           working_dir: Path = PROJECT_ROOT, pip: Optional[list[str]] = None,
           env_vars: Optional[dict[str, str]] = None, job_id: Optional[str] = None,
           python: str = "python") -> str:
    """Submit `madpo <command...>` as a Ray job; returns the submission id."""
    args = list(command)
    if not args:
        raise SubmitError("nothing to submit: give a madpo command after --, e.g. `madpo submit -- run`")
    entrypoint = f"{python} -m madpo_ray " + " ".join(shlex.quote(a) for a in args)
    c = client(address, token)
    return c.submit_job(entrypoint=entrypoint, submission_id=job_id,
                        runtime_env=build_runtime_env(working_dir, pip, env_vars),
                        metadata={"tool": "madpo", "command": " ".join(args)[:200]})


def status(job_id: str, address: Optional[str] = None, token: Optional[str] = None) -> str:
    return str(client(address, token).get_job_status(job_id).value)


def stop(job_id: str, address: Optional[str] = None, token: Optional[str] = None) -> bool:
    return client(address, token).stop_job(job_id)


def logs(job_id: str, address: Optional[str] = None, token: Optional[str] = None) -> str:
    return client(address, token).get_job_logs(job_id)


def follow(job_id: str, address: Optional[str] = None, token: Optional[str] = None, out=None,
           poll_s: float = 2.0, timeout_s: Optional[float] = None) -> str:
    """Stream the job's logs until it ends; returns the final status."""
    import asyncio

    c = client(address, token)
    write = (out or (lambda s: print(s, end="", flush=True)))

    async def tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            write(chunk)

    try:
        asyncio.run(asyncio.wait_for(tail(), timeout=timeout_s))
    except asyncio.TimeoutError:
        pass
    deadline = time.time() + 30
    while True:  # the log stream can close a moment before the status turns terminal
        s = str(c.get_job_status(job_id).value)
        if s in TERMINAL or time.time() > deadline:
            return s
        time.sleep(poll_s)


def wait_for(job_id: str, states: set[str], address: Optional[str] = None, token: Optional[str] = None,
             timeout_s: float = 600, poll_s: float = 1.0) -> str:
    c = client(address, token)
    deadline = time.time() + timeout_s
    while True:
        s = str(c.get_job_status(job_id).value)
        if s in states or s in TERMINAL or time.time() > deadline:
            return s
        time.sleep(poll_s)
