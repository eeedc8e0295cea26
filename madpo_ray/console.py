"""What a person sees in the terminal during a long command, and where the rest goes.

By default (`quiet_terminal`) file descriptors 1 and 2 of the process point at the run
folder's log (logs/madpo.log), so everything Ray, Ray Data, vLLM, warnings and C extensions
write lands there, with our own log lines. The terminal keeps: the stage lines of the
pipeline's log, warnings and errors of our own code, a progress bar per training
(`training_progress`) and the summary. `--verbose` writes everything to the terminal as
before and our log lines to the log file too.

Progress bars are fed by the small JSON file that rank 0 of the training rewrites at every
report (tracking.write_progress): the driver never needs a channel into the Ray workers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

from rich.console import Console

# Loggers whose INFO lines reach the terminal: the driver's narrative (stage start and end).
TERMINAL_INFO_LOGGERS = ("madpo_ray.pipeline", "madpo_ray.compare", "madpo_ray.tune", "madpo_ray.study")
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TerminalFilter(logging.Filter):
    """Our own warnings and errors, and the INFO lines of the driver's narrative."""

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name.startswith("madpo_ray")
        return ours and (record.levelno >= logging.WARNING or record.name in TERMINAL_INFO_LOGGERS)


def terminal_handler(console: Console, everything: bool) -> logging.Handler:
    from rich.logging import RichHandler

    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
    if not everything:
        handler.addFilter(TerminalFilter())
    return handler


def configure_logging(console: Console, log_file=None, everything: bool = False) -> None:
    """Root logging: the terminal (every INFO line, or only our narrative and warnings) and, when
    given, the log file (everything)."""
    handlers = [terminal_handler(console, everything)]
    if log_file is not None:
        to_file = logging.StreamHandler(log_file)
        to_file.setFormatter(logging.Formatter(FILE_FORMAT))
        handlers.append(to_file)
    logging.basicConfig(level=logging.INFO, format="%(message)s", datefmt="[%X]", handlers=handlers, force=True)
    from madpo_ray.stages.worker import quiet_libraries

    quiet_libraries()


@contextlib.contextmanager
def quiet_terminal(console: Console, log_path: Path, verbose: bool = False, command: str = ""):
    """Within: the process's stdout and stderr (fds 1 and 2, so child processes and C code too)
    append to `log_path`, and `console` writes to the terminal. Restored on the way out, before
    an exception's traceback is printed (the traceback is logged to the file first)."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(log_path, "a", buffering=1)
    log_file.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} madpo {command}\n")
    if verbose:
        configure_logging(console, log_file, everything=True)
        try:
            yield
        finally:
            log_file.close()
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    previous_file = console.file
    console.file = terminal
    os.dup2(log_file.fileno(), 1)
    os.dup2(log_file.fileno(), 2)
    configure_logging(console, sys.stderr)  # sys.stderr writes to fd 2: the log file
    try:
        yield
    except BaseException as e:
        if not isinstance(e, SystemExit) and type(e).__name__ != "Exit":
            logging.getLogger("madpo_ray").exception("the command failed")
        raise
    finally:
        shutdown_ray()  # its exit messages belong in the file too
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        console.file = previous_file
        configure_logging(console)
        terminal.close()
        log_file.close()


def shutdown_ray() -> None:
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def read_progress(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def training_progress(console: Console):
    """A Pipeline `progress` factory: a bar per training with steps, loss, tokens/s and ETA."""

    @contextlib.contextmanager
    def progress(training: str, progress_path: Path):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        Path(progress_path).unlink(missing_ok=True)  # a previous attempt's last report is not this one's
        bar = Progress(TextColumn("  {task.description:<14}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[status]}"), console=console, transient=False)
        task = bar.add_task(training, total=None, status="starting")
        stop = threading.Event()

        def update() -> None:
            p = read_progress(progress_path)
            if p:
                status = (f"loss {p.get('loss', float('nan')):.4f}  {p.get('tokens_per_s', 0):.0f} tok/s  "
                          f"eta {p.get('eta_s', 0):.0f}s")
                bar.update(task, completed=p.get("step", 0), total=p.get("total_steps"), status=status)

        def poll() -> None:
            while not stop.wait(0.5):
                update()

        thread = threading.Thread(target=poll, daemon=True)
        with bar:
            thread.start()
            try:
                yield
            finally:
                stop.set()
                thread.join()
                update()

    return progress
