"""`make test` runs two pytest processes at once (the Ray tests, and every other test beside them).
These run the real recipe with a stand-in interpreter whose pytest "fails" on request, so the
shell logic is checked in well under a second: a failure on either side must fail the target and
must still print the other side's report."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

STAND_IN = """#!/usr/bin/env bash
# stand-in for `python -m pytest -m <marker> ...`: prints which half ran, exits as told
marker="$4"
if [ "$marker" = "ray" ]; then echo "RAY-HALF-REPORT"; exit "$RAY_EXIT"; fi
echo "BESIDE-HALF-REPORT"; exit "$BESIDE_EXIT"
"""


def make_test(tmp_path: Path, ray_exit: int, beside_exit: int) -> subprocess.CompletedProcess:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(STAND_IN)
    python.chmod(0o755)
    (venv / ".installed").touch()  # newer than pyproject.toml and the lock: make skips the install
    env = {**os.environ, "RAY_EXIT": str(ray_exit), "BESIDE_EXIT": str(beside_exit)}
    return subprocess.run(
        ["make", "-s", "-C", str(ROOT), "test", f"VENV={venv}"],
        env=env, capture_output=True, text=True, timeout=60,
    )


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
@pytest.mark.parametrize(
    ("ray_exit", "beside_exit", "target_fails"),
    [(0, 0, False), (1, 0, True), (0, 1, True), (2, 5, True)],
)
def test_make_test_fails_when_either_half_fails_and_prints_both_reports(tmp_path, ray_exit, beside_exit, target_fails):
    done = make_test(tmp_path, ray_exit, beside_exit)
    assert (done.returncode != 0) == target_fails, done.stdout + done.stderr
    assert "RAY-HALF-REPORT" in done.stdout
    assert "BESIDE-HALF-REPORT" in done.stdout, "the beside report is lost when a half fails"
    assert done.stdout.index("RAY-HALF-REPORT") < done.stdout.index("BESIDE-HALF-REPORT")
