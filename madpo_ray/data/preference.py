"""Load and validate preference pairs (prompt / chosen / rejected).

Sources: a JSONL, JSON or parquet file, a folder saved by `datasets`, or a Hugging Face
dataset name (`load_dataset("org/name")`, needs a network). Formats: standard (strings)
or conversational (lists of {role, content} messages; the chat template is applied when
tokenising). Bad rows are skipped and reported by row number, field and reason; in strict
mode the first bad row raises instead. Nothing is skipped silently.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from madpo_ray.io import write_jsonl  # noqa: F401  (re-exported: data users write pairs with it)

REQUIRED = ("prompt", "chosen", "rejected")


class DataValidationError(ValueError):
    """Bad input data; the message names the row, the field and the reason."""


@dataclass
class Issue:
    row: int  # 0-based row index in the source (line number - 1 for JSONL)
    field: str
    reason: str

    def __str__(self) -> str:
        return f"row {self.row}, field '{self.field}': {self.reason}"


@dataclass
class ValidationReport:
    source: str = ""
    total: int = 0
    kept: int = 0
    truncated: int = 0  # rows kept but cut by the truncation policy
    issues: list[Issue] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.issues)

    def counts(self) -> dict[str, int]:
        return dict(Counter(i.reason.split(":")[0] for i in self.issues))

    def add(self, row: int, fld: str, reason: str, strict: bool) -> None:
        issue = Issue(row, fld, reason)
        if strict:
            raise DataValidationError(f"{self.source}: {issue}")
        self.issues.append(issue)

    def to_metrics(self) -> dict:
        return {"rows_total": self.total, "rows_kept": self.kept, "rows_skipped": self.skipped,
                "rows_truncated": self.truncated,
                "skipped_by_reason": self.counts(), "first_issues": [str(i) for i in self.issues[:20]]}

    def summary(self) -> str:
        text = f"{self.source}: kept {self.kept}/{self.total} rows"
        if self.issues:
            text += f", skipped {self.skipped} ({self.counts()}); first: {self.issues[0]}"
        return text


# --------------------------------------------------------------------------- reading
def _read_jsonl_rows(path: Path, report: ValidationReport, strict: bool) -> list[tuple[int, Any]]:
    rows = []
    with open(path, "rb") as fh:
        for i, raw in enumerate(fh):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                report.add(i, "*", f"not UTF-8: byte {e.start} of the line", strict)
                continue
            try:
                rows.append((i, json.loads(text)))
            except json.JSONDecodeError as e:
                report.add(i, "*", f"malformed JSON: {e.msg} at column {e.colno}", strict)
            except RecursionError:  # thousands of nested brackets exhaust the parser's stack
                report.add(i, "*", "malformed JSON: nested too deeply", strict)
    return rows


def single_file_without(source: str, split: str) -> bool:
    """Whether `source` is one data file that cannot hold `split`: a .jsonl or .parquet file is a
    single split, a .json file holds named splits only as {split: [rows]}. Reading `split` from it
    would return the training rows again, and a "held-out" set equal to the training set."""
    path = Path(source)
    if not path.is_file():
        return False
    if path.suffix.lower() != ".json":
        return True
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False  # let the loader report the error with its row
    return not (isinstance(data, dict) and split in data)


def read_raw_rows(source: str, split: str = "train", strict: bool = False,
                  report: Optional[ValidationReport] = None) -> tuple[list[tuple[int, Any]], ValidationReport]:
    """(row index, raw row) pairs from any supported source, before validation."""
    report = report or ValidationReport(source=str(source))
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _read_jsonl_rows(path, report, strict), report
        if suffix == ".json":
            try:
                data = json.loads(path.read_bytes().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataValidationError(f"{path}: cannot read JSON: {e}") from None
            except RecursionError:
                raise DataValidationError(f"{path}: cannot read JSON: nested too deeply") from None
            if isinstance(data, dict) and split in data:
                data = data[split]
            if not isinstance(data, list):
                raise DataValidationError(f"{path}: expected a JSON list of rows (or {{split: [rows]}})")
            return list(enumerate(data)), report
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(path)
            except Exception as e:  # pyarrow raises several types for truncated/corrupt files
                raise DataValidationError(f"{path}: cannot read parquet: {e}") from None
            return list(enumerate(table.to_pylist())), report
        raise DataValidationError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json or .parquet)")
    # A datasets folder (save_to_disk), a folder of data files, or a hub name.
    ds = load_hf_dataset(str(source), split)
    return list(enumerate(ds)), report


def load_hf_dataset(name_or_path: str, split: str = "train"):
    """`load_from_disk` for a saved folder, else `load_dataset` (a local folder or a hub name)."""
    import datasets

    path = Path(name_or_path)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    try:
        return datasets.load_dataset(name_or_path, split=split)
    except FileNotFoundError as e:
        raise DataValidationError(f"dataset {name_or_path!r} not found locally and not on the hub: {e}") from None


# --------------------------------------------------------------------------- validation
def is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


# C0 control characters other than tab, newline and carriage return (and DEL): never text a person
# wrote, often a sign of a binary or mis-decoded file, and a NUL cuts strings short in C libraries.
CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _check_text(value: Any, fld: str) -> Optional[str]:
    """None if the field is a usable string or message list, else the reason."""
    if value is None:
        return "missing"
    if is_messages(value):
        if not value:
            return "empty message list"
        for j, m in enumerate(value):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return f"message {j} needs string 'role' and 'content'"
            err = _check_text(m["content"], fld)
            if err:
                return f"message {j}: {err}"
        return None
    if not isinstance(value, str):
        return f"not a string or message list (got {type(value).__name__})"
    if not value.strip():
        return "empty"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "not UTF-8 (lone surrogate)"
    bad = CONTROL_CHARACTERS.search(value)
    if bad:
        return f"control character: U+{ord(bad.group()):04X} at position {bad.start()}"
    return None


def _content(value: Any) -> str:
    return "\n".join(m["content"] for m in value) if is_messages(value) else value


def margin_problem(row: dict, column: str = "margin") -> Optional[str]:
    """Why a row's given margin (or margin_std) is unusable, or None (absent and null are fine)."""
    m = row.get(column)
    if m is None:
        return None
    if isinstance(m, bool) or not isinstance(m, (int, float)):
        return f"not a number (got {type(m).__name__})"
    try:
        value = float(m)  # an integer of 400 digits does not fit a float
    except OverflowError:
        return "not finite: an integer too large for a float"
    if not math.isfinite(value):
        return f"not finite: {value}"
    return None


def validate_rows(rows: Iterable[tuple[int, Any]], report: ValidationReport, strict: bool = False) -> list[dict]:
    kept = []
    for idx, row in rows:
        report.total += 1
        if not isinstance(row, dict):
            report.add(idx, "*", f"row is not an object (got {type(row).__name__})", strict)
            continue
        bad = False
        for fld in REQUIRED:
            err = _check_text(row.get(fld), fld)
            if err:
                report.add(idx, fld, err, strict)
                bad = True
                break
        if bad:
            continue
        if _content(row["chosen"]).strip() == _content(row["rejected"]).strip():
            report.add(idx, "rejected", "identical to chosen", strict)
            continue
        reason = margin_problem(row)
        if reason:
            report.add(idx, "margin", reason, strict)
            continue
        reason = margin_problem(row, "margin_std")
        if reason or (row.get("margin_std") is not None and row["margin_std"] < 0):
            report.add(idx, "margin_std", reason or f"negative: {row['margin_std']}", strict)
            continue
        out = dict(row)
        out.setdefault("row_id", idx)
        kept.append(out)
    report.kept += len(kept)
    return kept


def load_pairs(source: str, split: str = "train", strict: bool = False) -> tuple[list[dict], ValidationReport]:
    """Validated pairs and the report of what was skipped and why."""
    raw, report = read_raw_rows(source, split, strict)
    pairs = validate_rows(raw, report, strict)
    if not pairs:
        raise DataValidationError(f"{source}: no usable rows ({report.summary()})")
    return pairs, report


def prompt_key(row: dict) -> str:
    """A pair's prompt as one string (a conversational prompt is a message list)."""
    p = row["prompt"]
    return p if isinstance(p, str) else json.dumps(p, sort_keys=True)


def hold_out_by_prompt(pairs: list[dict], n: int, rng: random.Random) -> tuple[list[dict], list[dict]]:
    """About `n` pairs held out of `pairs` by whole prompts (in a shuffled prompt order), and the
    rest: a dataset with several pairs per prompt must not put one prompt on both sides of a split."""
    groups: dict[str, list[dict]] = {}
    for r in pairs:
        groups.setdefault(prompt_key(r), []).append(r)
    order = list(groups)
    rng.shuffle(order)
    held, k = [], 0
    while k < len(order) and len(held) < n:
        held += groups[order[k]]
        k += 1
    rest = [r for key in order[k:] for r in groups[key]]
    return held, rest
