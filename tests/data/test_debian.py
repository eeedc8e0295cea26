"""The Debian corpus builder's parsing, filtering and leak-free split, on snippets written here."""

import os
from pathlib import Path

import pytest

from madpo_ray.data.corpus.debian import (DEFAULT_CACHE, build_records, load_debian_split, parse_sources,
                                          parse_translation, split_of)

LONG = " ".join(f"word{i}" for i in range(40))
TRANSLATION = f"""Package: frobnicate
Description-md5: 0123
Description-en: tool to frobnicate widgets quickly
 First paragraph {LONG}
 .
 Second paragraph here.

Package: frobnicate-dbg
Description-md5: 4567
Description-en: debugging symbols for frobnicate
 {LONG}

Package: tiny
Description-md5: 89ab
Description-en: too short
 only a few words

Package: libfrob1
Description-md5: cdef
Description-en: shared library for frobnicating widgets
 Another text {LONG}
"""
PACKAGES = """Package: libfrob1
Source: frobnicate (1.2-3)
Version: 1.2-3

Package: frobnicate
Version: 1.2-3
"""


def test_parse_translation_and_sources():
    t = parse_translation(TRANSLATION)
    assert t["frobnicate"][0] == "tool to frobnicate widgets quickly"
    assert t["frobnicate"][1].startswith("First paragraph word0") and t["frobnicate"][1].endswith("Second paragraph here.")
    assert parse_sources(PACKAGES) == {"libfrob1": "frobnicate", "frobnicate": "frobnicate"}


def test_filters_and_split_by_source_package():
    splits = build_records(parse_translation(TRANSLATION), parse_sources(PACKAGES))
    rows = [r for rs in splits.values() for r in rs]
    assert {r["package"] for r in rows} == {"frobnicate", "libfrob1"}  # -dbg boilerplate and 'tiny' dropped
    # Both binaries of source 'frobnicate' land in the same split.
    assert len({name for name, rs in splits.items() for r in rs}) == 1
    assert split_of("frobnicate") == split_of("frobnicate")


@pytest.mark.skipif(not (Path(os.environ.get("MADPO_DEBIAN_CACHE", DEFAULT_CACHE)) / "train.jsonl").exists(),
                    reason="run `madpo data debian` to build the local Debian corpus cache")
def test_gold_ordering_on_debian_corpus():
    from madpo_ray.data.testbed import mean_gold_by_kind

    docs = load_debian_split("test", Path(os.environ.get("MADPO_DEBIAN_CACHE", DEFAULT_CACHE)))[:300]
    g = mean_gold_by_kind(docs)
    assert g["reference"] > g["word_dropped"] > g["first_k"] > max(g["repeated"], g["other_doc"])
