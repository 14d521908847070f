"""The worker's memory report (worker/memory.py): the sites that grew since the baseline."""

from __future__ import annotations

import tracemalloc

from worker.memory import MemoryReport

_kept: list[bytes] = []


def keep_some() -> None:
    _kept.extend(bytes(1000) + bytes([i % 256]) for i in range(2000))


def test_the_report_names_the_site_that_grew_since_the_baseline() -> None:
    was_tracing = tracemalloc.is_tracing()
    report = MemoryReport(top=5)
    report.start()
    try:
        assert report.report() is None  # the baseline
        keep_some()
        lines = report.report()
        assert lines, "no growth reported"
        assert "test_memory.py" in lines[0] and "KiB" in lines[0], lines
        assert float(lines[0].split(" KiB")[0]) >= 1900, lines  # ~2,000 blocks of ~1 kB
    finally:
        _kept.clear()
        if not was_tracing:
            tracemalloc.stop()
