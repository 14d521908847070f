"""CPU seconds and peak RSS of long-running processes and all their descendants (psutil), or of
one process alone (the benchmark's own process, whose children are the node's processes).

CPU of a tree = for every live process of the tree: user + system + the reaped children's
user + system (Linux adds a waited-for child's whole CPU, its own reaped descendants included, to
its parent). So a flow-run subprocess of the process worker counts for the worker, before and
after it exits. RSS is sampled (every `interval` seconds): short-lived peaks between two samples
can be missed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil
from pydantic import BaseModel

log = logging.getLogger(__name__)


class ProcessUsage(BaseModel):
    name: str
    pid: int | None
    cpu_seconds: float
    peak_rss_mb: float
    peak_processes: int
    peak_single_rss_mb: float = 0.0  # the largest one process of the tree reached


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def tree_sample(pid: int, tree: bool = True) -> tuple[float, int, int, int]:
    """(cpu seconds, rss bytes, number of processes, rss bytes of its largest process) of the
    process tree of `pid` right now (tree=False: the process alone, without its children's CPU).
    RSS counts shared pages in each process (e.g. PostgreSQL's shared buffers)."""
    cpu, rss, count, largest = 0.0, 0, 0, 0
    try:
        procs = _tree(pid) if tree else [psutil.Process(pid)]
    except psutil.Error:
        procs = []
    for proc in procs:
        try:
            with proc.oneshot():
                t = proc.cpu_times()
                one = proc.memory_info().rss
            rss += one
            largest = max(largest, one)
            cpu += t.user + t.system
            if tree:
                cpu += t.children_user + t.children_system
            count += 1
        except psutil.Error:
            continue
    return cpu, rss, count, largest


class _Tracked:
    def __init__(self, name: str, pid: int, tree: bool = True) -> None:
        self.name = name
        self.pid = pid
        self.tree = tree
        self.cpu_start: float | None = None
        self.cpu_last = 0.0
        self.peak_rss = 0
        self.peak_count = 0
        self.peak_single = 0

    def sample(self) -> None:
        cpu, rss, count, largest = tree_sample(self.pid, self.tree)
        if count == 0:
            return
        if self.cpu_start is None:
            self.cpu_start = cpu
        self.cpu_last = max(self.cpu_last, cpu)
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_count = max(self.peak_count, count)
        self.peak_single = max(self.peak_single, largest)

    def usage(self) -> ProcessUsage:
        return ProcessUsage(
            name=self.name, pid=self.pid,
            cpu_seconds=round(self.cpu_last - (self.cpu_start or 0.0), 2),
            peak_rss_mb=round(self.peak_rss / 2**20, 1), peak_processes=self.peak_count,
            peak_single_rss_mb=round(self.peak_single / 2**20, 1),
        )


class ProcessMonitor:
    """Samples named process trees in a background thread between `start()` and `stop()`.

    `low_memory` is called once if the machine's available memory falls below
    `min_available_mb` (the benchmark uses it to abort a phase before the machine swaps or
    kills processes).
    """

    def __init__(
        self, pids: dict[str, int], interval: float = 0.5, min_available_mb: float = 1500,
        low_memory: Callable[[float], None] | None = None, alone: frozenset[int] = frozenset(),
    ) -> None:
        self.tracked = [_Tracked(name, pid, tree=pid not in alone) for name, pid in pids.items()]
        self.interval = interval
        self.min_available_mb = min_available_mb
        self.low_memory = low_memory
        self.low_memory_seen: float | None = None
        self.min_available_seen_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample_all(self) -> None:
        for tracked in self.tracked:
            tracked.sample()
        available = psutil.virtual_memory().available / 2**20
        if self.min_available_seen_mb is None or available < self.min_available_seen_mb:
            self.min_available_seen_mb = available
        if available < self.min_available_mb and self.low_memory_seen is None:
            self.low_memory_seen = available
            log.error("only %.0f MB of memory available: aborting the phase", available)
            if self.low_memory is not None:
                self.low_memory(available)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._sample_all()
            except Exception:  # sampling must never stop the benchmark
                log.exception("process sampling failed")

    def start(self) -> ProcessMonitor:
        self._sample_all()
        self._thread = threading.Thread(target=self._loop, name="procmon", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[ProcessUsage]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self._sample_all()
        return [t.usage() for t in self.tracked]

    def __enter__(self) -> ProcessMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if not self._stop.is_set():
            self.stop()


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def burst_cpu(usages: list[dict[str, Any]], events: int,
              cores: int | None = None) -> dict[str, Any] | None:
    """The CPU seconds every monitored process spent (`usages`, ProcessUsage dumps), per 1,000
    of `events`, and the least time the machine's cores allow for that work: a phase that used
    that CPU cannot have taken less, whatever its processes waited for."""
    cores = cores or os.cpu_count() or 1
    if not usages or not events:
        return None
    cpu = round(sum(u["cpu_seconds"] for u in usages), 1)
    return {"cpu_seconds": cpu, "per_1000_events": round(cpu * 1000 / events, 1),
            "cores": cores, "least_drain_seconds": round(cpu / cores, 1)}
