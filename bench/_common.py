"""Helpers shared by the benchmarks: a model to measure and a results table."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def default_model(out: Path) -> Path:
    """The policy of the last default run if there is one, else the tiny from-scratch base model."""
    trained = ROOT / "runs" / "tiny" / "policy" / "madpo" / "model"
    if trained.exists():
        return trained
    from madpo_ray.config import ModelConfig
    from madpo_ray.data.corpus.generated import generate_corpus
    from madpo_ray.models import build_tiny_base

    docs = generate_corpus(300)
    return build_tiny_base([d.document for d in docs] + [d.reference for d in docs], ModelConfig(), out)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def median_spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.1f}"
    return f"{statistics.median(values):.1f} (min {min(values):.1f}, max {max(values):.1f})"
