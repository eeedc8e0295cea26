"""Training checkpoints: one folder holding `state.pt` and `meta.json`, and, of a sharded
(FSDP) model, one `shard_<rank>.pt` per worker with its shards of the weights and optimiser state.

`meta.json` is written last and records the byte size of `state.pt` (and of every shard file),
so a copy interrupted midway, or a merge missing a worker's shard, is recognised as partial and
never resumed from. Every file is read with `torch.load(weights_only=True)`: a checkpoint on
shared storage is data, never code.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

import torch

from madpo_ray.engine.collectives import all_gather_objects
from madpo_ray.io import atomic_file

CHECKPOINT_META = "meta.json"
STATE_FILE = "state.pt"


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # dropout (e.g. LoRA's) on GPU draws from these
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, rank: int = 0) -> None:
    """`state`: one worker's random streams, or every worker's (a list in rank order, as
    checkpoints hold them: dropout draws differently on each worker). A rank the list lacks (a
    resume on more workers) takes rank 0's."""
    if isinstance(state, list):
        state = state[rank] if rank < len(state) else state[0]
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))  # a safe load returns lists where tuples were
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomically(obj, path: Path) -> int:
    """torch.save under a temporary name, then renamed; returns the file's size."""
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)
    return path.stat().st_size


def write_checkpoint(folder: Path, state: dict, step: int, stage: str, shards: Optional[dict] = None) -> None:
    """state.pt, then meta.json vouching for its size and for the sizes of the workers' shard
    files (`shards`: file name -> bytes, from `write_shard` on every worker)."""
    folder = Path(folder)
    meta = {"step": step, "bytes": save_atomically(state, folder / STATE_FILE), "stage": stage}
    if shards is not None:
        meta["shards"] = shards
    (folder / CHECKPOINT_META).write_text(json.dumps(meta))


def shard_file(rank: int) -> str:
    return f"shard_{rank:05d}.pt"


def write_shard(folder: Path, shard: dict, rank: int, world_size: int) -> Optional[dict]:
    """This worker's shard file; every worker calls it (the sizes are all-gathered). Returns
    {file name: bytes} of every worker's shard on rank 0, None elsewhere."""
    sizes = all_gather_objects(save_atomically(shard, Path(folder) / shard_file(rank)), world_size)
    return {shard_file(r): s for r, s in enumerate(sizes)} if rank == 0 else None


def read_checkpoint(folder: Path, sharded: bool = False) -> dict:
    """The saved state, loaded as plain tensors and containers (no pickled code runs). A sharded
    model's checkpoint must be resumed sharded, and a whole model's whole."""
    meta = json.loads((Path(folder) / CHECKPOINT_META).read_text())
    if sharded != ("shards" in meta):
        written, now = ("fsdp", "ddp") if "shards" in meta else ("ddp", "fsdp")
        raise ValueError(f"checkpoint {folder} was written with ray.strategy={written} and this run uses {now}: "
                         "resume with the same strategy, or redo the stage with --force")
    return torch.load(Path(folder) / STATE_FILE, weights_only=True)


def read_shard(folder: Path, rank: int, world_size: int) -> dict:
    meta = json.loads((Path(folder) / CHECKPOINT_META).read_text())
    if len(meta["shards"]) != world_size:
        raise ValueError(f"checkpoint {folder} holds {len(meta['shards'])} shards and this run has {world_size} "
                         "workers: resume a sharded checkpoint with the number of workers that wrote it")
    return torch.load(Path(folder) / shard_file(rank), weights_only=True)


def checkpoint_step(path: Path) -> Optional[int]:
    """The step of a complete checkpoint folder, or None if it is partial or foreign."""
    try:
        meta = json.loads((Path(path) / CHECKPOINT_META).read_text())
        sizes = {STATE_FILE: meta["bytes"], **meta.get("shards", {})}
        if any((Path(path) / name).stat().st_size != size for name, size in sizes.items()):
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
