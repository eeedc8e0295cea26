"""The gold reward orders candidate kinds sensibly; labels follow Bradley-Terry; tiers differ."""

import random
import statistics

import pytest

from madpo_ray.data.corpus.generated import generate_corpus, generate_splits
from madpo_ray.data.testbed import build_pairs, gold_reward, make_candidate, mean_gold_by_kind


@pytest.fixture(scope="module")
def docs():
    return [d.to_dict() for d in generate_corpus(300, seed=3)]


def test_corpus_is_deterministic_and_splits_disjoint():
    a = [d.to_dict() for d in generate_corpus(20, seed=1)]
    b = [d.to_dict() for d in generate_corpus(20, seed=1)]
    assert a == b and a != [d.to_dict() for d in generate_corpus(20, seed=2)]
    splits = generate_splits(50, 20)
    assert not {d.document for d in splits["train"]} & {d.document for d in splits["test"]}
    doc = a[0]
    for fact in doc["facts"].values():  # the document states every key fact
        assert fact in doc["document"]


def test_gold_orders_candidate_kinds(docs):
    g = mean_gold_by_kind(docs)
    assert g["reference"] > g["word_dropped"] > g["first_k"] > max(g["repeated"], g["other_doc"])
    assert g["shuffled"] < g["reference"]


def test_shuffled_reference_scores_below_reference_per_document(docs):
    rng = random.Random(0)
    for d in docs[:50]:
        shuffled = make_candidate("shuffled", rng, d["document"], d["reference"], "")
        assert gold_reward(shuffled, d["document"], d["reference"], d["facts"]) < \
            gold_reward(d["reference"], d["document"], d["reference"], d["facts"])


def test_hallucinated_language_is_penalised(docs):
    d = docs[0]
    lang = d["facts"]["language"]
    wrong = "Haskell" if lang != "Haskell" else "Rust"
    good = gold_reward(d["reference"], d["document"], d["reference"], d["facts"])
    bad = gold_reward(d["reference"].replace(lang, wrong), d["document"], d["reference"], d["facts"])
    assert bad < good - 1.0


def test_bradley_terry_labels_and_tiers(docs):
    by_tier = {t: build_pairs(docs, tier=t, sharpness=1.0, seed=0) for t in ("high", "medium", "low")}
    for tier, pairs in by_tier.items():
        assert len(pairs) == len(docs)
        for p in pairs:
            assert p["chosen"].strip() != p["rejected"].strip()
            assert p["true_margin"] == pytest.approx(p["gold_chosen"] - p["gold_rejected"])
    gap = {t: statistics.mean(abs(p["true_margin"]) for p in ps) for t, ps in by_tier.items()}
    assert gap["low"] > gap["high"]  # low quality = mostly large-gap pairs
    # Labels are noisy but informative: most chosen responses are gold-better, not all.
    agree = statistics.mean(p["true_margin"] > 0 for p in by_tier["high"])
    assert 0.6 < agree < 1.0
    sharp = build_pairs(docs, tier="high", sharpness=20.0, seed=0)
    assert statistics.mean(p["true_margin"] > 0 for p in sharp) > agree


def test_policy_samples_are_used_in_high_tier(docs):
    samples = {d["doc_id"]: [f"{d['facts']['language']} tool", "some words here"] for d in docs[:10]}
    pairs = build_pairs(docs[:10], tier="high", policy_samples=samples)
    assert all(p["chosen_kind"] == "policy" and p["rejected_kind"] == "policy" for p in pairs)
