"""Where the worker's memory goes: an opt-in report for a long-lived `wis2-warm` worker.

Every flow run executes in the worker's process, so anything a run leaves behind (a cache with
no bound, a structure kept per run) accumulates there. `WIS2_WORKER_MEMORY_REPORT_SECONDS` (0:
off) starts Python's `tracemalloc` and, that often, logs the allocation sites whose memory grew
most since the first report (the baseline, taken once the worker has run for that long), each
with its call chain. tracemalloc costs CPU and memory of its own (roughly a third more of both
here): turn it on to find a leak, not for good.
"""

from __future__ import annotations

import asyncio
import logging
import tracemalloc

log = logging.getLogger(__name__)

FRAMES = 8  # frames kept per allocation: enough to see which caller of a library allocates
IGNORED = (tracemalloc.__file__, "<frozen importlib._bootstrap>",
           "<frozen importlib._bootstrap_external>")


class MemoryReport:
    """tracemalloc's growth since a baseline, `top` allocation sites at a time."""

    def __init__(self, top: int = 10, logger: logging.Logger | logging.LoggerAdapter | None = None,
                 ) -> None:
        self.top = top
        self.log = logger or log  # the worker's: its log file shows Prefect's loggers
        self._baseline: tracemalloc.Snapshot | None = None

    def start(self) -> None:
        if not tracemalloc.is_tracing():
            tracemalloc.start(FRAMES)

    def _snapshot(self) -> tracemalloc.Snapshot:
        return tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, name) for name in IGNORED])

    def report(self) -> list[str] | None:
        """The sites that grew most since the baseline; None at the first call (it takes it)."""
        snapshot = self._snapshot()
        if self._baseline is None:
            self._baseline = snapshot
            return None
        lines = []
        for stat in snapshot.compare_to(self._baseline, "traceback")[:self.top]:
            if stat.size_diff <= 0:
                break
            chain = " <- ".join(f"{frame.filename.rsplit('site-packages/', 1)[-1]}:"
                                f"{frame.lineno}" for frame in reversed(stat.traceback))
            lines.append(f"{stat.size_diff / 1024:+.1f} KiB in {stat.count_diff:+d} blocks "
                         f"(now {stat.size / 1024:.1f} KiB): {chain}")
        return lines

    async def run(self, seconds: float) -> None:
        """Report every `seconds`, until cancelled."""
        self.start()
        self.log.info("memory report every %.0f s (tracemalloc on, %d frames)", seconds, FRAMES)
        while True:
            await asyncio.sleep(seconds)
            traced, peak = tracemalloc.get_traced_memory()
            lines = await asyncio.to_thread(self.report)
            growth = (" (baseline taken)" if lines is None else
                      "".join(f"\n  {line}" for line in lines) or " nothing grew")
            self.log.info("memory: %.1f MiB traced (peak %.1f MiB); growth since the baseline:%s",
                          traced / 2**20, peak / 2**20, growth)
