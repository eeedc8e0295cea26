"""`make test` runs two pytest processes at once (the Ray tests, and every other test beside them).
These run the real recipe with a stand-in interpreter whose pytest "fails" on request, so the
shell logic is checked in well under a second: a failure on either side must fail the target and
must still print the other side's report."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")

STAND_IN = """#!/usr/bin/env bash
# stand-in for `python -m pytest -m <marker> ...`: prints which half ran, exits as told
# (or, with HOLD_DIR set, records its pid there and waits to be stopped)
marker="$4"
if [ "$marker" = "ray" ]; then
  echo "RAY-HALF-REPORT"
  if [ -n "$HOLD_DIR" ]; then echo $$ > "$HOLD_DIR/ray.pid"; exec sleep 60; fi
  exit "$RAY_EXIT"
fi
echo "BESIDE-HALF-REPORT"
if [ -n "$HOLD_DIR" ]; then echo $$ > "$HOLD_DIR/beside.pid"; exec sleep 60; fi
exit "$BESIDE_EXIT"
"""


def stand_in_venv(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(STAND_IN)
    python.chmod(0o755)
    (venv / ".installed").touch()  # newer than pyproject.toml and the lock: make skips the install
    return venv


def make_test_command(tmp_path: Path) -> list[str]:
    return ["make", "-s", "-C", str(ROOT), "test", f"VENV={stand_in_venv(tmp_path)}"]


def make_test(tmp_path: Path, ray_exit: int, beside_exit: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_EXIT": str(ray_exit), "BESIDE_EXIT": str(beside_exit)}
    return subprocess.run(make_test_command(tmp_path), env=env, capture_output=True, text=True, timeout=60)


def running(pid: int) -> bool:
    """An exited process whose parent is gone stays a zombie until PID 1 reaps it, and some
    containers' PID 1 never does: a zombie has stopped, so it does not count as running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


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


def test_ctrl_c_during_make_test_stops_the_tests_running_beside(tmp_path):
    """A background job of a script ignores SIGINT, so without the recipe's trap the beside tests
    would keep both cores busy for minutes after the user pressed Ctrl-C."""
    env = {**os.environ, "HOLD_DIR": str(tmp_path)}
    make = subprocess.Popen(
        make_test_command(tmp_path), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a terminal's default
    )
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"{half}.pid").exists() for half in ("ray", "beside")):
        assert time.monotonic() < deadline and make.poll() is None, "the two halves did not both start"
        time.sleep(0.05)
    time.sleep(0.2)  # both have exec'd into their sleep
    beside = int((tmp_path / "beside.pid").read_text())
    os.killpg(make.pid, signal.SIGINT)  # what Ctrl-C sends to the foreground process group
    assert make.wait(timeout=30) != 0
    deadline = time.monotonic() + 10
    while running(beside) and time.monotonic() < deadline:
        time.sleep(0.05)
    still_running = running(beside)
    if still_running:
        os.kill(beside, signal.SIGKILL)
    assert not still_running, "the beside tests outlived an interrupted make test"
