"""Loading and validation of preference pairs: every bad-input case names its row and field."""

import json

import pytest

from madpo_ray.data.collate import PairCollator, SFTCollator, tokenize_pairs, tokenize_sft, truncate
from madpo_ray.data.preference import DataValidationError, ValidationReport, load_pairs, validate_rows

GOOD = {"prompt": "Doc about a Rust library.\nTL;DR:", "chosen": " Rust library", "rejected": " Go daemon"}


def _write_jsonl(path, lines):
    with open(path, "wb") as fh:
        for line in lines:
            fh.write(line if isinstance(line, bytes) else json.dumps(line).encode() if not isinstance(line, str) else line.encode())
            fh.write(b"\n")
    return path


BAD_ROWS = [
    ({"chosen": "a", "rejected": "b"}, "prompt", "missing"),
    ({"prompt": "p", "chosen": 5, "rejected": "b"}, "chosen", "not a string"),
    ({"prompt": "p", "chosen": "a", "rejected": "   "}, "rejected", "empty"),
    ({"prompt": "p", "chosen": "same", "rejected": "same "}, "rejected", "identical to chosen"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": float("nan")}, "margin", "not finite"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": float("inf")}, "margin", "not finite"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "margin", "not a number"),
    ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "prompt", "needs string 'role' and 'content'"),
    ({"prompt": "p", "chosen": "\ud800", "rejected": "b"}, "chosen", "not UTF-8"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": 10 ** 400}, "margin", "too large for a float"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1.0, "margin_std": -0.5}, "margin_std", "negative"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1.0, "margin_std": "wide"}, "margin_std", "not a number"),
    ({"prompt": "p\x00q", "chosen": "a", "rejected": "b"}, "prompt", "control character: U+0000 at position 1"),
    ({"prompt": "p", "chosen": "a\x1b[31m", "rejected": "b"}, "chosen", "control character: U+001B"),
    ({"prompt": [{"role": "user", "content": "x\x07"}], "chosen": "a", "rejected": "b"}, "prompt",
     "message 0: control character: U+0007"),
]


@pytest.mark.parametrize("row,field,reason", BAD_ROWS)
def test_each_bad_row_is_reported_with_row_and_field(tmp_path, row, field, reason):
    path = tmp_path / "pairs.jsonl"
    _write_jsonl(path, [GOOD, json.dumps(row), GOOD])
    pairs, report = load_pairs(str(path))
    assert len(pairs) == 2 and report.total == 3 and report.skipped == 1
    issue = report.issues[0]
    assert issue.row == 1 and issue.field == field and reason in issue.reason
    assert f"row 1, field '{field}'" in str(issue)
    assert report.to_metrics()["rows_skipped"] == 1
    with pytest.raises(DataValidationError, match=f"row 1, field '{field}'"):
        load_pairs(str(path), strict=True)


def test_malformed_json_and_bad_utf8_lines(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [GOOD, b'{"prompt": "x", "chosen": ', b'{"prompt": "\xff\xfe"}', GOOD])
    pairs, report = load_pairs(str(path))
    assert len(pairs) == 2
    reasons = {i.row: i.reason for i in report.issues}
    assert "malformed JSON" in reasons[1] and "not UTF-8" in reasons[2]
    assert report.counts() == {"malformed JSON": 1, "not UTF-8": 1}


def test_tabs_newlines_and_carriage_returns_are_text(tmp_path):
    row = {"prompt": "a\tb\r\nc", "chosen": "x\ny", "rejected": "z"}
    pairs, report = load_pairs(str(_write_jsonl(tmp_path / "p.jsonl", [json.dumps(row)])))
    assert len(pairs) == 1 and report.skipped == 0


def test_deeply_nested_json_is_a_skipped_row_not_a_crash(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    path = _write_jsonl(tmp_path / "p.jsonl", [GOOD, deep, GOOD])
    pairs, report = load_pairs(str(path))
    assert len(pairs) == 2 and report.issues[0].row == 1 and "nested too deeply" in report.issues[0].reason
    whole = tmp_path / "p.json"
    whole.write_text(deep)
    with pytest.raises(DataValidationError, match="nested too deeply"):
        load_pairs(str(whole))


def test_non_object_row_and_all_bad_file(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", ["[1, 2]", json.dumps({"prompt": "p"})])
    with pytest.raises(DataValidationError, match="no usable rows"):
        load_pairs(str(path))


def test_formats_json_parquet_and_datasets_folder(tmp_path):
    rows = [dict(GOOD, margin=1.5), dict(GOOD, chosen=" other")]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    assert len(load_pairs(str(tmp_path / "p.json"))[0]) == 2

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    pairs, _ = load_pairs(str(tmp_path / "p.parquet"))
    assert pairs[0]["margin"] == 1.5

    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    assert len(load_pairs(str(tmp_path / "saved"))[0]) == 2

    # A folder of data files goes through load_dataset(name_or_path), the same call as a hub name.
    (tmp_path / "hubstyle").mkdir()
    _write_jsonl(tmp_path / "hubstyle" / "train.jsonl", rows)
    assert len(load_pairs(str(tmp_path / "hubstyle"), split="train")[0]) == 2


def test_corrupt_parquet_fails_clearly(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataValidationError, match="cannot read parquet"):
        load_pairs(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataValidationError, match="unsupported file type"):
        (tmp_path / "x.csv").write_text("a,b")
        load_pairs(str(tmp_path / "x.csv"))


def test_conversational_format_uses_chat_template(tiny_tokenizer):
    row = {"prompt": [{"role": "user", "content": "Summarise: a Rust library."}],
           "chosen": [{"role": "assistant", "content": "Rust library"}],
           "rejected": [{"role": "assistant", "content": "Go daemon"}]}
    report = ValidationReport()
    [kept] = validate_rows([(0, row)], report)
    [ex] = tokenize_pairs(tiny_tokenizer, [kept], 64, 96)
    prompt = tiny_tokenizer.decode(ex["prompt_ids"])
    assert "<|user|>" in prompt and prompt.rstrip().endswith("<|assistant|>")
    assert tiny_tokenizer.decode(ex["chosen_ids"], skip_special_tokens=True) == "Rust library"


def test_truncation_policy():
    p, (a, b), cut = truncate(list(range(10)), ([100, 101, 102, 103], [200]), max_prompt_length=4, max_length=7)
    assert p == [6, 7, 8, 9]  # keeps the end of the prompt
    assert a == [100, 101, 102] and b == [200]  # responses cut from the right to fit
    assert cut


def test_overlong_rows_skip_or_become_identical(tiny_tokenizer):
    long_prompt = "word " * 200
    rows = [{"row_id": 7, "prompt": long_prompt, "chosen": " same start A", "rejected": " same start B"}]
    report = ValidationReport(source="t")
    assert tokenize_pairs(tiny_tokenizer, rows, 16, 20, overlong="skip", report=report) == []
    assert report.issues[0].row == 7 and "over-long" in report.issues[0].reason
    # With truncation and a 1-token response budget, chosen and rejected collide.
    report = ValidationReport(source="t")
    assert tokenize_pairs(tiny_tokenizer, rows, 16, 17, report=report) == []
    assert "identical to chosen after truncation" in report.issues[0].reason and report.issues[0].field == "rejected"


def test_pair_collator_masks_and_columns(tiny_tokenizer):
    rows = [dict(GOOD, margin=2.0, ref_logp_chosen=-3.0, ref_logp_rejected=-4.0),
            dict(GOOD, chosen=" a much longer chosen response here", margin=-1.0, ref_logp_chosen=-9.0,
                 ref_logp_rejected=-4.0)]
    exs = tokenize_pairs(tiny_tokenizer, rows, 64, 96)
    batch = PairCollator(tiny_tokenizer.pad_token_id)(exs)
    assert batch["input_ids"].shape[0] == 4  # chosen x2 then rejected x2
    assert batch["margin"].tolist() == [2.0, -1.0]
    for i, ex in enumerate(exs):
        assert batch["response_mask"][i].sum().item() == len(ex["chosen_ids"])
        assert batch["response_mask"][2 + i].sum().item() == len(ex["rejected_ids"])
        assert batch["attention_mask"][i].sum().item() == len(ex["prompt_ids"]) + len(ex["chosen_ids"])
        assert ex["chosen_ids"][-1] == tiny_tokenizer.eos_token_id
    sft = SFTCollator(tiny_tokenizer.pad_token_id)(tokenize_sft(tiny_tokenizer, [{"prompt": "x", "response": " y"}], 8, 16))
    n_y = len(tiny_tokenizer(" y", add_special_tokens=False)["input_ids"])
    assert sft["response_mask"].sum().item() == n_y + 1  # " y" + EOS


def _pairs(n, tag):
    return [{"prompt": f"{tag} prompt {i}", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(n)]


def _user_pipeline(tmp_path, source, *sets):
    from madpo_ray.config import load_config
    from madpo_ray.pipeline import Pipeline

    return Pipeline(load_config("tiny", [f"data.source={source}", f"runs_dir={tmp_path / 'runs'}", "name=u", *sets]))


def test_single_file_holds_out_validation_and_test_instead_of_reading_train_again(tmp_path):
    """A .jsonl file is one split: asking it for "test" would return the training rows."""
    from madpo_ray.io import read_jsonl

    f = _write_jsonl(tmp_path / "pairs.jsonl", _pairs(100, "train"))
    p = _user_pipeline(tmp_path, f, "data.validation_fraction=0.1")
    metrics = p.load_input_pairs()
    splits = {s: read_jsonl(p.layout.input_pairs_path(s)) for s in ("train", "validation", "test")}
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [80, 10, 10]
    prompts = {s: {r["prompt"] for r in rows} for s, rows in splits.items()}
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["validation"]
    assert not prompts["validation"] & prompts["test"] and len(set().union(*prompts.values())) == 100
    assert metrics["test_pairs"] == 10


def test_named_splits_are_read_and_only_a_missing_one_is_held_out(tmp_path):
    from madpo_ray.io import read_jsonl

    f = tmp_path / "pairs.json"
    f.write_text(json.dumps({"train": _pairs(40, "train"), "test": _pairs(6, "test")}))
    p = _user_pipeline(tmp_path, f, "data.validation_fraction=0.25")
    p.load_input_pairs()
    test, val = read_jsonl(p.layout.input_pairs_path("test")), read_jsonl(p.layout.input_pairs_path("validation"))
    assert [r["prompt"] for r in test] == [f"test prompt {i}" for i in range(6)]  # the file's own test split
    assert len(val) == 10 and all(r["prompt"].startswith("train") for r in val)  # 25% of train held out
    assert len(read_jsonl(p.layout.input_pairs_path("train"))) == 30


def test_held_out_splits_take_whole_prompts():
    """Several pairs per prompt: a prompt's pairs go to one side of the split, never both."""
    import random

    from madpo_ray.data.preference import hold_out_by_prompt, prompt_key

    pairs = [{"prompt": f"prompt {i}", "chosen": f"a{j}", "rejected": f"b{j}"} for i in range(40) for j in range(3)]
    pairs.append({"prompt": [{"role": "user", "content": "chat"}], "chosen": "x", "rejected": "y"})
    held, rest = hold_out_by_prompt(pairs, 10, random.Random(0))
    assert len(held) + len(rest) == len(pairs) and 10 <= len(held) <= 12
    assert not {prompt_key(r) for r in held} & {prompt_key(r) for r in rest}
    assert len({prompt_key(r) for r in held}) < len(held)  # whole groups moved, not single rows
    again, _ = hold_out_by_prompt(pairs, 10, random.Random(0))
    assert again == held  # seeded


def test_a_margin_std_column_travels_from_the_data_to_what_policy_training_reads(tmp_path, tiny_tokenizer):
    """--margins-from data with margin_std: kept through tokenising and scoring, required (by row)
    by the uncertainty-aware loss, ignored by the others."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from madpo_ray.data.collate import tokenize_pairs
    from madpo_ray.data.scored import load_policy_examples

    rows = [{"prompt": f"p{i}", "chosen": "a good one", "rejected": "bad", "margin": 1.0 + i, "margin_std": 0.5 * i,
             "row_id": i} for i in range(3)]
    exs = tokenize_pairs(tiny_tokenizer, rows, 32, 64)
    assert [e["margin_std"] for e in exs] == [0.0, 0.5, 1.0]
    scored = [{**e, "ref_logp_chosen": -1.0, "ref_logp_rejected": -2.0, "len_chosen": 3.0, "len_rejected": 1.0}
              for e in exs]
    pq.write_table(pa.Table.from_pylist(scored), tmp_path / "ok.parquet")
    assert [r["margin_std"] for r in load_policy_examples(tmp_path / "ok.parquet", "madpo_expected")] == [0.0, 0.5, 1.0]
    scored[1]["margin_std"] = None
    pq.write_table(pa.Table.from_pylist(scored), tmp_path / "gap.parquet")
    with pytest.raises(DataValidationError, match=r"margin_std: rows \[1\]"):
        load_policy_examples(tmp_path / "gap.parquet", "madpo_expected")
    assert len(load_policy_examples(tmp_path / "gap.parquet", "madpo")) == 3  # plain MADPO does not read it
