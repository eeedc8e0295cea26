"""Coalescing streamed events (serving/streaming.py): the same bytes in the same order in fewer
writes, the first events never held back, a held event delayed at most the window, errors and
early exits passed through."""

import asyncio
import time

import pytest

from madpo_ray.serving.streaming import coalesce


async def source(events, gaps, log=None):
    """`events`, each after its gap in seconds; records its own closing in `log`."""
    try:
        for event, gap in zip(events, gaps):
            await asyncio.sleep(gap)
            yield event
    finally:
        if log is not None:
            log.append("closed")


async def collect(stream):
    t0, out = time.perf_counter(), []
    async for chunk in stream:
        out.append((time.perf_counter() - t0, chunk))
    return out


def run(coro):
    return asyncio.run(coro)


def test_same_bytes_in_order_in_fewer_writes_first_ones_alone():
    events = [f"data: {i}\n\n" for i in range(40)]
    out = run(collect(coalesce(source(events, [0.0] + [0.001] * 39), window_s=0.05, max_events=8, immediate=2)))
    writes = [c for _, c in out]
    assert "".join(writes) == "".join(events)
    assert writes[:2] == events[:2]  # the opening chunk and the first token, alone and at once
    assert len(writes) < 20 and all(w.count("data:") <= 8 for w in writes)


def test_the_first_token_is_never_held_back():
    out = run(collect(coalesce(source(["a", "b"], [0.0, 0.5]), window_s=0.2, max_events=16)))
    assert out[0][1] == "a" and out[0][0] < 0.1


def test_a_held_event_waits_at_most_the_window():
    out = run(collect(coalesce(source(["a", "b", "c"], [0.0, 0.0, 0.6]), window_s=0.05, max_events=16)))
    assert [c for _, c in out] == ["a", "b", "c"]
    assert out[1][0] < 0.3  # "b" went out when its window closed, not with "c" 0.6 s later


def test_zero_window_passes_every_event_through_alone():
    events = ["a", "b", "c", "d"]
    assert [c for _, c in run(collect(coalesce(source(events, [0] * 4), window_s=0, max_events=16)))] == events


def test_an_error_after_some_events_reaches_the_route_after_them():
    async def failing():
        yield "a"
        yield "b"
        raise RuntimeError("engine died")

    async def go():
        got = []
        with pytest.raises(RuntimeError, match="engine died"):
            async for chunk in coalesce(failing(), window_s=0.05, max_events=16):
                got.append(chunk)
        return got

    assert "".join(run(go())) == "ab"


def test_leaving_early_closes_the_source():
    log = []

    async def go():
        stream = coalesce(source([str(i) for i in range(100)], [0.01] * 100, log), window_s=0.05, max_events=4)
        async for _ in stream:
            break
        await stream.aclose()

    run(go())
    assert log == ["closed"]
