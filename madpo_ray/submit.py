"""Send a `madpo` command to any Ray cluster through the Ray Jobs API.

Ray 2.60 clusters use token authentication by default: the token comes from `--token`,
`RAY_AUTH_TOKEN`, or the cluster's `~/.ray/auth_token` on this machine, travels only in
the Authorization header, and is never printed or put in the job's metadata.

The job's working_dir is an allowlist (the package with its presets and search spaces, serve/, pyproject.toml
and the README it names) staged in a temporary folder, never the folder the command runs from;
`--env` names that look like secrets are refused, since job settings are readable by anyone who
can list the cluster's jobs.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_NAME = "madpo-ray"
# What a job needs besides the package, looked up beside it in a source checkout. An allowlist,
# not a denylist: whatever else lies in the folder (keys, cloud credentials, mlruns/, runs/) never
# goes up, since a working_dir lands on every node and in the cluster's package cache.
UPLOAD_ALLOWLIST = ("serve", "pyproject.toml")  # presets and search spaces are package data
# Never copied even from inside an allowlisted folder (a key dropped into serve/, a stray cache).
NEVER_UPLOAD = ("__pycache__", "*.pyc", ".git", ".git-credentials", ".env", ".env.*", "*.pem", "*.key", "*.p12",
                "*.pfx", "id_rsa*", "id_ed25519*", ".netrc", "kubeconfig", ".kube", ".ray", ".aws", ".gcloud",
                "*credentials*", "api_key", "api-key", "*.token", "mlruns", "runs", ".venv")
# Name parts of an environment variable that mark its value as a secret: job settings (runtime_env)
# are readable by anyone who can list the cluster's jobs (dashboard, `ray job list`).
SECRET_NAME_PARTS = {"TOKEN", "TOKENS", "KEY", "KEYS", "APIKEY", "ACCESSKEY", "SECRETKEY", "PRIVATEKEY", "SECRET",
                     "SECRETS", "PASSWORD", "PASSWORDS", "PASSWD", "PASSPHRASE", "PWD", "CREDENTIAL", "CREDENTIALS",
                     "CREDS", "AUTHTOKEN", "COOKIE", "BEARER", "PAT", "DSN"}
# ... and words that mark one even run together with another (PGPASSWORD, MYSECRET, OPENAI_APIKEY).
SECRET_NAME_WORDS = ("PASSWORD", "PASSWD", "PASSPHRASE", "SECRET", "CREDENTIAL", "APIKEY", "ACCESSKEY", "PRIVATEKEY",
                     "AUTHTOKEN")
# ... unless the variable names where a secret lives rather than the secret (MADPO_API_KEY_FILE).
PATH_NAME_SUFFIXES = ("FILE", "PATH", "DIR")
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


def secret_env_names(env_vars: dict[str, str]) -> list[str]:
    """Names that look like they hold a secret (HF_TOKEN, AWS_SECRET_ACCESS_KEY, DB_PASSWORD), but
    not those naming a file (MADPO_API_KEY_FILE) or merely containing a word (TOKENIZERS_PARALLELISM)."""
    found = []
    for name in env_vars:
        parts = [p for p in re.split(r"[^A-Z0-9]+", name.upper()) if p]
        if parts and parts[-1] in PATH_NAME_SUFFIXES:
            continue
        if any(p in SECRET_NAME_PARTS for p in parts) or any(w in "".join(parts) for w in SECRET_NAME_WORDS):
            found.append(name)
    return found


def check_env_vars(env_vars: Optional[dict[str, str]]) -> None:
    """Refuse secrets in --env: the job's runtime_env is shown to anyone who can list jobs."""
    names = secret_env_names(env_vars or {})
    if names:
        raise SubmitError(f"refusing --env {names[0]}: job settings are readable by anyone who can list the "
                          f"cluster's jobs; put the value in a file on the nodes (a mounted Kubernetes Secret) "
                          f"and pass its path instead, e.g. --env {names[0]}_FILE=/var/run/secrets/...")


def source_checkout(package_dir: Path = PACKAGE_DIR) -> Optional[Path]:
    """The package's parent folder when it is this project's source checkout (its pyproject.toml
    names the project); None for an installed package, whose parent is site-packages."""
    root = package_dir.parent
    meta = project_metadata(root / "pyproject.toml")
    return root if meta.get("name") == PROJECT_NAME else None


def project_metadata(pyproject: Path) -> dict:
    """The [project] table of a pyproject.toml ({} when there is none or it does not parse)."""
    try:
        text = pyproject.read_text()
    except (OSError, UnicodeDecodeError):
        return {}
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the two plain string keys we read
        return {k: m.group(1) for k in ("name", "readme")
                if (m := re.search(rf'^{k}\s*=\s*"([^"]+)"', text, re.MULTILINE))}
    try:
        return tomllib.loads(text).get("project", {})
    except tomllib.TOMLDecodeError:
        return {}


@dataclass
class UploadPlan:
    """What goes into a job's working_dir, and which allowlisted entries were not found."""

    package: Path
    checkout: Optional[Path] = None
    entries: list[Path] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def missing_message(self) -> Optional[str]:
        if not self.missing:
            return None
        why = "" if self.checkout else ": the package was not installed from a source checkout of madpo-ray"
        return (f"madpo submit: uploading {self.package.name}/ without {', '.join(self.missing)} (not found beside "
                f"the package in {self.package.parent}{why}); presets not shipped inside the package must then be "
                f"given by path on storage the cluster sees")


def plan_upload(package_dir: Path = PACKAGE_DIR) -> UploadPlan:
    """The package folder, plus the allowlisted files beside it when it sits in a source checkout,
    plus the README when the package metadata names one (building the project needs it)."""
    root = source_checkout(package_dir)
    plan = UploadPlan(package=package_dir, checkout=root, entries=[package_dir])
    wanted = list(UPLOAD_ALLOWLIST)
    if root is not None:
        readme = project_metadata(root / "pyproject.toml").get("readme")
        readme = readme.get("file") if isinstance(readme, dict) else readme
        if isinstance(readme, str) and "/" not in readme and not readme.startswith("."):
            wanted.append(readme)
    for name in wanted:
        path = root / name if root is not None else None
        if path is not None and path.exists() and not path.is_symlink():
            plan.entries.append(path)
        else:
            plan.missing.append(name + ("/" if "." not in name else ""))
    return plan


def never_upload(folder: str, names: list[str]) -> set[str]:
    """shutil.copytree's ignore: secrets and caches by name, and every symlink (one could point at
    ~/.aws or anywhere else outside the allowlist)."""
    skip = {n for n in names if any(fnmatch.fnmatch(n, pat) for pat in NEVER_UPLOAD)}
    return skip | {n for n in names if os.path.islink(os.path.join(folder, n))}


def stage_working_dir(plan: UploadPlan, dest: Path) -> Path:
    """Copy the plan's entries into dest (a fresh folder), which becomes the job's working_dir."""
    dest.mkdir(parents=True, exist_ok=True)
    for entry in plan.entries:
        if entry.is_dir():
            shutil.copytree(entry, dest / entry.name, ignore=never_upload)
        elif not never_upload(str(entry.parent), [entry.name]):
            shutil.copy2(entry, dest / entry.name)
    return dest


def build_runtime_env(working_dir: Path, pip: Optional[list[str]] = None,
                      env_vars: Optional[dict[str, str]] = None) -> dict:
    """working_dir is a folder staged by stage_working_dir: nothing else is uploaded."""
    check_env_vars(env_vars)
    env = {"working_dir": str(working_dir), "env_vars": dict(env_vars or {})}
    if pip:
        env["pip"] = pip
    return env


def submit(command: Iterable[str], *, address: Optional[str] = None, token: Optional[str] = None,
           package_dir: Path = PACKAGE_DIR, pip: Optional[list[str]] = None,
           env_vars: Optional[dict[str, str]] = None, job_id: Optional[str] = None,
           python: str = "python", notify: Optional[Callable[[str], None]] = None) -> str:
    """Submit `madpo <command...>` as a Ray job; returns the submission id. The working_dir is the
    allowlist (plan_upload) staged in a temporary folder, found from wherever the package lives;
    `notify` (default: a warning) is told which allowlisted entries were not found."""
    args = list(command)
    if not args:
        raise SubmitError("nothing to submit: give a madpo command after --, e.g. `madpo submit -- run`")
    check_env_vars(env_vars)
    entrypoint = f"{python} -m madpo_ray " + " ".join(shlex.quote(a) for a in args)
    c = client(address, token)
    plan = plan_upload(package_dir)
    if plan.missing_message():
        (notify or (lambda m: warnings.warn(m, stacklevel=3)))(plan.missing_message())
    with tempfile.TemporaryDirectory(prefix="madpo-submit-") as tmp:
        staged = stage_working_dir(plan, Path(tmp) / "working_dir")
        return c.submit_job(entrypoint=entrypoint, submission_id=job_id,
                            runtime_env=build_runtime_env(staged, pip, env_vars),
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
