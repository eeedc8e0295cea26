"""Generation backends: the rows they write, seeding, the fallback without vLLM, and vLLM's greedy
text against transformers' (also after swapping another checkpoint into a running engine)."""

import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from madpo_ray.generation import (COLUMNS, SampleSpec, TransformersGenerator, read_generations, sample_model,
                                  vllm_available, write_generations)

PROMPTS = ["Zorblex is a Rust library for parsing TOML files.\nTL;DR:", "Quilmax is a Go daemon.\nTL;DR:",
           "A Lua game for testing web forms.\nTL;DR:", "Perl bindings for a C library.\nTL;DR:"]
IDS = ["a", "b", "c", "d"]


def test_transformers_rows_schema_counts_and_seeding(tiny_base_dir, tmp_path):
    spec = SampleSpec(temperatures=(0.0, 1.0), samples_per_prompt=3, max_new_tokens=6, max_prompt_length=64, seed=7)
    gen = TransformersGenerator(threads=1)
    rows, timing = sample_model(gen, str(tiny_base_dir), "base", IDS, PROMPTS, spec)
    assert len(rows) == 4 * 1 + 4 * 3  # greedy once, 3 samples at T=1
    assert {r["sample"] for r in rows if r["temperature"] == 0.0} == {0}
    assert {r["sample"] for r in rows if r["temperature"] == 1.0} == {0, 1, 2}
    assert all(0 < r["num_tokens"] <= 6 for r in rows)
    assert timing["tokens"] == sum(r["num_tokens"] for r in rows) and timing["backend"] == "transformers"
    again, _ = sample_model(gen, str(tiny_base_dir), "base", IDS, PROMPTS, spec)
    assert [r["text"] for r in again] == [r["text"] for r in rows]  # same seed, same draws
    other, _ = sample_model(gen, str(tiny_base_dir), "base", IDS, PROMPTS,
                            SampleSpec((0.0, 1.0), 3, 6, 64, seed=8))
    sampled = lambda rs: [r["text"] for r in rs if r["temperature"] == 1.0]  # noqa: E731
    assert sampled(other) != sampled(rows)
    assert [r["text"] for r in other if r["temperature"] == 0] == [r["text"] for r in rows if r["temperature"] == 0]

    path = tmp_path / "g.parquet"
    write_generations(rows, path)
    assert pq.read_schema(path).names == list(COLUMNS)
    assert read_generations(path) == [{k: r[k] for k in COLUMNS} for r in rows]


def test_without_vllm_auto_falls_back_to_transformers():
    """vLLM made unimportable in a fresh interpreter, as on a machine without the extra."""
    code = ("import sys; sys.modules['vllm'] = None\n"
            "from madpo_ray.generation import make_generator\n"
            "print(make_generator('auto').name)\n"
            "try:\n    make_generator('vllm')\nexcept RuntimeError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "transformers"
    assert lines[1].startswith("ERR") and "eval.backend=transformers" in lines[1]


def test_auto_starts_vllm_only_for_a_batch_of_models_and_an_explicit_choice_holds_everywhere(monkeypatch):
    """eval.backend as each caller resolves it: compare/eval (many models) and a stage or a trial (one)."""
    import madpo_ray.generation as G
    from madpo_ray.config import load_config

    for installed in (True, False):
        monkeypatch.setattr(G, "vllm_available", lambda: installed)
        assert G.resolve_backend("auto", many_models=True) == ("vllm" if installed else "transformers")
        assert G.resolve_backend("auto", many_models=False) == "transformers"
        assert G.resolve_backend("transformers", many_models=True) == "transformers"
    monkeypatch.setattr(G, "vllm_available", lambda: True)
    assert G.resolve_backend("vllm", many_models=False) == "vllm"
    monkeypatch.setattr(G, "vllm_available", lambda: False)
    with pytest.raises(RuntimeError, match="eval.backend=transformers"):
        G.resolve_backend("vllm", many_models=False)
    with pytest.raises(ValueError, match="eval.backend='vlm'"):
        G.resolve_backend("vlm", many_models=True)
    gen = G.stage_generator(load_config("tiny", ["eval.backend=transformers", "model.dtype=bfloat16"]), batch_size=7)
    assert isinstance(gen, TransformersGenerator) and (gen.batch_size, gen.dtype) == (7, "bfloat16")


def test_a_run_that_generates_with_a_missing_engine_fails_before_anything_is_written(monkeypatch, tmp_path):
    import madpo_ray.generation as G
    from madpo_ray.config import load_config
    from madpo_ray.pipeline import Pipeline

    monkeypatch.setattr(G, "vllm_available", lambda: False)
    p = Pipeline(load_config("tiny", [f"runs_dir={tmp_path}", "name=r", "eval.backend=vllm"]))
    with pytest.raises(RuntimeError, match="eval.backend=vllm but vLLM is not importable"):
        p.run()
    assert not any(tmp_path.iterdir())
    Pipeline(load_config("tiny", [f"runs_dir={tmp_path}", "name=r", "eval.backend=vllm"])).run(("data",))  # no generation


def test_a_model_in_memory_samples_as_its_saved_folder(tiny_base_dir, tiny_model, tiny_tokenizer):
    """`use(model)` (a Tune trial's policy) and `load(folder)` (a stage's) give the same draws."""
    spec = SampleSpec(max_new_tokens=6, max_prompt_length=64)
    from_folder, in_memory = TransformersGenerator(batch_size=2), TransformersGenerator(batch_size=2)
    from_folder.load(str(tiny_base_dir))
    in_memory.use(tiny_model, tiny_tokenizer)
    for temperature in (0.0, 1.0):
        assert in_memory.texts(PROMPTS, temperature, spec, seed=5) == from_folder.texts(PROMPTS, temperature, spec, seed=5)
    assert len(from_folder.texts(PROMPTS, 0.0, spec)) == len(PROMPTS)


def _vllm_installed() -> bool:
    return vllm_available()


def _random_checkpoint(base, out, seed: int):
    """The base architecture with large random weights: at init scale (std 0.02) every prompt
    greedily decodes to the same token, which would hide a swap that did not happen."""
    import torch

    from madpo_ray.models import load_causal_lm, load_tokenizer

    model = load_causal_lm(str(base))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.save_pretrained(out)
    load_tokenizer(str(base)).save_pretrained(out)
    return out


@pytest.mark.slow
@pytest.mark.skipif(not _vllm_installed(), reason="vLLM not installed (the transformers backend is the fallback)")
def test_one_vllm_engine_serves_every_caller_and_swaps_weights_from_a_folder_or_from_memory(corpus_docs, tmp_path):
    """One vLLM engine, as compare's generation actor holds it (GenerationActor) and as a stage or
    a trial gets it (eval.backend=vllm): model A's rows, then model B swapped in from its folder,
    then A again from memory (a Tune trial's policy); each greedy text equals transformers', with
    one engine start. (vLLM's CPU attention needs head_dim >= 32, so width 64 / 2 heads.) The
    process's environment is left as it was."""
    import os

    from madpo_ray.config import ModelConfig, load_config
    from madpo_ray.eval.generate import GenerationActor
    from madpo_ray.generation import stage_generator
    from madpo_ray.models import build_tiny_base, load_causal_lm, load_tokenizer

    cfg = ModelConfig(vocab_size=512, hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128,
                      max_position_embeddings=256)
    texts = [d["document"] for d in corpus_docs] + [d["reference"] for d in corpus_docs]
    base = build_tiny_base(texts, cfg, tmp_path / "base", seed=1)
    a, b = _random_checkpoint(base, tmp_path / "a", 1), _random_checkpoint(base, tmp_path / "b", 2)
    spec = SampleSpec(temperatures=(0.0, 1.0), samples_per_prompt=2, max_new_tokens=8, max_prompt_length=64)
    hf = TransformersGenerator(threads=1)
    greedy = lambda rs: [r["text"] for r in rs if r["temperature"] == 0]  # noqa: E731
    want_a = greedy(sample_model(hf, str(a), "a", IDS, PROMPTS, spec)[0])
    want_b = greedy(sample_model(hf, str(b), "b", IDS, PROMPTS, spec)[0])
    assert want_a != want_b

    env = dict(os.environ)
    actor = GenerationActor("vllm")
    try:
        assert actor.backend() == "vllm"
        rows_a, t_a = actor.sample_model(str(a), "a", IDS, PROMPTS, spec)
        rows_b, t_b = actor.sample_model(str(b), "b", IDS, PROMPTS, spec)
        assert greedy(rows_a) == want_a
        assert greedy(rows_b) == want_b  # the swapped-in weights are really the ones sampled
        assert t_a["engine_starts"] == t_b["engine_starts"] == 1  # B swapped into A's engine, not a second start
        hot = [r["text"] for r in rows_b if r["temperature"] == 1.0]
        assert len(set(hot)) > len(hot) // 2  # T=1 really samples (one engine seed; see VLLMGenerator.sample)
        assert len(rows_a) == 4 + 4 * 2 and {tuple(sorted(r)) for r in rows_a} == {tuple(sorted(COLUMNS))}
        engine = actor.generator
        engine.use(load_causal_lm(str(a)), load_tokenizer(str(a)))  # a model in memory, as a trial has it
        assert engine.texts(PROMPTS, 0.0, spec) == want_a and engine.engine_starts == 1
        assert type(stage_generator(load_config("tiny", ["eval.backend=vllm"]))).__name__ == "VLLMGenerator"
    finally:
        actor.generator.close()
        os.environ.clear()
        os.environ.update(env)
