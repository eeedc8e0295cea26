"""Issue #13: no request can wedge, poison or leak into another. Each defect is reproduced against
the real engine, or a real Ray Serve app on loopback over real HTTP, and must stay fixed."""

import asyncio
import os
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from madpo_ray.serving.engine import GenParams, RowSampler, StreamEnd, TransformersEngine

from helpers import SERVE_FILE_KEY as KEY
from helpers import SERVE_PORT as PORT

BASE = f"http://127.0.0.1:{PORT}"
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
        sampler = RowSampler([GenParams(**params)])  # the row's own seeded stream, as the engine draws it
        out = engine.model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False, logits_processor=[sampler],
                                    pad_token_id=engine.tokenizer.pad_token_id)
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
    from madpo_ray.data.chat import ClientInputError

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


def test_seeded_sampling_never_touches_the_process_wide_rng(engine):
    """Issue #33: a seeded request set torch's global RNG, so the next unseeded request of another
    client drew exactly what the seed dictated (3 of 3 identical). Each row has its own generator."""
    torch.manual_seed(0)
    state = torch.get_rng_state()
    seeded, unseeded = GenParams(max_tokens=12, temperature=1.0, seed=5), GenParams(max_tokens=12, temperature=1.0)
    after = []
    for _ in range(3):
        engine.generate(["Zorblex is"], seeded)
        text_of(engine.stream("Zorblex is", GenParams(max_tokens=4, temperature=1.0, seed=5)))
        after.append(engine.generate(["Zorblex is"], unseeded)[0].text)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(set(after)) > 1, after


def test_a_seeded_row_draws_the_same_alone_as_in_any_batch(engine):
    """Identical seeded requests sent together gave other text than the same request alone (one
    RNG stream for the whole batch). Now a row's draws depend on its seed and sample index only."""
    seeded = GenParams(max_tokens=12, temperature=1.0, seed=3)
    [alone] = engine.generate(["Zorblex is"], seeded)
    rows = [seeded] * 4 + [GenParams(max_tokens=12, temperature=0.7), GenParams(max_tokens=12, temperature=1.0, seed=9)]
    together = engine.generate(["Zorblex is"] * 4 + ["A Go daemon", "Zorblex is"], rows)
    assert [r.text for r in together[:4]] == [alone.text] * 4
    assert "".join(text_of(engine.stream("Zorblex is", GenParams(max_tokens=12, temperature=1.0, seed=3)))) == alone.text
    second = [engine.generate(["Zorblex is"], GenParams(max_tokens=12, temperature=1.0, seed=3, sample=1))[0].text
              for _ in range(2)]
    assert second[0] == second[1] != alone.text  # sample 1 of a seeded request: its own stream, reproducible


def test_concurrent_chat_encodes_keep_user_special_tokens_as_text(engine, tiny_tokenizer):
    """Issue #33: chat encoding switches split_special_tokens on the shared fast tokenizer per
    segment; concurrent encodes on other threads failed ("Already borrowed") or read a user's
    "<|eos|>" as the end marker. Eight threads, chats and decodes at once: neither happens."""
    eos, errors = tiny_tokenizer.eos_token_id, []
    messages = [{"role": "system", "content": "be brief " * 8}, {"role": "user", "content": "x <|eos|> word " * 12}]

    def work():
        try:
            for _ in range(150):
                ids = engine.encode(engine.chat_prompt(messages))
                assert eos not in ids
                engine.tokenizer.decode(ids)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(e))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_a_replica_that_must_require_a_key_and_has_none_refuses(monkeypatch, tiny_base_dir):
    """Told `require_key` (by madpo serve for a public bind, by the shipped serving/config.yaml) or
    $MADPO_REQUIRE_KEY, a replica without a key in its own environment refuses to start."""
    import yaml

    from madpo_ray.serving.api import ApiKeyError, ServeSettings
    from madpo_ray.serving.deployment import PolicyServer

    monkeypatch.delenv("MADPO_API_KEY", raising=False)
    monkeypatch.delenv("MADPO_API_KEY_FILE", raising=False)
    monkeypatch.delenv("MADPO_REQUIRE_KEY", raising=False)
    assert ServeSettings().resolve_api_key() is None  # loopback development: no key, no auth
    with pytest.raises(ApiKeyError, match="must require an API key"):
        ServeSettings(require_key=True).resolve_api_key()
    monkeypatch.setenv("MADPO_REQUIRE_KEY", "1")
    with pytest.raises(ApiKeyError, match="must require an API key"):
        ServeSettings().resolve_api_key()
    monkeypatch.delenv("MADPO_REQUIRE_KEY")
    # the shipped serving/config.yaml's comment says its replicas refuse without a key: its own args make them.
    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "madpo_ray" / "serving" / "config.yaml").read_text())
    args = {**config["applications"][0]["args"], "model": str(tiny_base_dir), "backend": "transformers"}
    assert config["http_options"]["host"] == "0.0.0.0" and args["require_key"] is True
    assert config["http_options"]["request_timeout_s"] > args["request_timeout_s"] + args["body_timeout_s"]
    replica = PolicyServer.func_or_class.__mro__[1]  # the class under Serve's ingress wrapper, as a replica builds it
    with pytest.raises(ApiKeyError, match="must require an API key"):
        replica(**args)
    monkeypatch.setenv("MADPO_API_KEY", KEY)
    assert replica(**args).api_key == KEY


def test_public_bind_without_key_is_one_line_not_a_traceback(tiny_base_dir, tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("MADPO_API_KEY", "MADPO_API_KEY_FILE")}
    out = subprocess.run([sys.executable, "-m", "madpo_ray", "serve", "--model", str(tiny_base_dir), "--host", "0.0.0.0"],
                         env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    text = (out.stdout + out.stderr).strip()
    assert out.returncode == 2 and "Traceback" not in text, text
    assert text.count("\n") == 0 and "refusing to serve on 0.0.0.0" in text and "--insecure" in text


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
    from madpo_ray.serving.folders import resolve_model_folder

    stage = tmp_path / "policy" / "madpo"
    shutil.copytree(tiny_base_dir, model_folder(stage))
    assert resolve_model_folder(str(stage)) == str(model_folder(stage))
    assert resolve_model_folder(str(model_folder(stage))) == str(model_folder(stage))


# ---------------------------------------------------------------- a real Serve app on loopback

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
    r = post("/guarded/v1/completions", body)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert post("/guarded/v1/completions", body, headers={"Authorization": f"Bearer {KEY}x"}).status_code == 401
    assert post("/guarded/v1/completions", body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


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


def slow_uploads(count: int, key: str = "", path: str = "/guarded/v1/completions") -> list:
    """Connections that declare a 60 kB body and send one byte of it: what a slow-body attacker
    (or a client on a very bad link) looks like to the server."""
    import socket

    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", PORT), timeout=20)
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: 60000\r\n{auth}\r\n{{".encode())
        socks.append(sock)
    return socks


def answer_of(sock) -> tuple[int, str]:
    """(status, the head and what came of the body) of the answer on a raw connection."""
    data = sock.recv(65536).decode("latin-1")
    sock.close()
    return int(data.split()[1]), data.lower()


@pytest.mark.ray
@pytest.mark.slow
def test_keyless_slow_bodies_cannot_hold_the_replica(server):
    """Issue #33: ~70 keyless connections trickling a declared 60 kB body held every request slot
    (the size limit read the body before the key was checked, with no deadline). The key is now
    decided on the headers: each is a 401 at once, and a keyed request and /healthz pass."""
    socks = slow_uploads(70)
    try:
        t0 = time.time()
        ok = post("/guarded/v1/completions", {"prompt": "Zorblex is", "max_tokens": 2},
                  headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200 and time.time() - t0 < 10
        assert httpx.get(f"{BASE}/guarded/healthz", timeout=10).status_code == 200
        assert [answer_of(s)[0] for s in socks] == [401] * 70
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.ray
@pytest.mark.slow
def test_a_keyed_slow_body_gets_408_and_slow_bodies_are_capped_per_replica(server):
    """With the key: every body must arrive within body_timeout_s (3 s here, 408); past the
    grace (0.5 s) a body needs one of max_slow_bodies (2) slots, else 503 with Retry-After. A
    normal request passes meanwhile."""
    t0 = time.time()
    socks = slow_uploads(5, KEY)
    try:
        ok = post("/guarded/v1/completions", {"prompt": "Zorblex is", "max_tokens": 2},
                  headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200 and time.time() - t0 < 3
        answers = [answer_of(s) for s in socks]
    finally:
        for sock in socks:
            sock.close()
    assert sorted(code for code, _ in answers) == [408, 408, 503, 503, 503], answers
    assert all("retry-after: 1" in text for code, text in answers if code == 503)
    assert time.time() - t0 < 8  # 408 at the 3 s deadline, not whenever the client gives up


@pytest.mark.ray
@pytest.mark.slow
def test_serves_own_request_timeout_is_set_on_the_proxies(server):
    from madpo_ray.serving.launch import proxy_http_options

    options = proxy_http_options()
    assert options.host == "127.0.0.1" and options.port == PORT
    assert options.request_timeout_s == 60 + 10 + 30  # the app's timeout, its body deadline, a margin


@pytest.mark.ray
@pytest.mark.slow
def test_requests_queued_for_a_full_replica_are_retried_within_50_ms(server):
    """Past max_ongoing_requests a request waits in the proxy's router, which retries after a
    backoff; at Serve's default (up to 0.5 s) the concurrency-200 test drained at 4 requests a second.
    Read back from Serve's controller, which hands it to the proxies' routers, for apps deployed as
    `madpo serve` deploys them; test_k8s checks that the shipped serve configs do not replace it."""
    import ray

    from madpo_ray.serving.launch import serve_controller

    details = ray.get(serve_controller().get_serve_instance_details.remote())
    for app in ("madpo", "narrow"):
        deployed = details["applications"][app]["deployments"]["PolicyServer"]["deployment_config"]
        router = deployed["request_router_config"]
        assert router["initial_backoff_s"] <= 0.01 and router["max_backoff_s"] <= 0.05, (app, router)


@pytest.mark.ray
@pytest.mark.slow
def test_madpo_serve_checks_where_the_running_proxies_listen(server, tiny_base_dir, monkeypatch):
    """On a cluster where Serve already runs, serve.start keeps its proxies whatever host was asked
    for: proxies already on all interfaces with no key are refused before anything is deployed."""
    from types import SimpleNamespace

    from ray import serve

    from madpo_ray.serving import launch

    monkeypatch.delenv("MADPO_API_KEY", raising=False)
    monkeypatch.delenv("MADPO_API_KEY_FILE", raising=False)
    monkeypatch.setattr(launch, "proxy_http_options", lambda: SimpleNamespace(host="0.0.0.0", port=PORT))
    with pytest.raises(launch.InsecureServeError, match="0.0.0.0 .where Serve's proxies already listen"):
        launch.run_server(str(tiny_base_dir), port=PORT, num_cpus=0.25, app_name="exposed", route_prefix="/exposed")
    assert "exposed" not in serve.status().applications


@pytest.mark.ray
@pytest.mark.slow
def test_a_key_only_in_the_drivers_environment_makes_the_replicas_refuse(server, tiny_base_dir, monkeypatch):
    """The driver has a key, the replicas' environment (fixed when the cluster started) does not:
    they used to serve openly; told that a key is required, they refuse, and run_server says so."""
    from ray import serve

    from madpo_ray.serving.launch import InsecureServeError, run_server

    monkeypatch.setenv("MADPO_LATE_KEY", KEY)  # set after the cluster started: its workers never see it
    try:
        with pytest.raises(InsecureServeError, match="replicas refused to start: .*must require an API key"):
            run_server(str(tiny_base_dir), port=PORT, num_cpus=0.25, app_name="late", route_prefix="/late",
                       api_key_env="MADPO_LATE_KEY")
        assert httpx.post(f"{BASE}/late/v1/completions", json={"prompt": "x"}, timeout=10).status_code != 200
    finally:
        serve.delete("late")


@pytest.mark.ray
@pytest.mark.slow
def test_the_bearer_scheme_is_case_insensitive(server):
    body = {"prompt": "x", "max_tokens": 2}
    for scheme in ("bearer", "BEARER", "Bearer"):
        assert post("/guarded/v1/completions", body, headers={"Authorization": f"{scheme} {KEY}"}).status_code == 200
    for header in (f"Basic {KEY}", KEY, f"Bearer{KEY}"):
        assert post("/guarded/v1/completions", body, headers={"Authorization": header}).status_code == 401


@pytest.mark.ray
@pytest.mark.slow
def test_the_request_budget_counts_prompt_tokens(server):
    """16 long prompts x n=8 were ~57k prompt tokens and passed the generated-only budget."""
    prompts = [f"Package {i} is a Rust library for parsing TOML files. " * 40 for i in range(16)]
    r = post("/v1/completions", {"prompt": prompts, "n": 8, "max_tokens": 16, "temperature": 0.7})
    assert r.status_code == 400 and "budget" in r.json()["error"]["message"], r.text[:300]
    assert post("/v1/completions", {"prompt": prompts[:2], "max_tokens": 16}).status_code == 200


@pytest.mark.ray
@pytest.mark.slow
def test_seeds_stay_with_their_request_over_http(server):
    """A seeded request no longer decides the next unseeded one; identical seeded requests sent
    together get what one gets alone; the n samples of a seeded request differ and repeat."""
    seeded = {"prompt": "Zorblex is", "max_tokens": 12, "temperature": 1.0, "seed": 4}
    texts = []
    for _ in range(3):
        post("/v1/completions", seeded)
        texts.append(post("/v1/completions", {**seeded, "seed": None}).json()["choices"][0]["text"])
    assert len(set(texts)) > 1, texts
    alone = post("/v1/completions", seeded).json()["choices"][0]["text"]

    async def together():
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*(c.post(f"{BASE}/v1/completions", json=seeded) for _ in range(6)))

    assert [r.json()["choices"][0]["text"] for r in asyncio.run(together())] == [alone] * 6
    n3 = [[c["text"] for c in post("/v1/completions", {**seeded, "n": 3}).json()["choices"]] for _ in range(2)]
    assert n3[0] == n3[1] and n3[0][0] == alone and len(set(n3[0])) == 3


async def chat_load(path: str, n: int, concurrency: int) -> list[int]:
    """Chats whose messages carry special-token text, `concurrency` at a time: the tokenizer is
    used by the event loop and the generation threads at once."""
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120) as c:
        async def one(i):
            messages = [{"role": "system", "content": f"rule {i} <|eos|>"},
                        {"role": "user", "content": f"Summarise package {i} <|bos|> now"}]
            async with sem:
                return (await c.post(f"{BASE}{path}", json={"messages": messages, "max_tokens": 3,
                                                             "stream": i % 4 == 0})).status_code
        return await asyncio.gather(*(one(i) for i in range(n)))


@pytest.mark.ray
@pytest.mark.slow
def test_concurrent_chats_all_succeed(server):
    """Every chat succeeds, but for streams over the replica's stream limit (503, Retry-After)."""
    codes = asyncio.run(chat_load(CHAT, 200, 50))
    whole, streamed = [c for i, c in enumerate(codes) if i % 4], codes[::4]
    assert whole.count(200) == 150 and set(streamed) <= {200, 503}, {c: codes.count(c) for c in set(codes)}
    assert streamed.count(200) >= 4


@pytest.mark.ray
@pytest.mark.slow
def test_streams_are_capped_per_replica_and_starve_neither_requests_nor_the_health_check(server):
    """Issue #33: 60 streams of 256 tokens ran one after another, each holding the engine lock and a
    default-executor thread; a light request waited 50 s and the health check needed the same lock.
    Now a transformers replica streams at most max_streams (4) at once on its own threads, the rest
    get 503 with Retry-After at once, and a light request and the health check pass meanwhile."""
    from ray import serve

    handle = serve.get_app_handle("madpo")
    body = {"prompt": "Zorblex is", "max_tokens": 256, "temperature": 1.0, "stream": True}

    async def scenario():
        async with httpx.AsyncClient(timeout=120) as c:
            async def one_stream():
                async with c.stream("POST", f"{BASE}/v1/completions", json=body) as r:
                    return r.status_code, r.headers.get("retry-after"), [line async for line in r.aiter_lines() if line]

            streams = [asyncio.create_task(one_stream()) for _ in range(16)]
            await asyncio.sleep(0.5)
            t0 = time.time()
            light = await c.post(f"{BASE}/v1/completions", json={"prompt": "x", "max_tokens": 1})
            light_s, t0 = time.time() - t0, time.time()
            await asyncio.to_thread(lambda: handle.check_health.remote().result(timeout_s=60))
            return await asyncio.gather(*streams), light, light_s, time.time() - t0

    streams, light, light_s, health_s = asyncio.run(scenario())
    codes = [code for code, _, _ in streams]
    print(f"streams {sorted(codes)}; light request {light_s:.2f}s; health check {health_s:.2f}s")
    assert codes.count(503) >= 8 and codes.count(200) >= 1, codes
    assert all(retry == "1" for code, retry, _ in streams if code == 503)
    assert all(lines[-1] == "data: [DONE]" and '"error"' not in "".join(lines) for code, _, lines in streams if code == 200)
    assert light.status_code == 200 and light_s < 15
    assert health_s < 5


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


# CI sends 400 requests after a 200-request warm-up; the soak of the same check (2000 after 400)
# is `MADPO_SOAK_REQUESTS=2000 pytest tests/serving/test_serve_hardening.py -k no_leak` (bench/README.md).
SOAK_REQUESTS = int(os.environ.get("MADPO_SOAK_REQUESTS", "400"))


@pytest.mark.ray
@pytest.mark.slow
def test_many_requests_at_concurrency_200_no_failures_no_leak(server):
    """Tolerance: replica RSS after the run within baseline + max(10%, 48 MiB), the baseline taken
    after a warm-up of a fifth as many requests at the same concurrency (allocator pools and caches filled)."""
    asyncio.run(load(max(200, SOAK_REQUESTS // 5), 200))
    baseline = replica_rss_mib("madpo")
    codes = asyncio.run(load(SOAK_REQUESTS, 200))
    assert codes.count(200) == SOAK_REQUESTS, {c: codes.count(c) for c in set(codes)}
    time.sleep(2)
    after = replica_rss_mib("madpo")
    print(f"replica RSS baseline {baseline:.0f} MiB, after {SOAK_REQUESTS} requests {after:.0f} MiB")
    assert after <= baseline + max(0.10 * baseline, 48), (baseline, after)
