"""Training checkpoints: one folder holding `state.pt` and `meta.json`.

`meta.json` is written last and records the byte size of `state.pt`, so a copy interrupted
midway is recognised as partial and never resumed from. `state.pt` is read with
`torch.load(weights_only=True)`: a checkpoint on shared storage is data, never code.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Optional

import torch

CHECKPOINT_META = "meta.json"
STATE_FILE = "state.pt"


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # dropout (e.g. LoRA's) on GPU draws from these
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))  # a safe load returns lists where tuples were
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(folder: Path, state: dict, step: int, stage: str) -> None:
    """state.pt under a temporary name, renamed, then meta.json vouching for its size."""
    folder = Path(folder)
    partial = folder / (STATE_FILE + ".partial")
    torch.save(state, partial)
    os.replace(partial, folder / STATE_FILE)
    meta = {"step": step, "bytes": (folder / STATE_FILE).stat().st_size, "stage": stage}
    (folder / CHECKPOINT_META).write_text(json.dumps(meta))


def read_checkpoint(folder: Path) -> dict:
    """The saved state, loaded as plain tensors and containers (no pickled code runs)."""
    return torch.load(Path(folder) / STATE_FILE, weights_only=True)


def checkpoint_step(path: Path) -> Optional[int]:
    """The step of a complete checkpoint folder, or None if it is partial or foreign."""
    try:
        meta = json.loads((Path(path) / CHECKPOINT_META).read_text())
        if (Path(path) / STATE_FILE).stat().st_size != meta["bytes"]:
            return None
        return int(meta["step"])
    except (OSError, ValueError, KeyError):
        return None


def newest_checkpoint(candidates: list) -> Optional[Path]:
    """The complete checkpoint with the highest step among folders (Ray's and any on storage)."""
    best, best_step = None, -1
    for c in candidates:
        step = checkpoint_step(c) if c is not None else None
        if step is not None and step > best_step:
            best, best_step = Path(c), step
    return best


def find_checkpoints(root: Optional[str]) -> list[Path]:
    return sorted(Path(root).glob("checkpoint_*")) if root and Path(root).exists() else []
