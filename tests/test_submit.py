"""`madpo submit` / `madpo jobs` against a real cluster started with `ray start --head` on
loopback, with Ray 2.60's default token authentication on."""

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import TINY_SETS

pytestmark = [pytest.mark.ray, pytest.mark.slow]
STOPS_SESSION_CLUSTER = True  # its `head` fixture stops every Ray process first: conftest runs it last
BIN = Path(sys.executable).parent
DASHBOARD = "http://127.0.0.1:8275"


def _madpo(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "madpo_ray", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def head(tmp_path_factory, ray_clusters):
    # `ray stop --force` ends every Ray process on the machine: leave the session's cluster first,
    # or this process (its driver) goes down with it.
    ray_clusters.stop()
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    env.pop("RAY_AUTH_MODE", None)  # Ray 2.60's default: token authentication
    env["RAY_AUTH_MODE"] = "token"
    subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True, env=env)
    subprocess.run([str(BIN / "ray"), "start", "--head", "--num-cpus=2", "--port=6390", "--dashboard-host=127.0.0.1",
                    "--dashboard-port=8275", "--disable-usage-stats", "--include-dashboard=true"],
                   check=True, capture_output=True, env=env, timeout=180)
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    deadline = time.time() + 120
    while True:  # the job server answers a little after `ray start` returns
        try:
            req = urllib.request.Request(f"{DASHBOARD}/api/version", headers={"Authorization": f"Bearer {token}"})
            urllib.request.urlopen(req, timeout=5)
            break
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(2)
    yield {"token": token, "env": dict(os.environ, RAY_AUTH_TOKEN=token)}
    subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True, env=env, timeout=120)


def _submit(head, *madpo_args):
    out = _madpo("submit", "--address", DASHBOARD, "--env", "HF_HUB_OFFLINE=1", "--", *madpo_args, env=head["env"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert head["token"] not in out.stdout + out.stderr
    return re.search(r"submitted job (\S+)", out.stdout).group(1)


def test_wrong_token_is_refused_clearly(head):
    env = dict(os.environ, RAY_AUTH_TOKEN="not-the-token")
    out = _madpo("jobs", "status", "raysubmit_x", "--address", DASHBOARD, env=env)
    assert out.returncode == 1
    assert "cannot reach the Ray job server" in out.stdout and "not-the-token" not in out.stdout


def test_submitted_run_succeeds_with_logs_and_artifacts(head, tmp_path):
    from madpo_ray import submit as sub

    job = _submit(head, "run", "--name", "job1", f"runs_dir={tmp_path}", *TINY_SETS, "policy.optim.max_steps=6")
    final = sub.wait_for(job, sub.TERMINAL, DASHBOARD, head["token"], timeout_s=900)
    logs = _madpo("jobs", "logs", job, "--address", DASHBOARD, env=head["env"]).stdout
    assert final == "SUCCEEDED", logs[-3000:]
    assert "== policy: done" in logs and "madpo run summary" in logs
    assert (tmp_path / "job1" / "summary.json").exists()
    _assert_quiet_terminal_and_full_log(logs, tmp_path / "job1")
    _assert_every_stage_tracked(tmp_path / "job1")
    _assert_listed(tmp_path, "job1", head["env"])
    assert any((tmp_path / "job1" / "policy" / "madpo" / "model").glob("*.safetensors"))
    status = _madpo("jobs", "status", job, "--address", DASHBOARD, env=head["env"])
    assert "SUCCEEDED" in status.stdout


def test_stop_a_running_job(head, tmp_path):
    from madpo_ray import submit as sub

    job = _submit(head, "run", "--name", "job2", f"runs_dir={tmp_path}", *TINY_SETS, "sft.optim.epochs=50")
    deadline = time.time() + 300
    while "== sft: running" not in sub.logs(job, DASHBOARD, head["token"]):
        assert time.time() < deadline and sub.status(job, DASHBOARD, head["token"]) in ("PENDING", "RUNNING")
        time.sleep(2)
    out = _madpo("jobs", "stop", job, "--address", DASHBOARD, env=head["env"])
    assert "stop requested" in out.stdout
    assert sub.wait_for(job, {"STOPPED"}, DASHBOARD, head["token"], timeout_s=120) == "STOPPED"
    assert not (tmp_path / "job2" / "sft" / "DONE").exists()


def _fake_tree(root: Path, files: list[str]) -> None:
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")


CHECKOUT_KEPT = ["madpo_ray/__init__.py", "madpo_ray/cli.py", "madpo_ray/data/corpus/a.txt", "madpo_ray/configs/tiny.yaml",
                 "madpo_ray/tune_configs/madpo_default.yaml", "serve/app.py", "serve/config.yaml", "README.md", "pyproject.toml"]
CHECKOUT_SECRETS = ["api-key", "api_key", ".git-credentials", ".aws/credentials", ".config/gcloud/creds.json",
                    "mlruns/0/meta.yaml", "runs/tiny/summary.json", ".env", "notes/secret.txt", "credentials.json",
                    "madpo_ray/configs/api-key", "madpo_ray/configs/.env", "serve/server.key", "madpo_ray/__pycache__/cli.cpython-311.pyc",
                    ".git/config", "madpo_ray.egg-info/PKG-INFO", "k8s/base/rayservice.yaml"]


def _uploaded(plan, tmp_path: Path) -> set[str]:
    """What Ray itself would zip from the staged working_dir (its own packaging code)."""
    from ray._private.runtime_env.packaging import create_package

    from madpo_ray.submit import stage_working_dir

    staged = stage_working_dir(plan, tmp_path / "staged")
    create_package(str(staged), tmp_path / "upload.zip", include_gitignore=True)
    import zipfile

    with zipfile.ZipFile(tmp_path / "upload.zip") as z:
        return {n for n in z.namelist() if not n.endswith("/")}


def test_working_dir_is_an_allowlist_of_the_checkout(tmp_path):
    """A key, cloud credentials, .git-credentials and mlruns/ beside the code never go up."""
    from madpo_ray.submit import plan_upload

    root = tmp_path / "checkout"
    _fake_tree(root, CHECKOUT_KEPT + CHECKOUT_SECRETS)
    (root / "pyproject.toml").write_text('[project]\nname = "madpo-ray"\nreadme = "README.md"\n')
    (root / "madpo_ray" / "configs" / "linked.yaml").symlink_to(root / ".aws" / "credentials")
    plan = plan_upload(root / "madpo_ray")
    assert plan.missing == [] and plan.missing_message() is None
    assert _uploaded(plan, tmp_path) == set(CHECKOUT_KEPT)


def test_installed_package_uploads_only_itself_and_says_what_is_missing(tmp_path):
    """After a wheel install the package's parent is site-packages: neither it nor another
    distribution's top-level configs/ or serve/ is uploaded, and the gap is named."""
    from madpo_ray.submit import plan_upload

    site = tmp_path / "site-packages"
    _fake_tree(site, ["madpo_ray/__init__.py", "madpo_ray/cli.py", "configs/other.yaml", "serve/app.py",
                      "requests/__init__.py", "pyproject.toml"])
    plan = plan_upload(site / "madpo_ray")
    assert plan.entries == [site / "madpo_ray"]
    assert plan.missing == ["serve/", "pyproject.toml"]
    assert "serve/, pyproject.toml" in plan.missing_message()
    assert _uploaded(plan, tmp_path) == {"madpo_ray/__init__.py", "madpo_ray/cli.py"}


def test_submit_sends_the_staged_allowlist_and_no_excluded_folder(tmp_path, monkeypatch):
    """The whole submit path without a cluster: the runtime_env Ray receives names a staged folder
    holding only the allowlist (read while submit_job runs; the folder is removed after)."""
    from madpo_ray import submit as sub

    root = tmp_path / "checkout"
    _fake_tree(root, CHECKOUT_KEPT + CHECKOUT_SECRETS)
    (root / "pyproject.toml").write_text('[project]\nname = "madpo-ray"\nreadme = "README.md"\n')
    seen = {}

    class FakeClient:
        def submit_job(self, entrypoint, submission_id, runtime_env, metadata):
            wd = Path(runtime_env["working_dir"])
            seen.update(env=runtime_env, files={str(f.relative_to(wd)) for f in wd.rglob("*") if f.is_file()})
            return "raysubmit_fake"

    monkeypatch.setattr(sub, "client", lambda address, token: FakeClient())
    assert sub.submit(["run"], package_dir=root / "madpo_ray", env_vars={"HF_HUB_OFFLINE": "1"}) == "raysubmit_fake"
    assert seen["files"] == set(CHECKOUT_KEPT)
    assert seen["env"]["env_vars"] == {"HF_HUB_OFFLINE": "1"} and not Path(seen["env"]["working_dir"]).exists()


SECRET_NAMES = ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MADPO_API_KEY",
                "WANDB_API_KEY", "OPENAI_APIKEY", "db-password", "PGPASSWORD", "GITHUB_PAT", "MY_CREDENTIALS", "SECRET"]
PLAIN_NAMES = ["HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "MADPO_API_KEY_FILE", "RAY_AUTH_MODE", "KEYBOARD_LAYOUT",
               "SSL_CERT_FILE", "OMP_NUM_THREADS", "MONKEY"]


def test_secret_looking_env_names_are_refused():
    from madpo_ray.submit import SubmitError, build_runtime_env, secret_env_names

    assert secret_env_names(dict.fromkeys(SECRET_NAMES + PLAIN_NAMES, "v")) == SECRET_NAMES
    with pytest.raises(SubmitError, match=r"refusing --env HF_TOKEN: .*Kubernetes Secret") as e:
        build_runtime_env(Path("."), env_vars={"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_value"})
    assert "hf_value" not in str(e.value) and "\n" not in str(e.value)


def test_cli_refuses_a_secret_env_in_one_line_before_contacting_a_cluster():
    out = _madpo("submit", "--address", "http://127.0.0.1:9", "--env", "HF_TOKEN=hf_do_not_print", "--", "run",
                 timeout=60)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert "refusing --env HF_TOKEN" in text and "hf_do_not_print" not in text
    assert "Traceback" not in text and "cannot reach" not in text


def test_token_over_plain_http_to_another_host_warns():
    from madpo_ray.submit import warn_if_token_in_clear

    with pytest.warns(UserWarning, match="plain HTTP to 10.1.2.3"):
        warn_if_token_in_clear("http://10.1.2.3:8265", "tok")
    assert warn_if_token_in_clear("http://127.0.0.1:8265", "tok") is None
    assert warn_if_token_in_clear("https://ray.example.org", "tok") is None
    assert warn_if_token_in_clear("http://10.1.2.3:8265", None) is None


RAY_INTERNALS = ("PreemptionWatcher", "core_worker.cc", "TrainController", "RayTrainWorker", "DatasetManager")


def _assert_quiet_terminal_and_full_log(terminal: str, run_dir: Path) -> None:
    """What `madpo run` printed (here: the job's log) is the narrative; Ray's output is in the run's log."""
    lines = [line for line in terminal.splitlines() if line.strip()]
    assert len(lines) <= 45, terminal
    assert not [line for line in lines if any(word in line for word in RAY_INTERNALS)], terminal
    for training in ("sft", "reward", "policy/madpo"):  # a progress bar per training, at its last step
        assert any(line.strip().startswith(training) and "tok/s" in line for line in lines), (training, terminal)
    full = (run_dir / "logs" / "madpo.log").read_text()
    assert "TrainController" in full and "== policy: done" in full and "[policy/madpo] step" in full


def _assert_every_stage_tracked(run_dir: Path) -> None:
    """MLflow (file store) and TensorBoard hold every training's curves, read with their own readers."""
    import json

    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("job1").experiment_id])}
    assert set(runs) == {"sft", "reward", "policy/madpo"}
    for training, folder in (("sft", "sft"), ("reward", "reward"), ("policy/madpo", "policy/madpo")):
        run = runs[training]
        assert run.info.status == "FINISHED"
        steps = json.loads((run_dir / folder / "train_metrics.json").read_text())["steps"]
        history = client.get_metric_history(run.info.run_id, "loss")
        assert history and history[-1].step == steps, training
        board = EventAccumulator(str(run_dir / "tensorboard" / folder))
        board.Reload()
        assert [e.step for e in board.Scalars("loss")] == [m.step for m in history], training
        assert {"lr", "tokens_per_s"} <= set(board.Tags()["scalars"])
    assert {"weight_mean", "logratio_chosen", "margin_mean"} <= set(runs["policy/madpo"].data.metrics)
    assert "eval_loss" in runs["reward"].data.metrics  # the reward model's validation evaluations


def _assert_listed(runs_dir: Path, name: str, env: dict) -> None:
    import json

    out = _madpo("runs", str(runs_dir), "--json", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    row = next(r for r in json.loads(out.stdout) if r["name"] == name)
    summary = json.loads((runs_dir / name / "summary.json").read_text())
    assert row["stages"] == ["data", "sft", "pairs", "reward", "score", "policy/madpo", "eval"]
    assert row["policy_greedy_gold_reward"] == summary["policy_greedy_gold_reward"]
