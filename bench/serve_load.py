"""Serving load test: requests/s and p50/p95/p99 latency at several concurrencies, for the
batched (@serve.batch) and unbatched deployments of the same model, measured in one run.

    python bench/serve_load.py [--model DIR] [--concurrency 1,4,16,32] [--requests 96]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from _common import ROOT, default_model, percentile

import httpx

PORT = 8395


async def load(url: str, n: int, concurrency: int, max_tokens: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    latencies, failures = [], 0
    async with httpx.AsyncClient(timeout=300) as client:
        async def one(i: int):
            nonlocal failures
            async with sem:
                t0 = time.perf_counter()
                r = await client.post(url, json={"prompt": f"Package {i} is a Rust library for parsing TOML files."
                                                           "\nTL;DR:", "max_tokens": max_tokens})
                if r.status_code != 200:
                    failures += 1
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - t0
    return {"requests": n, "concurrency": concurrency, "failures": failures, "req_per_s": n / wall,
            "p50_ms": 1000 * percentile(latencies, 0.5), "p95_ms": 1000 * percentile(latencies, 0.95),
            "p99_ms": 1000 * percentile(latencies, 0.99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--concurrency", default="1,4,16,32")
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()

    import ray
    from ray import serve

    from madpo_ray.serving.launch import run_server, serve_runtime_env

    model = Path(args.model) if args.model else default_model(Path(tempfile.mkdtemp()) / "model")
    ray.init(num_cpus=2, runtime_env=serve_runtime_env(), include_dashboard=True, dashboard_host="127.0.0.1")
    # One replica each, one thread each: the two apps compete only while one is being measured.
    run_server(str(model), port=PORT, num_cpus=1, app_name="batched", route_prefix="/batched", max_batch_size=16)
    run_server(str(model), port=PORT, num_cpus=1, app_name="unbatched", route_prefix="/unbatched", batching=False)
    base = f"http://127.0.0.1:{PORT}"
    for app in ("batched", "unbatched"):  # warm-up
        asyncio.run(load(f"{base}/{app}/v1/completions", 8, 4, args.max_tokens))

    rows = []
    for c in [int(x) for x in args.concurrency.split(",")]:
        for app in ("batched", "unbatched"):
            r = asyncio.run(load(f"{base}/{app}/v1/completions", args.requests, c, args.max_tokens))
            rows.append({"app": app, **r})
    serve.shutdown()
    ray.shutdown()

    print(f"\nmodel: {model}   requests per level: {args.requests}   max_tokens: {args.max_tokens}")
    print(f"{'concurrency':>11} {'app':>10} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'fail':>5}")
    for r in rows:
        print(f"{r['concurrency']:>11} {r['app']:>10} {r['req_per_s']:>8.1f} {r['p50_ms']:>8.0f} {r['p95_ms']:>8.0f} "
              f"{r['p99_ms']:>8.0f} {r['failures']:>5}")
    print("\nbatched / unbatched throughput (same run, same model):")
    for c in sorted({r["concurrency"] for r in rows}):
        b = next(r for r in rows if r["concurrency"] == c and r["app"] == "batched")
        u = next(r for r in rows if r["concurrency"] == c and r["app"] == "unbatched")
        print(f"  concurrency {c:>3}: {b['req_per_s'] / u['req_per_s']:.2f}x")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
