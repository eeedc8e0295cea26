"""The controlled testbed: an offline stand-in for human preference data.

A *gold reward* scores a summary given its document and its valid reference synopses (the
closest one counts, as multi-reference ROUGE does: which wording a writer happened to pick is
not something a reward model reading the document could know). Preference labels are
drawn Bradley-Terry style from gold scores, so every pair carries its true margin, and the
data-quality tiers mix hard (small-gap) and easy (large-gap) pairs like the paper's.

Gold reward (roughly in [-3, 3], like the paper's 6 * (p_pos - 0.5)):
    1.5 * ROUGE-L F  + 1.0 * ROUGE-2 F            (against a reference; word order matters)
  + 1.5 * key-fact coverage - 1.0 * hallucinated facts   (generated corpus only)
  + 0.5 * faithfulness  (share of summary words found in the document or reference)
  - 1.0 * length error  (|len - len_ref| / len_ref, capped at 2)
  - 10.0 * repetition   (share of repeated word bigrams: degenerate loops are the classic failure)
  - 1.5                 (centring)
taken at the reference that gives the highest score.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from rouge_score import rouge_scorer

from madpo_ray.data.corpus.generated import KINDS, LANGUAGES, generate_corpus
from madpo_ray.config import DEFAULT_PROMPT_TEMPLATE

_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9+\-.']*")
_SCORER = rouge_scorer.RougeScorer(["rouge2", "rougeL"], use_stemmer=False)
_STOP = {"a", "an", "the", "for", "of", "in", "and", "to", "is", "it", "with", "written", "on"}


def words(text: str) -> list[str]:
    return [w.lower().strip(".'") for w in _WORD.findall(text)]


def _contains_phrase(text_words: list[str], phrase: str) -> bool:
    p = words(phrase)
    return any(text_words[i:i + len(p)] == p for i in range(len(text_words) - len(p) + 1))


def fact_scores(summary_words: list[str], facts: dict[str, str]) -> tuple[float, int]:
    """(coverage in [0, 1], number of hallucinated kinds/languages)."""
    covered = 0.0
    for key, value in facts.items():
        if key == "purpose":
            content = [w for w in words(value) if w not in _STOP]
            covered += sum(w in summary_words for w in content) / max(1, len(content))
        else:
            covered += float(_contains_phrase(summary_words, value))
    wrong = [x for x in LANGUAGES if x != facts.get("language") and x.lower() in summary_words]
    wrong += [x for x in KINDS if x != facts.get("kind") and _contains_phrase(summary_words, x)]
    return covered / max(1, len(facts)), len(wrong)


def repetition(summary_words: list[str]) -> float:
    bigrams = list(zip(summary_words, summary_words[1:]))
    if not bigrams:
        return 0.0
    return 1.0 - len(set(bigrams)) / len(bigrams)


def gold_reward(summary: str, document: str, reference: str, facts: Optional[dict[str, str]] = None) -> float:
    sw = words(summary)
    if not sw:
        return -3.0
    rouge = _SCORER.score(reference, summary)
    score = 1.5 * rouge["rougeL"].fmeasure + 1.0 * rouge["rouge2"].fmeasure
    if facts:
        coverage, hallucinated = fact_scores(sw, facts)
        score += 1.5 * coverage - 1.0 * min(hallucinated, 2)
    source = set(words(document)) | set(words(reference))
    score += 0.5 * sum(w in source for w in sw) / len(sw)
    n_ref = max(1, len(words(reference)))
    score -= 1.0 * min(abs(len(sw) - n_ref) / n_ref, 2.0)
    score -= 10.0 * repetition(sw)
    return score - 1.5


def document_gold(summary: str, doc: dict) -> float:
    """The gold reward of `summary` for a corpus document (a dict with document, reference and
    optionally references and facts), against every valid synopsis the document has."""
    references = doc.get("references") or [doc["reference"]]
    return max(gold_reward(summary, doc["document"], r, doc.get("facts")) for r in references)


# --------------------------------------------------------------------------- candidates
CANDIDATE_KINDS = ("reference", "word_dropped", "first_k", "too_long", "repeated", "other_doc", "shuffled")


def make_candidate(kind: str, rng: random.Random, document: str, reference: str,
                   other_reference: str) -> str:
    ref = reference.split()
    if kind == "reference":
        return reference
    if kind == "word_dropped":
        drop = set(rng.sample(range(len(ref)), k=min(len(ref) - 1, max(1, len(ref) // 4))))
        return " ".join(w for i, w in enumerate(ref) if i not in drop)
    if kind == "first_k":
        return " ".join(document.split()[:len(ref)]).rstrip(".")
    if kind == "too_long":
        return reference + " " + " ".join(document.split()[: 2 * len(ref)])
    if kind == "repeated":
        return " ".join(ref + ref[: max(2, len(ref) // 2)] + ref[:2])
    if kind == "other_doc":
        return other_reference
    if kind == "shuffled":
        shuffled = ref[:]
        while len(set(ref)) > 1 and shuffled == ref:
            rng.shuffle(shuffled)
        return " ".join(shuffled)
    raise ValueError(f"unknown candidate kind {kind!r}; choose from {CANDIDATE_KINDS}")


# --------------------------------------------------------------------------- pairs + labels
@dataclass
class Candidate:
    text: str
    kind: str  # one of CANDIDATE_KINDS or "policy"
    gold: float


def bradley_terry_label(gold_a: float, gold_b: float, sharpness: float, rng: random.Random) -> bool:
    """True when a is preferred; P(a > b) = sigmoid(sharpness * (gold_a - gold_b))."""
    p = 1.0 / (1.0 + math.exp(-sharpness * (gold_a - gold_b)))
    return rng.random() < p


PERTURBED = ("word_dropped", "first_k", "too_long")
GARBAGE = ("repeated", "other_doc", "shuffled")
# Garbage a reader can spot from the summary alone; another document's summary ("other_doc") is
# only wrong against *this* document, which the small default reward model cannot check.
SURFACE_GARBAGE = ("repeated", "shuffled")


# What each tier promises: the designs of its pairs and their shares (the rest of the roll goes
# to the last design). A test checks the built pairs against these.
TIER_DESIGNS = {
    "high": (("policy_vs_policy", 1.0),),
    "medium": (("reference_vs_surface_garbage", 1 / 3), ("policy_vs_perturbed", 1 / 3), ("policy_vs_policy", 1 / 3)),
    "low": (("reference_vs_garbage", 0.8), ("policy_vs_policy", 0.2)),
}
DESIGN_POOLS = {  # candidate kinds of each side of a design
    "policy_vs_policy": (("policy",), ("policy",)),
    "policy_vs_perturbed": (("policy",), PERTURBED),
    "reference_vs_surface_garbage": (("reference",), SURFACE_GARBAGE),
    "reference_vs_garbage": (("reference",), GARBAGE),
}


def distinct_samples_needed(pairs_per_document: int) -> int:
    """The fewest distinct SFT samples that give `pairs_per_document` different policy-vs-policy
    pairs: k samples give k (k - 1) / 2."""
    k = 2
    while k * (k - 1) // 2 < pairs_per_document:
        k += 1
    return k


def tier_design(tier: str, roll: float) -> str:
    """The design of one pair of `tier` for a uniform roll in [0, 1)."""
    designs = TIER_DESIGNS[tier]
    edge = 0.0
    for design, share in designs:
        edge += share
        if roll < edge:
            return design
    return designs[-1][0]


def distinct(cands: list[Candidate]) -> list[Candidate]:
    """One candidate per distinct text (two identical SFT samples are one candidate)."""
    return list({c.text.strip(): c for c in cands}.values())


def pick_pair(tier: str, rng: random.Random, cands: dict[str, list[Candidate]],
              seen: set) -> tuple[str, Optional[tuple[Candidate, Candidate]]]:
    """One pair of the tier's design for a document: two candidates of distinct text that this
    document has not paired yet, or None (the caller skips and counts it: never another design
    in its place). Where no policy samples were given, perturbed references stand in for them and
    the pair says so (`stand_in`)."""
    design = tier_design(tier, rng.random())
    kinds_a, kinds_b = DESIGN_POOLS[design]
    pool = {k: [c for kind in kinds for c in cands.get(kind, [])] for k, kinds in (("a", kinds_a), ("b", kinds_b))}
    if "policy" not in cands:
        pool = {k: v or [c for kind in PERTURBED for c in cands.get(kind, [])] for k, v in pool.items()}
    options, keys = [], set(seen)
    for a in distinct(pool["a"]):
        for b in distinct(pool["b"]):
            key = frozenset((a.text.strip(), b.text.strip()))
            if len(key) == 2 and key not in keys:
                keys.add(key)
                options.append((a, b))
    if not options:
        return design, None
    return design, rng.choice(options)


def build_pairs(documents: Sequence[dict], tier: str = "medium", sharpness: float = 1.0, seed: int = 0,
                policy_samples: Optional[dict[str, list[str]]] = None, prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
                pairs_per_document: int = 1, prompt_for=None, label_noise: float = 0.0,
                skipped: Optional[Counter] = None) -> list[dict]:
    """Preference pairs with gold scores and the true margin (labelled chosen minus rejected).

    `documents` are dicts with doc_id, document, reference and optionally facts. `prompt_for(document)`
    (e.g. data/prompts.py's, for chat prompts) overrides `prompt_template`. `label_noise` is the share
    of labels then flipped regardless of the gap (annotator mistakes): the strongly contradicted
    pairs (m <= -tau) that MADPO's stability cap exists for; such pairs say `label_flipped`.
    Each pair names its design (`pair_design`); a draw whose design this document cannot fill with
    a new distinct pair is skipped and counted in `skipped` by design.
    """
    prompt_for = prompt_for or (lambda document: prompt_template.format(document=document))
    if tier not in TIER_DESIGNS:
        raise ValueError(f"tier must be high, medium or low, got {tier!r}")
    rng = random.Random(f"pairs:{seed}:{tier}")
    skipped = Counter() if skipped is None else skipped
    pairs = []
    for i, doc in enumerate(documents):
        other = documents[(i + 1 + rng.randrange(max(1, len(documents) - 1))) % len(documents)]
        samples = None if policy_samples is None else policy_samples.get(doc["doc_id"], [])
        cands = document_candidates(doc, other, rng, samples)
        seen: set = set()
        for j in range(pairs_per_document):
            design, picked = pick_pair(tier, rng, cands, seen)
            if picked is None:
                skipped[design] += 1
                continue
            a, b = picked
            seen.add(frozenset((a.text.strip(), b.text.strip())))
            pairs.append(labelled_pair(doc, j, design, a, b, sharpness, label_noise, rng, prompt_for,
                                       stand_in=policy_samples is None and "policy" in design))
    return pairs


def document_candidates(doc: dict, other: dict, rng: random.Random,
                        samples: Optional[list[str]]) -> dict[str, list[Candidate]]:
    """Every constructed candidate kind of one document, and its SFT samples as `policy` (absent
    when no samples were given; empty when the given ones were all blank)."""
    def cand(text: str, kind: str) -> Candidate:
        return Candidate(text, kind, document_gold(text, doc))

    cands = {k: [cand(make_candidate(k, rng, doc["document"], doc["reference"], other["reference"]), k)]
             for k in CANDIDATE_KINDS}
    if samples is not None:
        cands["policy"] = [cand(s, "policy") for s in samples if s.strip()]
    return cands


def labelled_pair(doc: dict, j: int, design: str, a: Candidate, b: Candidate, sharpness: float,
                  label_noise: float, rng: random.Random, prompt_for, stand_in: bool) -> dict:
    """One pair, labelled Bradley-Terry by gold (then flipped with probability label_noise)."""
    if not bradley_terry_label(a.gold, b.gold, sharpness, rng):
        a, b = b, a
    flipped = rng.random() < label_noise
    if flipped:
        a, b = b, a
    return {"pair_id": f"{doc['doc_id']}#{j}", "doc_id": doc["doc_id"], "prompt": prompt_for(doc["document"]),
            "chosen": " " + a.text.strip(), "rejected": " " + b.text.strip(), "chosen_kind": a.kind,
            "rejected_kind": b.kind, "pair_design": design, "stand_in": stand_in, "gold_chosen": a.gold,
            "gold_rejected": b.gold, "true_margin": sharpness * (a.gold - b.gold), "label_flipped": flipped}


def pair_composition(pairs: Sequence[dict], skipped: Optional[Counter] = None) -> dict:
    """What a split holds: pairs by design and by the kinds actually paired, stand-ins, exact
    duplicates (the same two texts twice for one document) and the draws skipped by design."""
    seen, duplicates = set(), 0
    for p in pairs:
        key = (p["doc_id"], frozenset((p["chosen"].strip(), p["rejected"].strip())))
        duplicates += key in seen
        seen.add(key)
    by_kinds = Counter(" vs ".join(sorted((p["chosen_kind"], p["rejected_kind"]))) for p in pairs)
    return {"pairs": len(pairs), "by_design": dict(Counter(p.get("pair_design", "?") for p in pairs)),
            "by_kinds": dict(by_kinds), "stand_ins": sum(bool(p.get("stand_in")) for p in pairs),
            "duplicates": duplicates, "skipped": dict(skipped or {}),
            "off_design": sum(not fits_design(p) for p in pairs if not p.get("stand_in"))}


def fits_design(pair: dict) -> bool:
    """Whether a pair's two kinds are the two sides of its design (in either order)."""
    kinds_a, kinds_b = DESIGN_POOLS.get(pair.get("pair_design"), ((), ()))
    x, y = pair["chosen_kind"], pair["rejected_kind"]
    return (x in kinds_a and y in kinds_b) or (y in kinds_a and x in kinds_b)


def mean_gold_by_kind(documents: Iterable[dict], seed: int = 0) -> dict[str, float]:
    """Average gold reward of each candidate kind (the ordering check in the tests)."""
    documents = list(documents)
    rng = random.Random(f"kinds:{seed}")
    totals = {k: 0.0 for k in CANDIDATE_KINDS}
    for i, doc in enumerate(documents):
        other = documents[(i + 1) % len(documents)]
        for k in CANDIDATE_KINDS:
            text = make_candidate(k, rng, doc["document"], doc["reference"], other["reference"])
            totals[k] += document_gold(text, doc)
    return {k: v / len(documents) for k, v in totals.items()}


# --------------------------------------------------------------------------- the frozen design
# The digest of design_fingerprint() when the test documents were drawn from the sealed stream
# (corpus/generated.py's SEALED_TEST_STREAM). A test holds the two together: a change to the
# corpus, the candidates, the gold reward or the tiers fails it, and the way on is a new sealed
# stream (the old test documents were read under the old design) and a new fingerprint here.
DESIGN_FINGERPRINT = "ac77d38f7018321a546853f15fe7ec74a246d645eb09ed39d77fc8c006519436"


def design_fingerprint(num_documents: int = 40) -> str:
    """A digest of everything that decides what a testbed pair is: documents of the validation
    stream (with terse demonstrations, as the default preset draws them), every candidate kind with
    its gold reward, and the pairs of every tier built from fixed policy samples at a sharpness and a
    label noise that reach every branch of the labelling (gold rounded to 1e-6, so float noise across
    machines does not move it). The Debian corpus's splits are fixed by its package hashes: only the
    generated corpus's test documents come from a sealed stream."""
    docs = [d.to_dict() for d in generate_corpus(num_documents, 0, "validation", terse_share=0.6)]
    samples = {d["doc_id"]: [d["reference"], " ".join(d["document"].split()[:8]), d["reference"] + " It is free."]
               for d in docs}
    pairs = {tier: build_pairs(docs, tier, sharpness=4.0, seed=0, policy_samples=samples, pairs_per_document=3,
                               label_noise=0.3) for tier in TIER_DESIGNS}
    record = {"tiers": TIER_DESIGNS, "pools": DESIGN_POOLS, "kinds": mean_gold_by_kind(docs), "docs": docs,
              "pairs": pairs}
    text = json.dumps(record, sort_keys=True, default=str,
                      separators=(",", ":"), allow_nan=False).encode()
    return hashlib.sha256(round_floats(text)).hexdigest()


def round_floats(text: bytes) -> bytes:
    """The JSON text with every float rounded to 6 decimals."""
    return re.sub(rb"-?\d+\.\d+(e-?\d+)?", lambda m: f"{float(m.group()):.6f}".encode(), text)
