"""Small file helpers. Every write goes to a temp name and is renamed into place, so a crash
(or a full disk) never leaves a half-written artifact that a later stage would trust."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_jsonl(rows: Iterable[dict], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    try:
        with open(tmp, "w") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        tmp.replace(path)
    except BaseException:  # a full disk or an interrupt: leave neither the target nor the temp half-written
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=float))
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------- output folders a user names
# A command that writes a folder the user names (`madpo export --out`, `madpo model import-gguf OUT`)
# replaces it only when that folder is its own: absent, empty, or carrying this marker, which every
# such command writes. Anything else is the user's, and `--force` is the only way past.
OUTPUT_MARKER = ".madpo-output"


class OutputExistsError(RuntimeError):
    """The output folder holds something this project did not write there."""


def check_output_folder(path: Path, force: bool = False) -> None:
    """Refuse to replace `path` unless it is absent, an empty folder, a folder a madpo command wrote
    (it has OUTPUT_MARKER), or `force` is given. A file or a symlink is never replaced."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise OutputExistsError(f"{path} exists and is not a folder (a file or a link): choose another output path")
    if not path.exists() or force or (path / OUTPUT_MARKER).is_file() or not any(path.iterdir()):
        return
    raise OutputExistsError(f"{path} exists, is not empty and was not written by madpo (no {OUTPUT_MARKER} in it): "
                            "choose another output folder, or pass --force to replace it")


def mark_output_folder(folder: Path, command: str) -> None:
    """Sign a folder as this command's output, so the next run of a madpo command may replace it."""
    (Path(folder) / OUTPUT_MARKER).write_text(json.dumps({"written_by": command}) + "\n")


def fresh_sibling_dir(path: Path, tag: str) -> Path:
    """A new, empty hidden folder beside `path` (".<name>.<tag>-XXXX") to write into before a rename:
    never a name that may already hold something. Made with the usual permissions (mkdtemp's 0700
    would make a model folder unreadable to a server running as another user)."""
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{tag}-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp
