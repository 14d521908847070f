"""chain.processes.ManagedProcess: a process that never gets ready is stopped, not leaked."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from chain.processes import ManagedProcess, ProcessFailed


def test_a_process_never_ready_is_stopped(tmp_path: Path) -> None:
    process = ManagedProcess("sleeper", [sys.executable, "-c", "import time; time.sleep(600)"],
                             tmp_path / "sleeper.log", ready=lambda: False)
    with pytest.raises(ProcessFailed, match="not ready after"):
        process.start(timeout=0.5)
    assert not process.running
