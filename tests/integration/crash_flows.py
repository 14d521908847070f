"""A flow for tests/test_worker_crash.py: every run of it kills the process that executes it."""

from __future__ import annotations

import os
import signal
from typing import Any

from prefect import flow


@flow(name="crash-test-kill-worker")
def kill_worker_flow(event: dict[str, Any]) -> None:
    """SIGKILL this process (the wis2-warm worker runs flows in its own process)."""
    os.kill(os.getpid(), signal.SIGKILL)
