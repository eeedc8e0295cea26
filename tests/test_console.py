"""The quiet terminal (madpo_ray/console.py), in a fresh process so that its file descriptors
are its own: what libraries, child processes and C code write goes to the run's log file;
the terminal keeps our narrative, our warnings, progress bars and errors."""

import subprocess
import sys
import textwrap


SCRIPT = textwrap.dedent("""
    import json, logging, os, subprocess, sys, threading, time
    from pathlib import Path
    from rich.console import Console
    from madpo_ray.console import quiet_terminal, training_progress

    log_path, progress_path, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    verbose = mode == "verbose"
    console = Console(width=100, force_terminal=mode == "tty")  # tty: the bar redraws as on a real terminal
    with quiet_terminal(console, log_path, verbose=verbose, command="run"):
        logging.getLogger("madpo_ray.pipeline").info("== sft: running (not run yet)")
        logging.getLogger("madpo_ray.models").info("built tiny base model")
        logging.getLogger("madpo_ray.train").warning("effective batch 30 is not a multiple of 8")
        logging.getLogger("ray.train").warning("PreemptionWatcher has max_restarts > 0")
        print("(RayTrainWorker pid=1) [sft] step 2/16")
        os.write(2, b"core_worker.cc:2465: an error line from C++\\n")
        subprocess.run(["echo", "a line from a child process"], check=True)
        console.print("summary table")

        def train():
            for step in range(1, 9):
                tmp = progress_path.with_suffix(".tmp")
                tmp.write_text(json.dumps({"step": step, "total_steps": 8, "loss": 1.0 / step,
                                           "tokens_per_s": 1000.0, "eta_s": 8 - step}))
                tmp.replace(progress_path)
                print(f"(RayTrainWorker pid=2) a worker line at step {step}")  # Ray prints while a bar shows
                time.sleep(0.2)

        with training_progress(console)("sft", progress_path):
            train()
        if os.environ.get("CRASH"):
            raise ValueError("something broke")
    logging.getLogger("madpo_ray.pipeline").info("a line after the log file is closed")
""")


def _run(tmp_path, mode="quiet", crash=False):
    env = {"PATH": "/usr/bin:/bin", **({"CRASH": "1"} if crash else {})}
    log, progress = tmp_path / "logs" / "madpo.log", tmp_path / "progress.json"
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(log), str(progress), mode], capture_output=True,
                         text=True, timeout=120, env=env)
    return out, log.read_text()


INTERNALS = ("built tiny base model", "PreemptionWatcher", "[sft] step 2/16", "core_worker.cc", "a line from a child process",
             "a worker line at step 4")


def test_the_terminal_keeps_the_narrative_and_the_log_file_gets_everything(tmp_path):
    out, log = _run(tmp_path)
    terminal = out.stdout + out.stderr
    assert out.returncode == 0, terminal
    for line in ("== sft: running", "effective batch 30 is not a multiple", "summary table"):
        assert line in terminal
    for line in INTERNALS:
        assert line not in terminal, line
        assert line in log, line
    assert "== sft: running" in log and "WARNING madpo_ray.train: effective batch" in log
    bar = [line for line in terminal.splitlines() if line.strip().startswith("sft")]
    assert len(bar) == 1 and "8/8" in bar[0] and "loss 0.1250" in bar[0] and "1000 tok/s" in bar[0]
    assert len(terminal.splitlines()) <= 6


def test_on_a_terminal_the_bar_moves_and_ray_lines_stay_in_the_file(tmp_path):
    """A real terminal redraws the bar as the training reports; what Ray prints meanwhile must not
    be routed to the terminal by the bar (rich's stdout redirection)."""
    import re

    out, log = _run(tmp_path, "tty")
    terminal = out.stdout + out.stderr
    assert out.returncode == 0, terminal
    assert "a worker line at step 4" in log and "a worker line" not in terminal
    assert re.search(r"[^0-9][1-7]/8[^0-9]", terminal), terminal  # an intermediate state was drawn
    assert "8/8" in terminal


def test_verbose_shows_everything_and_still_logs_our_lines(tmp_path):
    out, log = _run(tmp_path, "verbose")
    terminal = out.stdout + out.stderr
    for line in INTERNALS:
        assert line in terminal, line
    assert "INFO madpo_ray.models: built tiny base model" in log
    assert "Logging error" not in terminal and "a line after the log file is closed" in terminal


def test_a_crash_shows_its_traceback_in_the_terminal_and_the_log(tmp_path):
    out, log = _run(tmp_path, crash=True)
    assert out.returncode == 1
    assert (out.stdout + out.stderr).count("ValueError: something broke") == 1  # Python's, not ours again
    assert "the command failed" in log and "ValueError: something broke" in log
    assert "PreemptionWatcher" not in out.stdout + out.stderr
