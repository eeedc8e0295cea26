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


FILE_ONLY = {"file_only": True}  # `extra=` of a record the terminal must not show (a traceback Python prints anyway)


class TerminalFilter(logging.Filter):
    """Our own warnings and errors, and the INFO lines of the driver's narrative."""

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name.startswith("madpo_ray")
        return ours and (record.levelno >= logging.WARNING or record.name in TERMINAL_INFO_LOGGERS)


class NotFileOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


def terminal_handler(console: Console, everything: bool) -> logging.Handler:
    from rich.logging import RichHandler

    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
    handler.addFilter(NotFileOnly())
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
    quiet_libraries()


def quiet_libraries() -> None:
    """Ray Train logs every report and transformers draws a bar per weight load: keep our lines readable."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:  # Train V2 logs every report through a logger named after its file path
        from ray.train.v2._internal.execution import context as train_context

        train_context.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):  # pragma: no cover - internal, may move
        pass
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


@contextlib.contextmanager
def quiet_terminal(console: Console, log_path: Path, verbose: bool = False, command: str = ""):
    """Within: our log lines go to `log_path`, and so does everything else the process writes
    (fds 1 and 2: child processes and C code too) unless `verbose`, while `console` writes to the
    terminal. A failure's traceback is logged to the file; Python prints it to the terminal once
    the terminal is back."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(log_path, "a", buffering=1)
    log_file.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} madpo {command}\n")
    output = contextlib.nullcontext() if verbose else output_to_file(console, log_file)
    try:
        with output:
            configure_logging(console, log_file, everything=verbose)
            try:
                yield
            except BaseException as e:
                log_failure(e)
                raise
    finally:
        configure_logging(console)  # no handler may write to the file once it is closed
        log_file.close()


def log_failure(e: BaseException) -> None:
    if isinstance(e, SystemExit) or type(e).__name__ == "Exit":  # typer.Exit: an error already printed
        return
    log = logging.getLogger("madpo_ray.console")
    if isinstance(e, KeyboardInterrupt):
        log.warning("interrupted", extra=FILE_ONLY)
    else:
        log.error("the command failed", exc_info=e, extra=FILE_ONLY)


@contextlib.contextmanager
def output_to_file(console: Console, log_file):
    """fds 1 and 2 append to `log_file`; `console` writes to the terminal they pointed at. Ray is
    shut down before they are restored (its exit messages belong in the file), and they are
    restored even if that fails."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    previous_file, console.file = console.file, terminal
    os.dup2(log_file.fileno(), 1)
    os.dup2(log_file.fileno(), 2)
    try:
        yield
    finally:
        try:
            shutdown_ray()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, target in zip(saved, (1, 2)):
                os.dup2(fd, target)
                os.close(fd)
            console.file = previous_file
            terminal.close()


def shutdown_ray() -> None:
    """Stop the local cluster (if this process started or joined one) while output still goes to the log."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def read_progress(path: Path) -> dict:
    """The training's latest report, {} before the first one (or if unreadable: the bar waits)."""
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
        # No redirection of sys.stdout/stderr: rich would send what Ray prints to the terminal.
        bar = Progress(TextColumn("  {task.description:<14}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[status]}"), console=console, transient=False,
                       redirect_stdout=False, redirect_stderr=False)
        task = bar.add_task(training, total=None, status="starting")
        stop = threading.Event()

        def update() -> None:
            """Draw the latest report; a file that is missing or half-written is the previous state."""
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
                with contextlib.suppress(Exception):  # never hide the training's own exception
                    update()

    return progress
