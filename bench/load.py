"""Background CPU load for the benchmark (`--cpu-hogs N`): N busy processes running through the
measured phases, to see how the chain behaves when other work takes part of the machine."""

from __future__ import annotations

import logging
import subprocess
import sys
from types import TracebackType

log = logging.getLogger(__name__)

BUSY_LOOP = "while True: pass"


class CpuHogs:
    """`with CpuHogs(n):` n processes each spinning one core at normal priority."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> CpuHogs:
        for _ in range(self.count):
            self._procs.append(subprocess.Popen([sys.executable, "-c", BUSY_LOOP]))
        if self.count:
            log.info("%d busy process(es) started as background load", self.count)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for proc in self._procs:
            proc.kill()
        for proc in self._procs:
            proc.wait(timeout=10)
        self._procs.clear()
