"""A flow for tests/integration/test_warm_worker.py: runs long enough for concurrent runs to
overlap, or until the test opens its gate (a file it creates), so that overlapping runs never
depend on the machine's speed."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow


@flow(name="warm-test-sleep")
def sleep_flow(seconds: float = 2.0, gate: str | None = None) -> float:
    """Sleep `seconds`; with `gate`, wait until that file exists (at most 10 minutes) instead."""
    if gate is None:
        time.sleep(seconds)
        return seconds
    deadline = time.monotonic() + 600
    while not Path(gate).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return seconds
