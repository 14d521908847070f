"""The benchmark's statistics: nearest-rank percentiles and summaries."""

from __future__ import annotations

import pytest

from bench.stats import percentile, summarize


def test_percentiles_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 90) == 90.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([], 50) is None
    summary = summarize([0.5, 1.5, 2.5])
    assert (summary.count, summary.p50, summary.max) == (3, 1.5, 2.5)
    with pytest.raises(ValueError, match="percentile"):
        percentile(values, 101)
