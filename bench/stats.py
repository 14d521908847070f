"""Small statistics helpers: percentiles (nearest rank) and latency summaries."""

from __future__ import annotations

import math
from collections.abc import Sequence

from pydantic import BaseModel


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not in 0..100")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class LatencySummary(BaseModel):
    """Seconds; None when nothing was measured."""

    count: int
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None
    mean: float | None


def summarize(values: Sequence[float]) -> LatencySummary:
    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 4)

    return LatencySummary(
        count=len(values),
        p50=r(percentile(values, 50)),
        p90=r(percentile(values, 90)),
        p99=r(percentile(values, 99)),
        max=r(max(values)) if values else None,
        mean=r(sum(values) / len(values)) if values else None,
    )
