"""The gold reward orders candidate kinds sensibly; labels follow Bradley-Terry; tiers differ."""

import random
import statistics

import pytest

from madpo_ray.data.corpus.generated import SEALED_TEST_STREAM, generate_corpus, generate_splits
from madpo_ray.data.testbed import (DESIGN_FINGERPRINT, build_pairs, design_fingerprint, document_gold, gold_reward,
                                    make_candidate, mean_gold_by_kind)
from madpo_ray.eval.judge import add_gold


@pytest.fixture(scope="module")
def docs():
    return [d.to_dict() for d in generate_corpus(300, seed=3)]


def test_corpus_is_deterministic_and_splits_disjoint():
    a = [d.to_dict() for d in generate_corpus(20, seed=1)]
    b = [d.to_dict() for d in generate_corpus(20, seed=1)]
    assert a == b and a != [d.to_dict() for d in generate_corpus(20, seed=2)]
    splits = generate_splits(50, 20, 20)
    docs = {k: {d.document for d in v} for k, v in splits.items()}
    assert [len(splits[k]) for k in ("train", "validation", "test")] == [50, 20, 20]
    assert not docs["train"] & docs["test"] and not docs["train"] & docs["validation"]
    assert not docs["validation"] & docs["test"]
    doc = a[0]
    for fact in doc["facts"].values():  # the document states every key fact
        assert fact in doc["document"]


def test_test_documents_come_from_the_sealed_stream_none_from_the_one_development_read():
    """The documents development figures were read on (stream "test") are not the test split."""
    sealed = generate_splits(5, 5, 40)["test"]
    read_in_development = {d.document for d in generate_corpus(400, 0, "test")}
    assert all(d.doc_id.startswith(SEALED_TEST_STREAM + "-") for d in sealed)
    assert not {d.document for d in sealed} & read_in_development


def test_the_testbed_design_is_frozen_with_its_sealed_test_documents():
    """Changing the corpus, candidates, gold reward or tiers breaks this on purpose: the sealed test
    documents certify claims only under the design they were drawn for. Draw a new sealed stream
    (corpus/generated.py's SEALED_TEST_STREAM) and record the new fingerprint together."""
    assert design_fingerprint() == DESIGN_FINGERPRINT


def test_the_fingerprint_sees_a_change_of_gold_reward_or_tier(monkeypatch):
    import madpo_ray.data.testbed as tb

    monkeypatch.setitem(tb.TIER_DESIGNS, "low", (("reference_vs_garbage", 0.7), ("policy_vs_policy", 0.3)))
    assert tb.design_fingerprint() != DESIGN_FINGERPRINT
    monkeypatch.undo()
    monkeypatch.setattr(tb, "repetition", lambda words: 0.0)
    assert tb.design_fingerprint() != DESIGN_FINGERPRINT
    monkeypatch.undo()
    real = tb.labelled_pair  # label noise read three times over: the labelling changed
    monkeypatch.setattr(tb, "labelled_pair", lambda *a, **k: real(*a[:6], min(0.49, 3 * a[6]), *a[7:], **k))
    assert tb.design_fingerprint() != DESIGN_FINGERPRINT


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


def test_medium_tier_mixes_three_kinds_of_pairs_a_third_each(docs):
    samples = {d["doc_id"]: ["some words here", f"{d['facts']['language']} tool"] for d in docs}
    pairs = build_pairs(docs, tier="medium", policy_samples=samples, seed=0)
    kinds = [tuple(sorted((p["chosen_kind"], p["rejected_kind"]))) for p in pairs]
    garbage = statistics.mean("reference" in k and ({"repeated", "shuffled"} & set(k)) != set() for k in kinds)
    both_policy = statistics.mean(k == ("policy", "policy") for k in kinds)
    assert abs(garbage - 1 / 3) < 0.08 and abs(both_policy - 1 / 3) < 0.08
    assert not any("other_doc" in k for k in kinds)  # not judgeable from the summary alone


def test_label_noise_flips_that_share_and_says_so(docs):
    clean = build_pairs(docs, tier="low", sharpness=20.0, seed=0)
    noisy = build_pairs(docs, tier="low", sharpness=20.0, seed=0, label_noise=0.25)
    flipped = [p for p in noisy if p["label_flipped"]]
    assert abs(len(flipped) / len(noisy) - 0.25) < 0.08 and not any(p["label_flipped"] for p in clean)
    # At sharpness 20 the Bradley-Terry draw all but never goes against the gap: a flipped pair's
    # labelled chosen is the gold-worse one, so its true margin is negative.
    assert statistics.mean(p["true_margin"] < 0 for p in flipped) > 0.9
    assert statistics.mean(p["true_margin"] < 0 for p in noisy if not p["label_flipped"]) < 0.1


def test_several_pairs_per_document_are_distinct(docs):
    samples = {d["doc_id"]: ["one summary", "two summary", "three summary", "four summary"] for d in docs[:20]}
    pairs = build_pairs(docs[:20], tier="medium", policy_samples=samples, pairs_per_document=3)
    assert len(pairs) == 60 and len({p["pair_id"] for p in pairs}) == 60
    by_doc: dict = {}
    for p in pairs:
        by_doc.setdefault(p["doc_id"], set()).add(frozenset((p["chosen"], p["rejected"])))
    assert all(len(v) == 3 for v in by_doc.values())


def test_each_document_has_three_valid_synopses_and_demonstrates_one_of_them():
    plain = [d.to_dict() for d in generate_corpus(200, seed=5)]
    for d in plain:
        f = d["facts"]
        assert d["references"] == [f"{f['language']} {f['kind']} for {f['purpose']}",
                                   f"{f['kind']} for {f['purpose']} written in {f['language']}",
                                   f"{f['kind']} for {f['purpose']}"]
        assert d["reference"] in d["references"][:2]  # no terse demonstrations unless asked for
    terse = [d.to_dict() for d in generate_corpus(200, seed=5, terse_share=0.6)]
    share = statistics.mean(d["reference"] == d["references"][2] for d in terse)
    assert 0.5 < share < 0.7
    assert all(x.reference == x.references[2] for split in generate_splits(5, 5, 5, terse_share=1.0).values()
               for x in split)


def test_gold_scores_a_summary_against_its_closest_valid_synopsis(docs):
    d = next(x for x in docs if x["reference"] == x["references"][0])
    informative, other_wording, terse = d["references"]
    against = {r: gold_reward(other_wording, d["document"], r, d["facts"]) for r in d["references"]}
    assert document_gold(other_wording, d) == max(against.values()) == against[other_wording]
    assert against[informative] < against[other_wording]  # one reference alone would penalise the wording
    # By hand: a synopsis equal to a reference scores 1.5 + 1.0 (ROUGE) + 1.5 * coverage + 0.5
    # (faithful) - 1.5, and the terse one covers two facts of three: 3.0 against 2.5.
    assert document_gold(informative, d) == pytest.approx(3.0)
    assert document_gold(terse, d) == pytest.approx(2.5)
    without_list = {k: v for k, v in d.items() if k != "references"}  # Debian, user documents: one reference
    assert document_gold(other_wording, without_list) == against[informative]
    rows = [{"prompt_id": "x", "text": other_wording}]  # what `madpo eval` and `madpo compare` judge with
    add_gold(rows, {"x": d})
    assert rows[0]["gold"] == against[other_wording]


def test_a_repeated_synopsis_costs_ten_times_its_repeated_bigram_share():
    d = {"document": "Foo is a Python library. It helps with parsing TOML files.",
         "facts": {"kind": "library", "language": "Python", "purpose": "parsing TOML files"},
         "references": ["Python library for parsing TOML files", "library for parsing TOML files written in Python",
                        "library for parsing TOML files"], "reference": "Python library for parsing TOML files"}
    doubled = "Python library for parsing TOML files Python library for parsing TOML files"
    # All facts, every word faithful, 5 of 11 bigrams repeated; ROUGE and the length error by reference:
    # first wording: ROUGE-L F 2/3 (LCS 6 of 12 and 6), ROUGE-2 F 0.625 (5 of 11 and 5), length error 1;
    # second: ROUGE-L F 0.6 (LCS 6 of 12 and 8), ROUGE-2 F 4/9 (4 of 11 and 7), length error 0.5 (closest);
    # terse: ROUGE-L F 10/17 (5 of 12 and 5), ROUGE-2 F 8/15 (4 of 11 and 4), length error 1.4.
    shared = 1.5 + 0.5 - 10.0 * 5 / 11 - 1.5
    by_hand = [1.5 * 2 / 3 + 0.625 - 1.0, 1.5 * 0.6 + 4 / 9 - 0.5, 1.5 * 10 / 17 + 8 / 15 - 1.4]
    assert document_gold(doubled, d) == pytest.approx(shared + max(by_hand))
    assert [gold_reward(doubled, d["document"], r, d["facts"]) for r in d["references"]] == pytest.approx(
        [shared + x for x in by_hand])


def test_the_temperature_objective_averages_seeded_samples_at_every_evaluation_temperature(tiny_model, tiny_tokenizer,
                                                                                          corpus_docs):
    """`gold_reward_temperatures` (a Tune objective) is the mean of one summary per document at each
    of eval.temperatures, `gold_reward_worst_temperature` the lowest: its T=0 entry is the greedy gold, each entry equals a hand mean of
    document_gold over the texts generated at that temperature with eval.seed, a repeat draws the
    same, and sampling is not greedy (the tiny untrained model samples other words at T=2)."""
    from madpo_ray.config import load_config
    from madpo_ray.data.prompts import generation_prompts
    from madpo_ray.generation import TransformersGenerator, generate_transformers
    from madpo_ray.stages.measures import gold_reward_by_temperature, greedy_gold_reward

    from helpers import TINY_SETS

    cfg = load_config("tiny", TINY_SETS + ["eval.temperatures=[0,2]", "eval.seed=3", "eval.max_new_tokens=8"])
    docs = corpus_docs[:6]
    gen = TransformersGenerator(batch_size=32)
    gen.use(tiny_model, tiny_tokenizer)
    got = gold_reward_by_temperature(gen, docs, cfg)
    assert set(got) == {"gold_reward_t0", "gold_reward_t2", "gold_reward_temperatures", "gold_reward_worst_temperature"}
    assert got["gold_reward_t0"] == pytest.approx(greedy_gold_reward(gen, docs, cfg)[0])
    prompts = generation_prompts(cfg.data, tiny_tokenizer, [d["document"] for d in docs])
    sampled = [t for t, _ in generate_transformers(tiny_model, tiny_tokenizer, prompts, temperature=2.0, seed=3,
                                                   max_new_tokens=8, max_prompt_length=cfg.data.max_prompt_length)]
    greedy = [t for t, _ in generate_transformers(tiny_model, tiny_tokenizer, prompts, temperature=0.0,
                                                  max_new_tokens=8, max_prompt_length=cfg.data.max_prompt_length)]
    assert sampled != greedy
    assert got["gold_reward_t2"] == pytest.approx(sum(document_gold(t, d) for t, d in zip(sampled, docs)) / 6)
    assert got["gold_reward_temperatures"] == pytest.approx((got["gold_reward_t0"] + got["gold_reward_t2"]) / 2)
    assert got["gold_reward_worst_temperature"] == min(got["gold_reward_t0"], got["gold_reward_t2"])
    assert gold_reward_by_temperature(gen, docs, cfg) == got


@pytest.mark.parametrize("tier", ["high", "medium", "low"])
def test_each_tiers_composition_matches_its_definition(docs, tier):
    """Every pair is of one of the tier's designs, with the kinds that design names, in the
    shares the tier promises; nothing off design and no duplicates when every document has
    enough distinct samples."""
    from collections import Counter

    from madpo_ray.data.testbed import TIER_DESIGNS, fits_design, pair_composition

    samples = {d["doc_id"]: [f"summary {k} of {d['doc_id']}" for k in range(4)] for d in docs}
    skipped = Counter()
    pairs = build_pairs(docs, tier=tier, policy_samples=samples, pairs_per_document=3, skipped=skipped)
    comp = pair_composition(pairs, skipped)
    draws = comp["pairs"] + sum(skipped.values())
    assert draws == 3 * len(docs) and comp["duplicates"] == 0
    # only the reference-vs-surface-garbage design runs out: one reference, two garbage kinds, so a
    # document that draws it three times has no third distinct pair
    assert set(skipped) <= {"reference_vs_surface_garbage"} and sum(skipped.values()) < 0.06 * draws
    assert comp["off_design"] == 0 and comp["stand_ins"] == 0 and all(fits_design(p) for p in pairs)
    for design, share in TIER_DESIGNS[tier]:
        drawn = comp["by_design"].get(design, 0) + skipped.get(design, 0)
        assert abs(drawn / draws - share) < 0.05, (design, comp)
    assert set(comp["by_design"]) == {d for d, _ in TIER_DESIGNS[tier]}


def test_identical_samples_are_skipped_and_counted_never_replaced(docs):
    """Two identical SFT samples cannot make a policy-vs-policy pair: the draw is skipped and
    counted, not silently turned into a reference-vs-perturbed pair; a third distinct sample
    lets every draw through without repeating a pair."""
    from collections import Counter

    from madpo_ray.data.testbed import pair_composition

    same = {d["doc_id"]: ["the same words", "the same words "] for d in docs[:30]}
    skipped = Counter()
    pairs = build_pairs(docs[:30], tier="high", policy_samples=same, pairs_per_document=3, skipped=skipped)
    assert pairs == [] and skipped == Counter({"policy_vs_policy": 90})
    two = {d["doc_id"]: ["one summary", "two summary"] for d in docs[:30]}
    skipped = Counter()
    pairs = build_pairs(docs[:30], tier="high", policy_samples=two, pairs_per_document=3, skipped=skipped)
    comp = pair_composition(pairs, skipped)
    assert comp["pairs"] == 30 and comp["skipped"] == {"policy_vs_policy": 60} and comp["duplicates"] == 0
    three = {d["doc_id"]: ["one summary", "two summary", "three summary"] for d in docs[:30]}
    pairs = build_pairs(docs[:30], tier="high", policy_samples=three, pairs_per_document=3)
    assert pair_composition(pairs)["pairs"] == 90 and pair_composition(pairs)["duplicates"] == 0


def test_composition_counts_duplicates_and_off_design_pairs():
    from madpo_ray.data.testbed import pair_composition

    p = {"doc_id": "d1", "chosen": " a", "rejected": " b", "chosen_kind": "reference", "rejected_kind": "word_dropped",
         "pair_design": "policy_vs_policy"}
    comp = pair_composition([p, {**p, "chosen": " b", "rejected": " a"}])
    assert comp["duplicates"] == 1 and comp["off_design"] == 2
    assert comp["by_kinds"] == {"reference vs word_dropped": 2}
