"""A flow for tests/integration/test_warm_worker.py: runs long enough for concurrent runs to
overlap."""

from __future__ import annotations

import time

from prefect import flow


@flow(name="warm-test-sleep")
def sleep_flow(seconds: float = 2.0) -> float:
    time.sleep(seconds)
    return seconds
