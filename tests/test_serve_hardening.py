"""Issue #13: no request can wedge, poison or leak into another. Each defect is reproduced against
the real engine, or a real Ray Serve app on loopback over real HTTP, and must stay fixed."""

import asyncio
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from madpo_ray.serving.engine import GenParams, StreamEnd, TransformersEngine

PORT = 8392
BASE = f"http://127.0.0.1:{PORT}"
KEY = "hardening-key-7f3a"
CHAT = "/v1/chat/completions"


# ---------------------------------------------------------------- engine level, no Ray

@pytest.fixture(scope="module")
def engine(tiny_base_dir):
    return TransformersEngine(str(tiny_base_dir), stream_timeout_s=10)


def test_generation_thread_error_reaches_the_stream_instead_of_hanging(engine):
    """A seed torch cannot take used to kill the worker thread while the stream waited forever."""
    t0 = time.time()
    with pytest.raises((ValueError, RuntimeError)):
        list(engine.stream("Zorblex is", GenParams(max_tokens=4, temperature=1.0, seed=2**70)))
    assert time.time() - t0 < 5
    assert engine.lock.acquire(timeout=1)  # and the engine is free again
    engine.lock.release()


def test_vanishing_temperature_is_greedy_not_a_crash(engine):
    tiny = engine.generate(["Zorblex is"], GenParams(max_tokens=6, temperature=1e-30))
    greedy = engine.generate(["Zorblex is"], GenParams(max_tokens=6, temperature=0.0))
    assert tiny[0].text == greedy[0].text
    assert text_of(engine.stream("Zorblex is", GenParams(max_tokens=6, temperature=1e-30))) == greedy[0].text


def text_of(stream) -> str:
    return "".join(d for d in stream if isinstance(d, str))


def test_a_stream_ends_like_the_whole_answer_ends(engine):
    """The StreamEnd after the deltas carries the finish_reason and token counts that the
    non-streamed answer to the same greedy request has: "length" when max_tokens cut it,
    "stop" when a stop string did."""
    whole = engine.generate(["Zorblex is"], GenParams(max_tokens=5))[0]
    *deltas, end = engine.stream("Zorblex is", GenParams(max_tokens=5))
    assert whole.finish_reason == "length" and isinstance(end, StreamEnd)
    assert "".join(deltas) == whole.text
    assert (end.finish_reason, end.prompt_tokens, end.completion_tokens) == ("length", whole.prompt_tokens, 5)
    stop = whole.text.strip()[1:3]
    assert stop
    *deltas, end = engine.stream("Zorblex is", GenParams(max_tokens=5, stop=[stop]))
    cut = engine.generate(["Zorblex is"], GenParams(max_tokens=5, stop=[stop]))[0]
    assert ("".join(deltas), end.finish_reason) == (cut.text, cut.finish_reason) == (whole.text[:whole.text.find(stop)], "stop")
    assert end.completion_tokens == cut.completion_tokens  # the tokens that completed the stop string, both ways
    ids = engine.encode("Zorblex is")
    greedy = engine.model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)[0, len(ids):].tolist()
    k = cut.completion_tokens
    assert stop in engine.tokenizer.decode(greedy[:k]) and stop not in engine.tokenizer.decode(greedy[:k - 1])


def test_an_answer_cut_inside_a_character_drops_its_incomplete_bytes_streamed_or_not(engine):
    """A random model samples byte tokens, so max_tokens often ends an answer inside a UTF-8
    character, which decoding shows as U+FFFD. Both paths drop it, as vLLM's detokenizer does:
    the text is the raw decoding without its trailing U+FFFD, and stream and whole agree."""
    ids = engine.encode("Zorblex is")
    cut_inside = 0
    for seed in range(24):
        params = dict(max_tokens=3, temperature=1.0, top_p=1.0, seed=seed)
        whole = engine.generate(["Zorblex is"], GenParams(**params))[0]
        *deltas, end = engine.stream("Zorblex is", GenParams(**params))
        torch.manual_seed(seed)
        out = engine.model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=True, temperature=1.0,
                                    top_p=1.0, top_k=0, pad_token_id=engine.tokenizer.pad_token_id)
        raw = engine.tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)
        cut_inside += raw.endswith("\ufffd")
        assert whole.text == raw.rstrip("\ufffd") and not whole.text.endswith("\ufffd"), seed
        assert "".join(deltas) == whole.text and end.completion_tokens == whole.completion_tokens, seed
    assert cut_inside >= 3  # the case happened, so the assertions above tested it


def test_only_a_trailing_incomplete_character_is_held_back():
    """Mid-answer U+FFFD is text the model produced (an invalid byte): kept. A trailing one is
    held back while the stream may still complete it, and kept when a stop string ends the text
    right after it (the bytes after it were the stop, so it is final: vLLM keeps it too)."""
    from madpo_ray.serving.engine import complete_characters, visible_deltas

    assert complete_characters("a\ufffdb\ufffd\ufffd") == "a\ufffdb"
    assert list(visible_deltas(iter(["a\ufffd", " b"]), None)) == ["a", "\ufffd b"]
    assert list(visible_deltas(iter(["x\ufffd\nmore"]), ["\n"])) == ["x\ufffd"]
    assert list(visible_deltas(iter(["x\ufffd", "\ufffd"]), None)) == ["x"]


def test_a_stream_that_reaches_eos_ends_with_stop_like_the_whole_answer(engine):
    """EOS, not only a stop string, makes `stop`: a greedy token that first appears at position j
    is made the EOS, so both ways end there after j tokens."""
    for prompt in ("Zorblex is", "Zorblex is a Rust library for parsing TOML files.\nTL;DR:", "hello there"):
        ids = engine.encode(prompt)
        greedy = engine.model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
        j = next((j for j in range(1, len(greedy)) if greedy[j] not in greedy[:j]), 0)  # 0: the tiny model repeats
        if j:
            break
    assert engine.generate([prompt], GenParams(max_tokens=8))[0].finish_reason == "length"
    eos = engine.tokenizer.eos_token_id
    engine.tokenizer.eos_token_id = greedy[j]
    try:
        whole = engine.generate([prompt], GenParams(max_tokens=8))[0]
        *_, end = engine.stream(prompt, GenParams(max_tokens=8))
    finally:
        engine.tokenizer.eos_token_id = eos
    assert (whole.finish_reason, whole.completion_tokens) == ("stop", j), greedy
    assert (end.finish_reason, end.prompt_tokens, end.completion_tokens) == ("stop", len(ids), j)


def test_cancel_flag_stops_generation_early(engine):
    """A timed-out or disconnected caller sets its flag; the engine stops instead of running on."""
    full = engine.generate(["Zorblex is"], GenParams(max_tokens=64, temperature=1.0, seed=1))[0]
    cancel = threading.Event()
    cancel.set()
    cut = engine.generate(["Zorblex is"], GenParams(max_tokens=64, temperature=1.0, seed=1, cancel=cancel))[0]
    assert cut.completion_tokens <= 1 < full.completion_tokens


def test_stop_strings_stay_with_their_row(engine):
    full = engine.generate(["Zorblex is"], GenParams(max_tokens=12))[0].text
    stop = full.strip()[2:4]
    assert stop and stop in full
    rows = [GenParams(max_tokens=12, stop=[stop]), GenParams(max_tokens=12)]
    cut, whole = engine.generate(["Zorblex is", "Zorblex is"], rows)
    assert cut.text == full[:full.find(stop)] and whole.text == full


def test_special_token_text_is_plain_text(engine, tiny_tokenizer):
    """A user typing the EOS marker must not end their prompt or response (training and serving)."""
    from madpo_ray.data.collate import encode_prompt, encode_response

    eos = tiny_tokenizer.eos_token_id
    assert eos not in encode_prompt(tiny_tokenizer, "a <|eos|> b")
    assert encode_response(tiny_tokenizer, "a <|eos|> b").count(eos) == 1
    chat = engine.chat_prompt([{"role": "system", "content": "be brief"}, {"role": "user", "content": "x <|eos|>"}])
    ids = engine.encode(chat)
    assert eos not in ids and ids[0] == tiny_tokenizer.bos_token_id


def test_over_long_chat_is_refused_with_the_context_length(engine):
    from madpo_ray.serving.engine import ClientInputError

    with pytest.raises(ClientInputError, match="448 tokens"):
        engine.chat_prompt([{"role": "system", "content": "rules"}, {"role": "user", "content": "word " * 2000}])


def test_check_health_fails_on_a_wedged_engine(engine):
    """The Serve health check (PolicyServer.check_health) runs the engine: stuck (lock held), it raises."""
    from madpo_ray.serving.deployment import PolicyServer, engine_health

    assert hasattr(PolicyServer.func_or_class, "check_health")
    loop = asyncio.new_event_loop()  # not asyncio.run: it would wait for the stuck probe thread
    try:
        loop.run_until_complete(engine_health(engine, 5.0))
        with engine.lock:
            with pytest.raises(RuntimeError, match="no token"):
                loop.run_until_complete(engine_health(engine, 1.0))
    finally:
        loop.close()


# ---------------------------------------------------------------- keys, exposure, model folders

def test_key_is_never_put_in_the_runtime_env(monkeypatch):
    from madpo_ray.serving.launch import serve_runtime_env

    monkeypatch.setenv("MADPO_API_KEY", KEY)
    assert KEY not in repr(serve_runtime_env())


def test_empty_key_variable_refuses_instead_of_switching_auth_off(monkeypatch, tmp_path):
    from madpo_ray.serving.api import ApiKeyError, ServeSettings

    monkeypatch.setenv("MADPO_API_KEY", "")
    with pytest.raises(ApiKeyError, match="empty"):
        ServeSettings().resolve_api_key()
    (tmp_path / "key").write_text("")
    with pytest.raises(ApiKeyError, match="empty"):
        ServeSettings(api_key_file=str(tmp_path / "key")).resolve_api_key()
    (tmp_path / "key").write_text(KEY + "\n")
    monkeypatch.delenv("MADPO_API_KEY")
    assert ServeSettings(api_key_file=str(tmp_path / "key")).resolve_api_key() == KEY


def test_public_bind_without_key_refuses_to_start(monkeypatch):
    from madpo_ray.serving.launch import InsecureServeError, check_exposure, run_server

    monkeypatch.delenv("MADPO_API_KEY", raising=False)
    monkeypatch.delenv("MADPO_API_KEY_FILE", raising=False)
    with pytest.raises(InsecureServeError, match="--insecure"):
        run_server("unused", host="0.0.0.0")
    check_exposure("0.0.0.0", has_key=False, insecure=True)
    check_exposure("127.0.0.1", has_key=False, insecure=False)
    check_exposure("10.0.0.5", has_key=True, insecure=False)


def test_serve_accepts_the_stage_folder(tiny_base_dir, tmp_path):
    import shutil

    from madpo_ray.layout import model_folder
    from madpo_ray.serving.launch import resolve_model_folder

    stage = tmp_path / "policy" / "madpo"
    shutil.copytree(tiny_base_dir, model_folder(stage))
    assert resolve_model_folder(str(stage)) == str(model_folder(stage))
    assert resolve_model_folder(str(model_folder(stage))) == str(model_folder(stage))


# ---------------------------------------------------------------- a real Serve app on loopback

@pytest.fixture(scope="module")
def server(tiny_base_dir, tmp_path_factory):
    import ray
    from ray import serve

    from madpo_ray.serving.launch import run_server, serve_runtime_env

    key_file = tmp_path_factory.mktemp("secret") / "api_key"
    key_file.write_text(KEY)
    ray.init(address="local", num_cpus=2,
             runtime_env=serve_runtime_env(), include_dashboard=True, dashboard_host="127.0.0.1")
    run_server(str(tiny_base_dir), port=PORT, num_cpus=0.5, max_batch_size=16, batch_wait_timeout_s=0.05)
    run_server(str(tiny_base_dir), port=PORT, num_cpus=0.25, app_name="secured", route_prefix="/secured",
               api_key_file=str(key_file))
    run_server(str(tiny_base_dir), port=PORT, num_cpus=0.25, app_name="narrow", route_prefix="/narrow",
               batching=False, max_ongoing_requests=1, max_queued_requests=1)
    yield BASE
    serve.shutdown()
    ray.shutdown()


def post(path, body, **kw):
    return httpx.post(f"{BASE}{path}", json=body, timeout=60, **kw)


def stream_lines(path, body):
    with httpx.stream("POST", f"{BASE}{path}", json=body, timeout=30) as r:
        return r.status_code, [line for line in r.iter_lines() if line]


BAD_STREAMS = [({"seed": 2**70}, 400, "seed"), ({"seed": -1}, 400, "seed"), ({"top_p": 0}, 400, "top_p"),
               ({"temperature": 1e-30}, 200, None)]


@pytest.mark.ray
@pytest.mark.slow
def test_bad_streamed_requests_cannot_wedge_the_replica(server):
    msgs = [{"role": "user", "content": "hi"}]
    for _ in range(3):  # more bad streams than the replica has request threads
        for extra, status, field in BAD_STREAMS:
            code, lines = stream_lines(CHAT, {"messages": msgs, "max_tokens": 4, "stream": True, **extra})
            assert code == status, (extra, lines)
            if field:
                assert field in lines[0]
            else:
                assert lines[-1] == "data: [DONE]" and not any('"error"' in x for x in lines)
    t0 = time.time()
    assert post("/v1/completions", {"prompt": "Zorblex is", "max_tokens": 4}).status_code == 200
    assert time.time() - t0 < 5


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("path,body,field", [
    ("/v1/completions", b'{"prompt": "a \\ud800 b", "max_tokens": 2}', "prompt"),
    (CHAT, b'{"messages": [{"role": "user", "content": "\\udc00"}]}', "content"),
    ("/v1/summarize", b'{"document": "x \\ud800"}', "document"),
    ("/v1/completions", b'{"prompt": ["x"], "stop": ["\\ud800"]}', "stop"),
    ("/v1/completions", b'{"prompt": ["a","b","c","d","e","f","g","h"], "n": 8, "max_tokens": 64}', "budget"),
    (CHAT, ('{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "'
            + "word " * 1500 + '"}]}').encode(), "448 tokens"),
])
def test_client_errors_are_4xx_never_500(server, path, body, field):
    r = httpx.post(f"{BASE}{path}", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"]


@pytest.mark.ray
@pytest.mark.slow
def test_a_bad_request_fails_alone_among_good_ones(server):
    """Over HTTP (a lone surrogate) and inside one @serve.batch (a row whose generation raises)."""
    from ray import serve

    async def http_burst():
        async with httpx.AsyncClient(timeout=60) as c:
            bodies = [{"prompt": f"Package {i} is", "max_tokens": 3} for i in range(15)]
            good = [c.post(f"{BASE}/v1/completions", json=b) for b in bodies]
            bad = c.post(f"{BASE}/v1/completions", content=b'{"prompt": "\\ud800", "max_tokens": 3}',
                         headers={"content-type": "application/json"})
            return await asyncio.gather(*good, bad)

    *good, bad = asyncio.run(http_burst())
    assert [r.status_code for r in good] == [200] * 15 and bad.status_code == 400

    handle = serve.get_app_handle("madpo")
    params = dict(max_tokens=3, temperature=0.8, top_p=1.0)
    calls = [handle.generate.remote(f"Package {i} is", GenParams(**params, seed=7)) for i in range(15)]
    poisoned = handle.generate.remote("Package x is", GenParams(**params, seed=2**70))
    assert all(c.result(timeout_s=60).completion_tokens >= 1 for c in calls)
    with pytest.raises(Exception, match="[Oo]verflow|seed"):
        poisoned.result(timeout_s=60)


@pytest.mark.ray
@pytest.mark.slow
def test_stop_strings_never_leak_across_a_batch(server):
    prompt = "Zorblex is a Rust library.\nTL;DR:"
    full = post("/v1/completions", {"prompt": prompt, "max_tokens": 12}).json()["choices"][0]["text"]
    stop = full.strip()[2:4]
    assert stop and stop in full, full

    async def rounds():
        async with httpx.AsyncClient(timeout=60) as c:
            out = []
            for _ in range(20):
                a = c.post(f"{BASE}/v1/completions", json={"prompt": prompt, "max_tokens": 12, "stop": [stop]})
                b = c.post(f"{BASE}/v1/completions", json={"prompt": prompt, "max_tokens": 12})
                out.append(await asyncio.gather(a, b))
            return out

    for a, b in asyncio.run(rounds()):
        assert a.json()["choices"][0]["text"] == full[:full.find(stop)]
        assert b.json()["choices"][0]["text"] == full


@pytest.mark.ray
@pytest.mark.slow
def test_auth_uses_the_key_file_and_says_how(server):
    body = {"prompt": "x", "max_tokens": 2}
    r = post("/secured/v1/completions", body)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert post("/secured/v1/completions", body, headers={"Authorization": f"Bearer {KEY}x"}).status_code == 401
    assert post("/secured/v1/completions", body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


@pytest.mark.ray
@pytest.mark.slow
def test_a_full_queue_answers_503_with_retry_after(server):
    async def flood():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(c.post(f"{BASE}/narrow/v1/completions",
                                                 json={"prompt": f"Doc {i}", "max_tokens": 256, "temperature": 1.0})
                                          for i in range(8)))

    responses = asyncio.run(flood())
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 1 and codes.count(503) >= 1, codes
    assert set(codes) <= {200, 503}, codes
    assert all(r.headers.get("retry-after") == "1" for r in responses if r.status_code == 503)


def replica_rss_mib(app: str) -> float:
    """Resident memory of the app's replica actor, read from /proc via its pid (Ray state API)."""
    import ray
    from ray.util.state import list_actors

    gcs = ray.get_runtime_context().gcs_address  # this test's cluster, not another one on the machine
    actors = [a for a in list_actors(address=gcs, filters=[("state", "=", "ALIVE")], limit=1000)
              if a.class_name == f"ServeReplica:{app}:PolicyServer"]
    assert len(actors) == 1, [a.class_name for a in actors]
    for line in Path(f"/proc/{actors[0].pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def load(n: int, concurrency: int) -> list[int]:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as c:
        async def one(i):
            async with sem:
                body = {"prompt": f"Package {i} is a Rust library.\nTL;DR:", "max_tokens": 2,
                        "temperature": 0.0 if i % 2 else 0.7, "seed": i % 5, "stop": [str(i % 7)]}
                return (await c.post(f"{BASE}/v1/completions", json=body)).status_code
        return await asyncio.gather(*(one(i) for i in range(n)))


@pytest.mark.ray
@pytest.mark.slow
def test_2000_requests_at_concurrency_200_no_failures_no_leak(server):
    """Tolerance: replica RSS after the run within baseline + max(10%, 48 MiB), the baseline taken
    after a 400-request warm-up at the same concurrency (allocator pools and caches filled)."""
    asyncio.run(load(400, 200))
    baseline = replica_rss_mib("madpo")
    codes = asyncio.run(load(2000, 200))
    assert codes.count(200) == 2000, {c: codes.count(c) for c in set(codes)}
    time.sleep(2)
    after = replica_rss_mib("madpo")
    print(f"replica RSS baseline {baseline:.0f} MiB, after 2000 requests {after:.0f} MiB")
    assert after <= baseline + max(0.10 * baseline, 48), (baseline, after)
