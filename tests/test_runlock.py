"""The run-folder lock with two real processes: the second writer is refused at once, with the
holder named; after the holder exits (even killed), the folder is free again."""

import subprocess
import sys
import time

import pytest

from madpo_ray.runlock import RunLock, RunLockedError

HOLD = """
import sys, time
from madpo_ray.runlock import RunLock
with RunLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def hold(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    proc = hold(tmp_path)
    try:
        t0 = time.time()
        with pytest.raises(RunLockedError) as err:
            with RunLock(tmp_path):
                pass
        assert time.time() - t0 < 1  # immediately, not after a wait
        assert f"pid {proc.pid}" in str(err.value) and str(tmp_path / ".lock") in str(err.value)
    finally:
        proc.kill()
        proc.wait()
    with RunLock(tmp_path):  # the kernel released the dead holder's lock
        pass


def test_lock_is_reusable_in_one_process_after_release(tmp_path):
    with RunLock(tmp_path) as lock:
        assert "pid" in lock.holder()
    with RunLock(tmp_path):
        pass


def test_a_symlink_at_the_lock_path_is_refused_and_its_target_untouched(tmp_path):
    """The lock file is truncated and rewritten; following a planted link would clobber its target."""
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (run / ".lock").symlink_to(victim)
    with pytest.raises(RunLockedError, match="symbolic link"):
        with RunLock(run):
            pass
    assert victim.read_text() == "precious"


def test_a_lock_path_that_is_not_a_regular_file_is_refused(tmp_path):
    import os

    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / ".lock")
    with pytest.raises(RunLockedError, match="not a regular file"):
        with RunLock(run):
            pass
