"""One writer per run folder: `madpo run` and `madpo tune` (or two RayJobs on shared storage)
must not write the same runs/<name>/ at once, or stages read half-written artifacts.

    with RunLock(run_dir):
        ...  # the only writer; a second one fails at once, naming this one

fcntl.flock on <run_dir>/.lock: the kernel drops the lock when the holder dies (no stale lock
to clean up by hand), and the file records who holds it, for the refusal message.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import stat
import sys
import time
from pathlib import Path

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """Another process is writing this run folder."""


HELD_HERE: dict[str, int] = {}  # lock files this process holds, with their nesting depth


class RunLock:
    """Re-entrant within one process (compare and tune run the pipeline's stages under their own
    lock); exclusive across processes."""

    def __init__(self, run_dir: Path | str):
        self.path = Path(run_dir) / LOCK_NAME
        self.key = str(self.path.resolve())
        self.fd: int | None = None

    def holder(self) -> str:
        """Who holds the lock, as recorded in the lock file (best effort: it may be mid-write)."""
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return "unknown process"
        return f"pid {info.get('pid')} on {info.get('host')} ({info.get('command')}, since {info.get('since')})"

    def __enter__(self) -> "RunLock":
        if HELD_HERE.get(self.key):
            HELD_HERE[self.key] += 1
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = self.open_lock_file()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(f"{self.path.parent} is being written by {self.holder()}; wait for it to finish "
                                 f"or use another run name (lock file: {self.path})") from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:200],
                  "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        HELD_HERE[self.key] = 1
        return self

    def open_lock_file(self) -> int:
        """The lock file, opened without following a symlink and only if it is a regular file: the
        lock is truncated and rewritten, so a link planted at .lock would otherwise clobber its target."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if self.path.is_symlink():
                raise RunLockedError(f"{self.path} is a symbolic link; a run's lock file must be a regular file "
                                     "(remove the link)") from None
            raise RunLockedError(f"cannot open the lock file {self.path}: {e.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise RunLockedError(f"{self.path} is not a regular file; a run's lock file must be one")
        return fd

    def __exit__(self, *exc) -> None:
        HELD_HERE[self.key] = HELD_HERE.get(self.key, 1) - 1
        if HELD_HERE[self.key] > 0:
            return
        HELD_HERE.pop(self.key, None)
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
