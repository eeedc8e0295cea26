"""Property-based fuzzing (hypothesis): the data loader and the HTTP request schemas.

Whatever comes in, the loader either keeps a row or reports it (never an unhandled exception,
never a row lost without a count), and the server answers every body with a 2xx or a 4xx
carrying an OpenAI-style error, never a 500."""

import asyncio
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from madpo_ray.data.preference import DataValidationError, ValidationReport, load_pairs, validate_rows

FIELDS = ("prompt", "chosen", "rejected", "margin", "true_margin", "id")
scalars = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=40) | st.sampled_from(["", " ", "same", "\ud800", "\x00"]))
json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                                               kids, max_size=4),
                           max_leaves=12)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bogus"]),
                                           "content": scalars}), max_size=3)
rows = st.one_of(json_values,
                 st.dictionaries(st.sampled_from(FIELDS), scalars | messages | json_values, max_size=6))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(rows, max_size=12))
def test_validate_rows_keeps_or_counts_every_row(batch):
    report = ValidationReport(source="fuzz")
    kept = validate_rows(list(enumerate(batch)), report)
    assert len(kept) + report.skipped == len(batch) == report.total
    for r in kept:
        for k in ("prompt", "chosen", "rejected"):
            assert r[k]  # non-empty
        assert r["chosen"] != r["rejected"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=80) | rows.map(lambda r: json.dumps(r, allow_nan=True).encode("utf-8", "surrogatepass")),
                min_size=1, max_size=8))
def test_load_pairs_on_arbitrary_jsonl_bytes(tmp_path_factory, lines):
    f = tmp_path_factory.mktemp("fuzz") / "x.jsonl"
    f.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n")
    try:
        pairs, report = load_pairs(str(f))
    except DataValidationError as e:
        assert "no usable rows" in str(e) or "x.jsonl" in str(e)
        return
    assert len(pairs) + report.skipped == report.total


# --------------------------------------------------------------------------- HTTP
class EngineBackend:
    """The real transformers engine behind the async Backend interface (what a replica does,
    without Serve's batching)."""

    def __init__(self, engine):
        self.engine = engine

    async def generate(self, prompt, params):
        return (await asyncio.to_thread(self.engine.generate, [prompt], params))[0]

    async def stream(self, prompt, params):
        for piece in self.engine.stream(prompt, params):
            yield piece

    def chat_prompt(self, messages):
        return self.engine.chat_prompt(messages)


@pytest.fixture(scope="module")
def client(tiny_base_dir):
    from fastapi.testclient import TestClient

    from madpo_ray.serving.api import ServeSettings, create_app
    from madpo_ray.serving.engine import TransformersEngine

    app = create_app(EngineBackend(TransformersEngine(str(tiny_base_dir))), ServeSettings())
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


small_ints = st.integers(-3, 6) | st.sampled_from([0, 10**9, -10**9])
fields = {
    "prompt": scalars | st.lists(scalars, max_size=3),
    "messages": messages | json_values,
    "document": scalars,
    "max_tokens": small_ints | scalars,
    "temperature": st.floats(-1, 3) | scalars,
    "top_p": st.floats(-1, 2) | scalars,
    "n": small_ints | scalars,
    "stop": scalars | st.lists(scalars, max_size=3),
    "stream": st.booleans() | scalars,
    "seed": small_ints | scalars,
    "model": scalars,
    "stream_options": json_values | st.fixed_dictionaries({"include_usage": st.booleans() | scalars}),
}
bodies = st.one_of(
    st.fixed_dictionaries({}, optional=fields),
    json_values,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/summarize"]),
       body=bodies, raw=st.none() | st.binary(max_size=64))
def test_http_bodies_never_crash_the_server(client, path, body, raw):
    if raw is not None:
        r = client.post(path, content=raw, headers={"content-type": "application/json"})
    else:
        r = client.post(path, content=json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass"),
                        headers={"content-type": "application/json"})
    assert r.status_code < 500, (path, body, raw, r.status_code, r.text[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["message"] and err["type"]
    elif path == "/v1/summarize":  # its own response shape, not OpenAI's
        assert isinstance(r.json()["summary"], str) and r.json()["finish_reason"]
    elif "text/event-stream" not in r.headers.get("content-type", ""):
        assert "choices" in r.json()
