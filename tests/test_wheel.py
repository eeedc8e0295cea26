"""The package as users install it: a built wheel, installed (not editable) apart from the source
tree, run from an empty folder. It must carry its presets and search spaces and run a CI-sized
`madpo run` end to end (the one-process runtime)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TINY_SETS

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """site-packages-like folder holding only the wheel's files (dependencies come from this venv)."""
    tmp = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                            "-w", str(tmp / "dist"), "-q"], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    wheel = next((tmp / "dist").glob("madpo_ray-*.whl"))
    target = tmp / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel),
                           "-q"], capture_output=True, text=True, timeout=600)
    assert inst.returncode == 0, inst.stdout + inst.stderr
    return target


def run_installed(site: Path, cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Python with the installed wheel first on the path, in a folder with no source tree."""
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_loads_every_preset_and_search_space_from_an_empty_folder(installed, tmp_path):
    code = ("import json, madpo_ray; from madpo_ray.config import PRESETS, load_config; "
            "from madpo_ray.tune_space import SEARCH_SPACES, load_search_space; "
            "p = sorted(f.name[:-5] for f in PRESETS.iterdir() if f.name.endswith('.yaml')); "
            "s = sorted(f.name[:-5] for f in SEARCH_SPACES.iterdir() if f.name.endswith('.yaml')); "
            "[load_config(n) for n in p]; [load_search_space(n) for n in s]; "
            "print(json.dumps({'file': madpo_ray.__file__, 'presets': p, 'spaces': s}))")
    proc = run_installed(installed, tmp_path, "-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(got["file"]).is_relative_to(installed)  # the wheel's copy, not the source tree's
    assert {"tiny", "debian", "smollm2-debian", "gemma3-270m", "tldr-gpu", "tldr-gpu-7b"} <= set(got["presets"])
    assert {"madpo_default", "madpo_grid", "baselines", "dpo_gold", "madpo_gold"} <= set(got["spaces"])


def test_the_wheel_runs_the_pipeline_and_init_writes_editable_presets(installed, tmp_path):
    sets = TINY_SETS + ["ray.backend=local", "sft.optim.max_steps=2", "reward.optim.max_steps=2",
                        "policy.optim.max_steps=2", "eval.num_prompts=2", f"runs_dir={tmp_path / 'runs'}", "name=w"]
    proc = run_installed(installed, tmp_path, "-m", "madpo_ray", "run", *sets, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (tmp_path / "runs" / "w" / "summary.json").exists()
    init = run_installed(installed, tmp_path, "-m", "madpo_ray", "init", "mine")
    assert init.returncode == 0 and (tmp_path / "mine" / "configs" / "tiny.yaml").is_file()
    assert (tmp_path / "mine" / "tune_configs" / "dpo_gold.yaml").is_file()
    assert "madpo_ray.serving.deployment:build_app" in (tmp_path / "mine" / "serve_config.yaml").read_text()
    check = run_installed(installed, tmp_path, "-c", "from madpo_ray.config import load_config; "
                          "print(load_config('mine/configs/tiny.yaml').name)")
    assert check.stdout.strip() == "tiny"
