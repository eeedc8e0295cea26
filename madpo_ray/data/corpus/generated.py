"""The embedded default corpus: descriptions of fictional software packages and their
one-line synopses, generated from sampled attributes by seeded code (no copied text).

Because the generator knows which facts a document states (kind, language, purpose), the
testbed's gold reward can check a summary's key-fact coverage and spot hallucinated facts.
Every document has the same three valid synopses, written from its facts (`references`): two
informative ones and a terse one without the language. Its demonstration (`reference`, what SFT
imitates) is one of them; with `terse_share` > 0 that share of demonstrations is the terse one,
so the SFT policy often leaves the language out while the gold reward prefers it in: preference
data then carries what the demonstrations do not, as in RLHF.
The distractor sentences deliberately mention *other* languages and kinds, so copying
words from the document is not enough to be right.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

KINDS = ["library", "command-line tool", "daemon", "plugin", "web framework", "text editor",
         "game", "database driver", "window manager", "compiler"]
LANGUAGES = ["Python", "Rust", "Go", "C", "Java", "Ruby", "Haskell", "OCaml", "Perl", "Lua", "Erlang", "Scala"]
PURPOSES = [
    "parsing TOML files", "monitoring disk usage", "resizing images", "sending email alerts",
    "syncing calendars", "compressing log files", "tracking time sheets", "backing up databases",
    "rendering markdown", "checking spelling", "managing passwords", "scheduling cron jobs",
    "converting audio files", "browsing news feeds", "drawing network graphs", "editing subtitles",
    "mirroring git repositories", "testing web forms", "counting source lines", "solving sudoku puzzles",
    "reading barcodes", "caching web pages", "encrypting files", "generating invoices",
    "mapping hiking trails", "playing chess", "analysing weather data", "translating text",
]
FEATURES = ["a plugin system", "colour output", "parallel processing", "a small memory footprint",
            "unicode support", "JSON export", "a graphical interface", "shell completion",
            "detailed logging", "a REST interface", "automatic updates", "offline mode",
            "keyboard shortcuts", "a test suite", "man pages", "SQLite storage"]
LICENCES = ["GPL-3", "MIT", "BSD", "Apache-2.0", "LGPL-2.1", "MPL-2.0"]
_SYLLABLES = ["zor", "bly", "quil", "max", "tren", "vop", "ket", "lum", "dra", "fen", "gix", "hob",
              "jas", "nim", "pel", "rux", "sab", "tig", "wen", "yor"]


@dataclass
class PackageDoc:
    doc_id: str
    name: str
    kind: str
    language: str
    purpose: str
    features: list[str]
    licence: str
    document: str
    reference: str

    @property
    def references(self) -> list[str]:
        """Every valid synopsis of this document (the gold reward scores against the closest)."""
        return synopses(self.kind, self.language, self.purpose)

    @property
    def facts(self) -> dict[str, str]:
        """The key facts a good synopsis states (what the gold reward checks)."""
        return {"kind": self.kind, "language": self.language, "purpose": self.purpose}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["facts"] = self.facts
        d["references"] = self.references
        return d


def synopses(kind: str, language: str, purpose: str) -> list[str]:
    """Two informative synopses and a terse one (no language), in that order."""
    return [f"{language} {kind} for {purpose}", f"{kind} for {purpose} written in {language}", f"{kind} for {purpose}"]


def _sentence_pool(rng: random.Random, d: dict) -> tuple[list[str], list[str]]:
    """Fact sentences (always present, in varied wording) and distractors (a sample)."""
    name, kind, lang, purpose = d["name"], d["kind"], d["language"], d["purpose"]
    f = d["features"]
    article = "an" if kind[0] in "aeiou" else "a"
    intro = rng.choice([
        f"{name} is {article} {kind} written in {lang}.",
        f"Written in {lang}, {name} is a small {kind}.",
        f"{name} is a {lang} {kind}.",
        f"This package provides {name}, {article} {kind} implemented in {lang}.",
    ])
    job = rng.choice([
        f"It helps with {purpose}.",
        f"Its main job is {purpose}.",
        f"{name} was designed for {purpose}.",
        f"The {kind} is used for {purpose}.",
        f"People use it for {purpose} without much setup.",
    ])
    feats = rng.choice([
        f"Features include {f[0]} and {f[1]}.",
        f"It offers {f[0]}, {f[1]} and {f[2]}.",
        f"Highlights are {f[0]} as well as {f[1]}.",
    ])
    licence = rng.choice([f"It is released under the {d['licence']} licence.",
                          f"The code is available under the {d['licence']} licence."])
    other_lang = rng.choice([x for x in LANGUAGES if x != lang])
    other_kind = rng.choice([x for x in KINDS if x != kind])
    distractors = [
        f"The first version appeared in {rng.randint(1995, 2025)}.",
        f"The project is maintained by {rng.randint(2, 40)} volunteers.",
        f"It is often compared with tools written in {other_lang}.",
        f"An earlier {other_kind} by the same authors is no longer developed.",
        f"Version {rng.randint(0, 9)}.{rng.randint(0, 20)} added better documentation.",
        "Development happens on a public mailing list.",
        "Bug reports are welcome.",
        f"Packages exist for most distributions, and a port to {other_lang} is planned.",
    ]
    return [intro, job, feats, licence], rng.sample(distractors, k=rng.randint(2, 4))


def make_document(rng: random.Random, index: int, prefix: str = "gen", terse_share: float = 0.0) -> PackageDoc:
    name = "".join(rng.sample(_SYLLABLES, k=rng.choice([2, 2, 3]))).capitalize()
    attrs = {
        "name": name,
        "kind": rng.choice(KINDS),
        "language": rng.choice(LANGUAGES),
        "purpose": rng.choice(PURPOSES),
        "features": rng.sample(FEATURES, k=3),
        "licence": rng.choice(LICENCES),
    }
    facts, distractors = _sentence_pool(rng, attrs)
    # Intro first (as package descriptions do); the rest shuffled with the distractors.
    rest = facts[1:] + distractors
    rng.shuffle(rest)
    document = " ".join([facts[0]] + rest)
    *informative, terse = synopses(attrs["kind"], attrs["language"], attrs["purpose"])
    reference = rng.choice(informative)
    # No draw at 0: the corpus stays as it was. A share above 0 draws from the corpus's stream, so
    # the documents after the first differ too: each terse_share is a corpus of its own.
    if terse_share and rng.random() < terse_share:
        reference = terse
    return PackageDoc(doc_id=f"{prefix}-{index:06d}", document=document, reference=reference, **attrs)


def generate_corpus(num_documents: int, seed: int = 0, prefix: str = "gen", terse_share: float = 0.0) -> list[PackageDoc]:
    """Deterministic for a given (num_documents, seed, prefix, terse_share)."""
    rng = random.Random(f"{prefix}:{seed}")
    return [make_document(rng, i, prefix, terse_share) for i in range(num_documents)]


# The stream the test documents are drawn from. Test figures read during the testbed's development
# came from the stream "test"; the design was then frozen (data/testbed.py's DESIGN_FINGERPRINT)
# and the test documents drawn afresh from this one, which no development figure has read. A
# change to the design unfreezes it: draw from a new stream, never from one whose figures were seen.
SEALED_TEST_STREAM = "sealed1"


def generate_splits(num_train: int, num_validation: int, num_test: int, seed: int = 0,
                    terse_share: float = 0.0) -> dict[str, list[PackageDoc]]:
    """Train/validation/test documents drawn from separate seeded streams (no shared documents);
    test from the sealed stream."""
    streams = (("train", "train", num_train), ("validation", "validation", num_validation),
               ("test", SEALED_TEST_STREAM, num_test))
    return {split: generate_corpus(n, seed, stream, terse_share) for split, stream, n in streams}
