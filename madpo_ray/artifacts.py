"""Model folders on shared storage: refuse corrupt weights with one clear line, and replace a
folder so that a reader (a restarting Serve replica) sees the old model or the new, never half.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from pathlib import Path

from madpo_ray.models import ModelLoadError


def verify_weights(folder: Path | str) -> None:
    """Every *.safetensors in the folder has a readable header whose tensors fit the file.

    A truncated copy or an interrupted write otherwise surfaces as a library traceback deep
    inside from_pretrained (or, worse, as a model that loads with garbage)."""
    from safetensors import SafetensorError, safe_open

    for f in sorted(Path(folder).glob("*.safetensors")):
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                (header_len,) = struct.unpack("<Q", fh.read(8))
                if header_len > size - 8:
                    raise ValueError(f"header of {header_len} bytes in a {size}-byte file")
                header = json.loads(fh.read(header_len))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            if 8 + header_len + end != size:
                raise ValueError(f"tensors need {8 + header_len + end} bytes, the file has {size} (truncated?)")
            with safe_open(str(f), framework="pt") as st:
                list(st.keys())
        except (struct.error, ValueError, KeyError, TypeError, OSError, SafetensorError) as e:
            raise ModelLoadError(f"{f}: corrupt safetensors file ({e})") from None


def fsync_tree(folder: Path) -> None:
    """Flush every file and directory under `folder` to disk (a rename is durable only after)."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(root))


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_folder_atomically(tmp: Path | str, dest: Path | str) -> None:
    """Move the fully written `tmp` to `dest`. The contents are fsynced first; the old `dest` is
    renamed aside, the new one renamed in, then the old one deleted. At every instant `dest` is
    absent only between two renames (a reader retries), and never partially written. The aside
    name is fresh (never a sibling that happens to exist, which may be someone's backup); a crash
    between the renames leaves it for a person to look at, never deleted by the next run."""
    tmp, dest = Path(tmp), Path(dest)
    fsync_tree(tmp)
    old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:12]}")
    if dest.exists():
        os.rename(dest, old)
    os.rename(tmp, dest)
    fsync_dir(dest.parent)
    if old.exists():
        shutil.rmtree(old)
