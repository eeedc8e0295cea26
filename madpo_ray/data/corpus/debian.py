"""A real document-to-summary corpus: Debian package descriptions.

The long description is the document, the one-line synopsis its human-written summary.
`madpo data debian` fetches the English Translation lists with apt into a private lists
directory, filters, and splits train/validation/test *by source package* (binary packages
from one source share wording, so splitting by binary package would leak). The result
lives in a local cache and is never committed: each text belongs to its package's authors.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterable, Iterator

from madpo_ray.data.preference import write_jsonl
from madpo_ray.io import read_jsonl

log = logging.getLogger(__name__)
DEFAULT_CACHE = Path.home() / ".cache" / "madpo-ray" / "debian"
BOILERPLATE = re.compile(
    r"transitional (dummy )?package|debug(ging)? symbols|this package contains the (documentation|header|"
    r"development|static)|metapackage|virtual package|documentation for|dummy package", re.I)


def parse_stanzas(text: str) -> Iterator[dict[str, str]]:
    """RFC-822-style stanzas separated by blank lines; continuation lines keep their newlines."""
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line
            elif ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.strip()
        if fields:
            yield fields


def long_description_text(lines: str) -> str:
    """Continuation lines: one leading space each, ' .' marks a paragraph break."""
    paras, current = [], []
    for line in lines.splitlines():
        line = line[1:] if line.startswith(" ") else line
        if line.strip() == ".":
            paras.append(" ".join(current))
            current = []
        else:
            current.append(line.strip())
    paras.append(" ".join(current))
    return " ".join(p for p in paras if p)


def parse_translation(text: str) -> dict[str, tuple[str, str]]:
    """package -> (synopsis, long description)."""
    out = {}
    for st in parse_stanzas(text):
        desc = st.get("Description-en")
        if "Package" not in st or not desc:
            continue
        synopsis, _, rest = desc.partition("\n")
        out[st["Package"]] = (synopsis.strip(), long_description_text(rest))
    return out


def parse_sources(text: str) -> dict[str, str]:
    """binary package -> source package (the Source field without its version)."""
    out = {}
    for st in parse_stanzas(text):
        if "Package" in st:
            out[st["Package"]] = st.get("Source", st["Package"]).split()[0]
    return out


def split_of(source_package: str, val_frac: float = 0.05, test_frac: float = 0.05) -> str:
    """Stable hash split: every binary package of one source lands in the same split."""
    u = int(hashlib.sha256(source_package.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if u < test_frac else "validation" if u < test_frac + val_frac else "train"


def build_records(translations: dict[str, tuple[str, str]], sources: dict[str, str],
                  min_doc_words: int = 30, max_doc_words: int = 120,
                  min_summary_words: int = 3, max_summary_words: int = 12) -> dict[str, list[dict]]:
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    seen: set[str] = set()
    for pkg in sorted(translations):
        synopsis, document = translations[pkg]
        n_doc, n_sum = len(document.split()), len(synopsis.split())
        if not (min_doc_words <= n_doc <= max_doc_words and min_summary_words <= n_sum <= max_summary_words):
            continue
        if BOILERPLATE.search(synopsis) or BOILERPLATE.search(document):
            continue
        key = " ".join(document.lower().split())
        if key in seen:
            continue
        seen.add(key)
        source = sources.get(pkg, pkg)
        splits[split_of(source)].append({"doc_id": f"deb-{pkg}", "package": pkg, "source_package": source,
                                         "document": document, "reference": synopsis})
    return splits


def _read_lists(lists_dir: Path, pattern: str) -> Iterable[str]:
    for f in sorted(lists_dir.glob(pattern)):
        if f.suffix == ".lz4":
            yield subprocess.run(["lz4cat", str(f)], check=True, capture_output=True, text=True).stdout
        elif f.suffix in ("", ".txt") or f.name.endswith("_Packages") or "Translation" in f.name:
            yield f.read_text(errors="replace")


def fetch_lists(lists_dir: Path) -> None:
    """apt-get update into a private lists directory (needs root and apt's network)."""
    if not shutil.which("apt-get"):
        raise RuntimeError("apt-get not found: the Debian corpus needs a Debian/Ubuntu machine")
    (lists_dir / "partial").mkdir(parents=True, exist_ok=True)
    cmd = ["apt-get", "update", "-o", "Acquire::Languages=en", "-o", f"Dir::State::Lists={lists_dir}"]
    log.info("running %s", " ".join(cmd))
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def build_debian_corpus(cache_dir: Path = DEFAULT_CACHE, fetch: bool = True) -> dict[str, int]:
    cache_dir = Path(cache_dir)
    lists_dir = cache_dir / "lists"
    if fetch:
        fetch_lists(lists_dir)
    translations: dict[str, tuple[str, str]] = {}
    for text in _read_lists(lists_dir, "*Translation-en*"):
        translations.update(parse_translation(text))
    sources: dict[str, str] = {}
    for text in _read_lists(lists_dir, "*_Packages*"):
        sources.update(parse_sources(text))
    if not translations:
        raise RuntimeError(f"no Translation-en lists under {lists_dir}; did apt-get update reach Debian's mirrors?")
    splits = build_records(translations, sources)
    for name, rows in splits.items():
        write_jsonl(rows, cache_dir / f"{name}.jsonl")
    counts = {k: len(v) for k, v in splits.items()}
    log.info("Debian corpus: %s -> %s", counts, cache_dir)
    return counts


def load_debian_split(split: str, cache_dir: Path = DEFAULT_CACHE) -> list[dict]:
    path = Path(cache_dir) / f"{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: run `madpo data debian` first")
    return read_jsonl(path)
