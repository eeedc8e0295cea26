"""The FastAPI routes without Ray: a backend slower than the request timeout gets a 504 with an
OpenAI-style body on every generating route, and the app keeps answering."""

import asyncio
import json

from fastapi.testclient import TestClient

from madpo_ray.serving.api import ServeSettings, create_app
from madpo_ray.serving.engine import GenResult, StreamEnd


class SlowBackend:
    async def generate(self, prompt, params):
        await asyncio.sleep(1.0)
        return GenResult("late", "stop", 1, 1)

    def chat_prompt(self, messages):
        return messages[-1]["content"]


def test_timeouts_are_504_on_every_route():
    client = TestClient(create_app(SlowBackend(), ServeSettings(request_timeout_s=0.05)))
    for path, body in (("/v1/completions", {"prompt": "x"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                       ("/v1/summarize", {"document": "x"})):
        r = client.post(path, json=body)
        assert r.status_code == 504, (path, r.text)
        assert r.json()["error"]["type"] == "timeout" and "0.05s" in r.json()["error"]["message"]
    assert client.get("/healthz").status_code == 200


class EchoBackend:
    def __init__(self, word):
        self.word = word

    async def generate(self, prompt, params):
        return GenResult(f"{self.word}:{prompt}", "stop", 1, 1)

    def chat_prompt(self, messages):
        return messages[-1]["content"]


def test_each_app_keeps_its_own_backend_and_settings():
    """Backend and settings live on the app, not in the module: two apps in one process stay apart."""
    a = TestClient(create_app(EchoBackend("a"), ServeSettings(model_name="model-a", prompt_template="A {document}")))
    b = TestClient(create_app(EchoBackend("b"), ServeSettings(model_name="model-b")))
    assert a.get("/healthz").json()["model"] == "model-a" and b.get("/healthz").json()["model"] == "model-b"
    assert a.post("/v1/summarize", json={"document": "x"}).json()["summary"] == "a:A x"
    assert b.post("/v1/summarize", json={"document": "x"}).json()["summary"] == "b:x\nTL;DR:"
    assert b.post("/v1/completions", json={"prompt": "y"}).json()["choices"][0]["text"] == "b:y"


def test_an_app_without_a_backend_answers_500_with_an_error_body():
    client = TestClient(create_app(), raise_server_exceptions=False)
    assert client.get("/healthz").json()["model"] == ServeSettings().model_name
    r = client.post("/v1/completions", json={"prompt": "x"})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"


class AdapterEchoBackend:
    """Answers with the adapter each request was routed to, so routing is visible."""

    async def generate(self, prompt, params):
        return GenResult(f"{params.adapter}", "stop", 1, 1)

    def chat_prompt(self, messages):
        return messages[-1]["content"]


def test_the_model_field_picks_an_adapter_and_unknown_names_are_refused_only_when_adapters_are_served():
    client = TestClient(create_app(AdapterEchoBackend(), ServeSettings(model_name="base", adapters=("a", "b"))))
    assert [(m["id"], m.get("parent")) for m in client.get("/v1/models").json()["data"]] == \
        [("base", None), ("a", "base"), ("b", "base")]
    for asked, routed in (("a", "a"), ("b", "b"), ("base", "None"), (None, "None")):
        body = {"prompt": "x"} if asked is None else {"prompt": "x", "model": asked}
        got = client.post("/v1/completions", json=body).json()
        assert (got["choices"][0]["text"], got["model"]) == (routed, asked or "base")
        chat = client.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": "x"}]}).json()
        assert chat["choices"][0]["message"]["content"] == routed
        summary = client.post("/v1/summarize", json={**{k: v for k, v in body.items() if k != "prompt"},
                                                     "document": "d"}).json()
        assert (summary["summary"], summary["model"]) == (routed, asked or "base")
    assert client.post("/v1/summarize", json={"document": "d", "model": "A"}).status_code == 404
    r = client.post("/v1/chat/completions", json={"model": "A", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert "base, a, b" in r.json()["error"]["message"]
    # A server of one model keeps answering to any name (clients send whatever they were configured with).
    single = TestClient(create_app(AdapterEchoBackend(), ServeSettings(model_name="base")))
    assert single.post("/v1/completions", json={"prompt": "x", "model": "gpt-4"}).json()["choices"][0]["text"] == "None"


class CountingStreamBackend:
    """Streams two deltas and ends as a max_tokens cut after 2 of 7 prompt tokens would."""

    async def stream(self, prompt, params):
        for piece in ("ab", "cd"):
            yield piece
        yield StreamEnd("length", 7, 2)

    def chat_prompt(self, messages):
        return messages[-1]["content"]


def sse_chunks(response) -> list[dict]:
    lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_a_stream_closes_with_the_backends_finish_reason_and_usage_when_asked():
    client = TestClient(create_app(CountingStreamBackend(), ServeSettings(model_name="m")))
    chat = {"messages": [{"role": "user", "content": "x"}], "stream": True}
    plain = sse_chunks(client.post("/v1/chat/completions", json=chat))
    assert [c["choices"][0]["finish_reason"] for c in plain] == [None, None, None, "length"]
    assert all("usage" not in c for c in plain)  # only when asked
    off = sse_chunks(client.post("/v1/chat/completions", json={**chat, "stream_options": {"include_usage": False}}))
    assert len(off) == len(plain) and all(c["choices"] for c in off)
    asked = sse_chunks(client.post("/v1/chat/completions", json={**chat, "stream_options": {"include_usage": True}}))
    assert asked[:-1] == [{**c, "created": a["created"], "id": a["id"]} for c, a in zip(plain, asked)]
    assert asked[-1]["choices"] == [] and asked[-1]["object"] == "chat.completion.chunk"
    assert len({c["id"] for c in asked}) == 1  # the usage chunk belongs to the same stream
    assert asked[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    text = sse_chunks(client.post("/v1/completions", json={"prompt": "x", "stream": True,
                                                           "stream_options": {"include_usage": True}}))
    assert ["".join(c["choices"][0]["text"] for c in text[:-1]), text[-2]["choices"][0]["finish_reason"]] == \
        ["abcd", "length"]
    assert text[-1]["object"] == "text_completion" and text[-1]["usage"]["total_tokens"] == 9
    r = client.post("/v1/completions", json={"prompt": "x", "stream_options": {"include_usage": True}})
    assert r.status_code == 400 and "stream_options" in r.json()["error"]["message"]


class CountingBackend:
    """Counts generate calls; each call's text says which it was."""

    def __init__(self):
        self.calls = 0

    async def generate(self, prompt, params):
        self.calls += 1
        return GenResult(f"{prompt}#{self.calls}", "length", 3, 2)

    def chat_prompt(self, messages):
        return messages[-1]["content"]


def test_greedy_n_is_generated_once_and_copied():
    """Issue #33: greedy n>1 computed n identical rows. Sampled n still gets n draws."""
    backend = CountingBackend()
    client = TestClient(create_app(backend, ServeSettings()))
    body = client.post("/v1/completions", json={"prompt": ["a", "b"], "n": 4, "max_tokens": 2}).json()
    assert backend.calls == 2 and [c["text"] for c in body["choices"]] == ["a#1"] * 4 + ["b#2"] * 4
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 16, "total_tokens": 22}
    client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "c"}], "n": 3, "temperature": 0.5})
    assert backend.calls == 5


class EngineBackend:
    """A real engine's chat rendering behind the routes (what the replica hands on)."""

    def __init__(self, engine):
        self.engine = engine

    async def generate(self, prompt, params):
        return GenResult("ok", "stop", 1, 1)

    def chat_prompt(self, messages):
        return self.engine.chat_prompt(messages)


def test_chat_template_errors_are_400_and_no_template_is_501(tiny_base_dir):
    """A strict template (no system role) refusing the messages was a 500; so was a model without a
    chat template. Now the client's 400 naming `messages`, and 501 for the missing template."""
    from madpo_ray.serving.engine import TransformersEngine

    engine = TransformersEngine(str(tiny_base_dir))
    client = TestClient(create_app(EngineBackend(engine), ServeSettings()))
    chat = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}]}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    engine.tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                                      "{{ raise_exception('System role not supported') }}{% endif %}"
                                      "{{ m['content'] }}{% endfor %}")
    r = client.post("/v1/chat/completions", json=chat)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "System role not supported" in r.json()["error"]["message"]
    assert client.post("/v1/chat/completions", json={"messages": chat["messages"][1:]}).status_code == 200
    engine.tokenizer.chat_template = None
    r = client.post("/v1/chat/completions", json=chat)
    assert r.status_code == 501 and "no chat template" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "not_implemented"
