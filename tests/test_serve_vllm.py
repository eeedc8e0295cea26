"""The vLLM backend on vLLM's async engine behind the real Ray Serve deployment, over HTTP:
tokens streamed as they are produced, every request scheduled with its own sampling settings
while others run (continuous batching), and a client that leaves freeing its slot in the engine.

The served model is a random one with head_dim 32 (vLLM's CPU attention has no kernel for the
CI fixture's head_dim 16). Its weights are drawn wide (std 0.3) so that greedy answers are varied
text rather than one repeated token, and its EOS embedding is zero, so the tied head never picks
EOS and answers run to max_tokens: long enough to disconnect in the middle of one."""

import asyncio
import json
import time

import httpx
import pytest

from madpo_ray.serving.vllm_engine import vllm_available

PORT = 8393
BASE = f"http://127.0.0.1:{PORT}"
PROMPTS = [f"Package {i} is a {lang} library for parsing {what} files.\nTL;DR:"
           for i, (lang, what) in enumerate([("Rust", "TOML"), ("Go", "YAML"), ("Lua", "JSON"), ("Perl", "INI")] * 16)]


def test_auto_backend_says_why_it_falls_back(tiny_base_dir):
    """`auto` is vLLM only where vLLM can run the model; asking for vLLM where it cannot is an
    error that names the reason, not a replica crash later."""
    from madpo_ray.serving.deployment import choose_backend

    assert choose_backend(str(tiny_base_dir), "transformers") == ("transformers", "asked for")
    engine, why = choose_backend(str(tiny_base_dir), "auto")  # the CI fixture has head_dim 16
    assert engine == "transformers"
    assert ("head_dim 16" in why) if vllm_available() else ("not installed" in why)
    with pytest.raises(ValueError, match="head_dim 16|not installed"):
        choose_backend(str(tiny_base_dir), "vllm")
    with pytest.raises(ValueError, match="auto, vllm, transformers"):
        choose_backend(str(tiny_base_dir), "tensorrt")


needs_vllm = pytest.mark.skipif(not vllm_available(), reason="vLLM not installed (the transformers backend is the fallback)")


@pytest.fixture(scope="module")
def servers(corpus_docs, tmp_path_factory):
    """The model served by vLLM (at /vllm), chosen by `auto`."""
    import ray
    from ray import serve

    from madpo_ray.config import ModelConfig
    from madpo_ray.models import build_tiny_base
    from madpo_ray.serving.deployment import choose_backend
    from madpo_ray.serving.launch import run_server, serve_runtime_env

    # Eight layers make a 256-token answer take about 2 s here: long enough to leave in the middle.
    cfg = ModelConfig(vocab_size=512, hidden_size=64, num_layers=8, num_heads=2, intermediate_size=128,
                      max_position_embeddings=2048)
    model = build_tiny_base([d["document"] for d in corpus_docs] + [d["reference"] for d in corpus_docs], cfg,
                            tmp_path_factory.mktemp("hd32") / "model", seed=1)
    scramble(model)
    assert choose_backend(str(model), "auto")[0] == "vllm"
    ray.init(num_cpus=2, runtime_env=serve_runtime_env())
    yield model, run_server(str(model), port=PORT, num_cpus=0.5, app_name="vllm", route_prefix="/vllm")  # auto
    serve.shutdown()
    ray.shutdown()


def scramble(model_dir) -> None:
    import torch

    from madpo_ray.models import load_causal_lm, load_tokenizer

    lm, eos = load_causal_lm(str(model_dir)), load_tokenizer(str(model_dir)).eos_token_id
    torch.manual_seed(0)
    with torch.no_grad():
        for weight in (p for p in lm.parameters() if p.dim() == 2):
            weight.normal_(0, 0.3)
        lm.get_input_embeddings().weight[eos] = 0  # tied: EOS's logit is always 0, below the best of the rest
    lm.save_pretrained(model_dir)


def post(path, body):
    r = httpx.post(f"{BASE}{path}", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def sse_data(lines) -> list[dict]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: ") and line != "data: [DONE]"]


@needs_vllm
@pytest.mark.ray
@pytest.mark.slow
def test_vllm_gives_the_transformers_greedy_text(servers):
    """Same tokens in, same greedy tokens out as the transformers engine. (The texts are compared
    without U+FFFD: vLLM's detokenizer holds back a trailing incomplete UTF-8 sequence that
    transformers shows as one.)"""
    from madpo_ray.serving.engine import GenParams, TransformersEngine

    model, _ = servers
    hf = TransformersEngine(str(model))
    for p in PROMPTS[:3]:
        ours = post("/vllm/v1/completions", {"prompt": p, "max_tokens": 12, "temperature": 0})
        [theirs] = hf.generate([p], GenParams(max_tokens=12))
        assert ours["usage"]["prompt_tokens"] == theirs.prompt_tokens
        assert ours["usage"]["completion_tokens"] == theirs.completion_tokens
        assert ours["choices"][0]["text"].replace("\ufffd", "") == theirs.text.replace("\ufffd", "")
        assert len(set(ours["choices"][0]["text"])) > 4  # varied text, not one token repeated


@needs_vllm
@pytest.mark.ray
@pytest.mark.slow
def test_streaming_sends_tokens_as_they_come_and_adds_up_to_the_greedy_text(servers):
    messages = [{"role": "user", "content": "Summarise: a Rust library for parsing TOML files."}]
    whole = post("/vllm/v1/chat/completions", {"messages": messages, "max_tokens": 24})["choices"][0]["message"]["content"]
    with httpx.stream("POST", f"{BASE}/vllm/v1/chat/completions", timeout=120,
                      json={"messages": messages, "max_tokens": 24, "stream": True}) as r:
        chunks = sse_data(list(r.iter_lines()))
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]]
    assert len(pieces) > 1 and all(pieces)  # one chunk per decoded delta, not one block at the end
    assert "".join(pieces) == whole and len(whole) > 10
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # /v1/completions streams the same way, in the text_completion chunk format.
    with httpx.stream("POST", f"{BASE}/vllm/v1/completions", timeout=120,
                      json={"prompt": PROMPTS[0], "max_tokens": 16, "stream": True}) as r:
        texts = [c["choices"][0]["text"] for c in sse_data(list(r.iter_lines()))]
    assert len([t for t in texts if t]) > 1
    assert "".join(texts) == post("/vllm/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 16})["choices"][0]["text"]


async def post_all(bodies: list[dict]) -> list:
    async with httpx.AsyncClient(timeout=120) as client:
        return await asyncio.gather(*(client.post(f"{BASE}/vllm/v1/completions", json=b) for b in bodies))


def request_for(i: int, answer: str) -> dict:
    """Request i: its own max_tokens, and for every other request a stop string taken from the
    middle of its full answer, so stops really cut, at a different place per request."""
    body = {"prompt": PROMPTS[i], "max_tokens": 6 + i % 11, "temperature": 0}
    if i % 2 == 0:
        body["stop"] = [answer[4 + i % 7:7 + i % 7]]
    return body


@needs_vllm
@pytest.mark.ray
@pytest.mark.slow
def test_64_concurrent_requests_each_get_their_solo_output(servers):
    answers = asyncio.run(post_all([{"prompt": p, "max_tokens": 16} for p in PROMPTS]))
    bodies = [request_for(i, r.json()["choices"][0]["text"]) for i, r in enumerate(answers)]
    solo = [post("/vllm/v1/completions", b) for b in bodies]  # one at a time
    concurrent = asyncio.run(post_all(bodies))
    assert [r.status_code for r in concurrent] == [200] * 64
    for i, (alone, r) in enumerate(zip(solo, concurrent)):
        got = r.json()
        assert got["choices"][0]["text"] == alone["choices"][0]["text"], (i, bodies[i])
        assert got["choices"][0]["finish_reason"] == alone["choices"][0]["finish_reason"]
        assert got["usage"]["completion_tokens"] == alone["usage"]["completion_tokens"]
    # The settings differed and mattered: some answers were cut by their stop string, others
    # ran to their own max_tokens.
    cut = [i for i, a in enumerate(solo) if a["choices"][0]["finish_reason"] == "stop" and "stop" in bodies[i]]
    assert len(cut) >= 8
    assert len({a["usage"]["completion_tokens"] for a in solo}) >= 5


@needs_vllm
@pytest.mark.ray
@pytest.mark.slow
def test_a_client_that_leaves_mid_stream_frees_its_engine_slot(servers):
    _, handle = servers
    assert handle.running_requests.remote().result() == 0  # also readies the handle: its first call is slow
    body = {"prompt": PROMPTS[1], "max_tokens": 256, "temperature": 0}
    t0 = time.perf_counter()
    assert post("/vllm/v1/completions", body)["usage"]["completion_tokens"] == 256
    engine_time = time.perf_counter() - t0  # the whole answer, without streaming's per-chunk cost
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{BASE}/vllm/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept: dropping the iterator would already close the connection
        assert next(lines).startswith("data: ")  # the first token arrived
        assert handle.running_requests.remote().result() == 1
        left = time.perf_counter()
    while handle.running_requests.remote().result() != 0:
        assert time.perf_counter() - left < 10, "the engine still holds the request of a client that left"
        time.sleep(0.02)
    freed_after, rest = time.perf_counter() - left, engine_time - (left - t0)
    print(f"slot freed {freed_after:.2f}s after the client left; the engine needed {rest:.2f}s more to finish")
    # Freed by the abort, not by finishing the answer.
    assert freed_after < rest / 2, (freed_after, rest)
    assert post("/vllm/v1/completions", {"prompt": PROMPTS[2], "max_tokens": 4})["usage"]["completion_tokens"] == 4


@needs_vllm
@pytest.mark.ray
@pytest.mark.slow
def test_more_requests_than_serves_default_reach_the_engine_at_once(servers):
    """The vLLM replica takes up to 256 requests at once and lets the engine's scheduler queue
    them. With Serve's usual limit of 64 the rest waited in Serve's router, whose retry backoff
    cut throughput at 200 clients to a sixth (bench/README.md, serve_load.py)."""
    import threading

    _, handle = servers
    seen, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            seen[0] = max(seen[0], handle.running_requests.remote().result())
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        replies = asyncio.run(post_all([{"prompt": PROMPTS[i % 64], "max_tokens": 64} for i in range(100)]))
    finally:
        done.set()
        watcher.join()
    assert [r.status_code for r in replies] == [200] * 100
    assert seen[0] > 64, seen[0]
