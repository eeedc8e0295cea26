"""Model folders on shared storage: refuse corrupt weights with one clear line. (Replacing a
folder so that a reader sees the old model or the new, never half: io.replace_folder_atomically.)
"""

from __future__ import annotations

import json
import struct
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
