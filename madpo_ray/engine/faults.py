"""Fault injection for the resume tests, as a session wrapper a `launcher.Training` may ask for:
the training loop and the stage functions never know it is there."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger(__name__)


class FaultInjectingSession:
    """Wraps a session: SIGKILLs rank 0 once after optimiser step `fail_at_step` (a marker file in
    `marker_dir` makes it once per run, so the restarted worker trains on), and appends every
    step's example indices to `batch_log_path` (so a test can see which batches a resumed
    training replayed)."""

    def __init__(self, inner, fail_at_step: Optional[int] = None, marker_dir: Optional[str] = None,
                 batch_log_path: Optional[str] = None):
        self.inner, self.fail_at_step, self.marker_dir = inner, fail_at_step, marker_dir
        self.batch_log_path = batch_log_path

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def after_step(self, step: int, batches: Sequence[dict] = ()) -> None:
        self.log_batches(step - 1, batches)  # the step's index: the batches were drawn before it counted
        self.inner.after_step(step, batches)
        if self.fail_at_step is None or step != self.fail_at_step or self.info.rank != 0 or not self.marker_dir:
            return
        marker = Path(self.marker_dir) / f"killed_at_{step}"
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(os.getpid()))
        log.warning("fault injection: SIGKILL worker pid %d at step %d", os.getpid(), step)
        os.kill(os.getpid(), signal.SIGKILL)

    def log_batches(self, step_index: int, batches: Sequence[dict]) -> None:
        if not self.batch_log_path:
            return
        with open(self.batch_log_path, "a") as fh:
            for b in batches:
                indices = b["index"].tolist() if "index" in b else []
                fh.write(" ".join(map(str, indices)) + f" step={step_index} rank={self.info.rank}\n")
