"""Shared fixtures: offline env, one thread per test process, a tiny model built from scratch."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # two cores shared with Ray workers: oversubscription is 10x slower

from madpo_ray.config import ModelConfig  # noqa: E402
from madpo_ray.data.corpus.generated import generate_corpus  # noqa: E402

TINY = ModelConfig(vocab_size=512, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                   max_position_embeddings=256)


@pytest.fixture(scope="session")
def corpus_docs():
    return [d.to_dict() for d in generate_corpus(64, seed=0, prefix="train")]


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory, corpus_docs):
    from madpo_ray.models import build_tiny_base

    texts = [d["document"] for d in corpus_docs] + [d["reference"] for d in corpus_docs]
    return build_tiny_base(texts, TINY, tmp_path_factory.mktemp("tiny_base"), seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_base_dir):
    from madpo_ray.models import load_tokenizer

    return load_tokenizer(str(tiny_base_dir))


@pytest.fixture()
def tiny_model(tiny_base_dir):
    from madpo_ray.models import load_causal_lm

    return load_causal_lm(str(tiny_base_dir)).eval()


@pytest.fixture(scope="session")
def scored_train(tiny_base_dir, corpus_docs, tmp_path_factory):
    """32 scored pairs of the tiny model (as reference and as an untrained reward model)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from madpo_ray.data.collate import tokenize_pairs
    from madpo_ray.data.preference import ValidationReport
    from madpo_ray.models import load_causal_lm, load_reward_model, load_tokenizer
    from madpo_ray.stages.score import score_examples

    tok = load_tokenizer(str(tiny_base_dir))
    rows = [{"prompt": d["document"][:200] + "\nTL;DR:", "chosen": " " + d["reference"],
             "rejected": " " + corpus_docs[(i + 1) % len(corpus_docs)]["reference"], "row_id": i}
            for i, d in enumerate(corpus_docs[:32])]
    exs = tokenize_pairs(tok, rows, 64, 96, "truncate", ValidationReport(source="t"), False)
    ref = load_causal_lm(str(tiny_base_dir)).eval()
    rm = load_reward_model(str(tiny_base_dir), pad_token_id=tok.pad_token_id).eval()
    scored = score_examples(ref, rm, exs, tok.pad_token_id)
    for i, row in enumerate(scored):  # each margin's uncertainty, as an ensemble would give it (madpo_expected)
        row["margin_std"] = 0.25 * (i % 5)
    path = tmp_path_factory.mktemp("scored") / "train.parquet"
    pq.write_table(pa.Table.from_pylist(scored), path)
    return path
