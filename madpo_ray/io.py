"""File writes with one guarantee, and the helpers around them.

Every write, of a file or of a folder, goes to a fresh temporary sibling, is flushed to disk
(fsync), and is renamed into place; the parent folder is fsynced after the rename. A crash, a
full disk or an interrupt therefore leaves either the old artifact or the new one, never half of
one that a later stage (or a Serve replica) would trust, and never a name that already held
something else: temporary names are fresh, so no write deletes what it did not create.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterable, Iterator


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file and directory under `folder` to disk (a rename is durable only after)."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(root))


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside `path`; write it inside the block. On success it is
    fsynced and renamed to `path`; on any error it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_umask() -> int:
    """The process's umask, read once at import: reading it means setting it, and a thread creating
    a file in that instant would get loose permissions."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


UMASK = read_umask()


def write_text_atomically(path: Path, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_jsonl(rows: Iterable[dict], path: Path) -> Path:
    with atomic_file(path) as tmp, open(tmp, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return Path(path)


def write_json(path: Path, data: dict) -> Path:
    return write_text_atomically(path, json.dumps(data, indent=2, default=float))


@contextlib.contextmanager
def atomic_folder(dest: Path) -> Iterator[Path]:
    """Yield a fresh folder beside `dest` to fill; on success it replaces `dest` (replace_folder_atomically),
    on any error it is removed (it is ours) and `dest` is left as it was."""
    tmp = fresh_sibling_dir(dest)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder_atomically(tmp, dest)


def replace_folder_atomically(tmp: Path | str, dest: Path | str) -> None:
    """Move the fully written folder `tmp` (from fresh_sibling_dir) to `dest`. The contents are
    fsynced first; the old `dest` is renamed aside, the new one renamed in, then the old one deleted.
    At every instant `dest` is absent only between two renames (a reader retries), and never
    partially written. The aside name is fresh (never a sibling that happens to exist, which may be
    someone's backup); a crash between the renames leaves it for a person to look at."""
    tmp, dest = Path(tmp), Path(dest)
    fsync_tree(tmp)
    old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:12]}")
    if dest.exists():
        os.rename(dest, old)
    os.rename(tmp, dest)
    fsync_dir(dest.parent)
    if old.exists():
        shutil.rmtree(old)


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


def fresh_sibling_dir(path: Path, tag: str = "partial") -> Path:
    """A new, empty hidden folder beside `path` (".<name>.<tag>-XXXX") to write into before
    replace_folder_atomically: never a name that may already hold something. Made with the usual
    permissions (mkdtemp's 0700 would make a model folder unreadable to a server running as another user)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{tag}-"))
    os.chmod(tmp, 0o777 & ~UMASK)
    return tmp
