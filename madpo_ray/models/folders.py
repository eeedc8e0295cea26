"""Model folders on shared storage, checked before anything loads them: a missing config or
weights, or a truncated safetensors file, is one clear line naming the folder, not a library
traceback deep inside from_pretrained (or a model that loads with garbage)."""

from __future__ import annotations

import json
import struct
from pathlib import Path


class ModelLoadError(RuntimeError):
    """A model or tokenizer folder that cannot be loaded (missing weights, bad config)."""


def check_model_folder(path: str) -> None:
    """Fail in the driver, with the folder named, before a Ray job would fail in a worker."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: model folder does not exist")
    check_model_files(path)


def check_model_files(path: str) -> None:
    """A local folder (hub names pass) must hold config.json and weights."""
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelLoadError(f"{p}: no config.json; not a saved model folder")
        if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")) and not any(p.glob("*.gguf")):
            raise ModelLoadError(f"{p}: no weights (*.safetensors / *.bin) in the folder")
        verify_weights(p)  # a truncated or corrupt file is one clear line, not a library traceback


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
