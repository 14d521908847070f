"""Values kept for a while in a long-lived process: the one mechanism behind the chain's
time-bounded caches (the block documents of `blocks.loading`, the warm worker's deployment reads
and the server's default result storage in `worker.engine`). A value is served while it is younger
than the age the caller accepts, then read again; nothing is evicted otherwise (the keys are few:
blocks, deployments)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
MISSING: Any = object()  # what `get` answers by default for a value absent or too old


class Expiring(Generic[K, V]):
    """{key: (when kept, value)}, thread-safe; `clock` (monotonic seconds) for the tests."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._kept: dict[K, tuple[float, V]] = {}

    def get(self, key: K, max_age: float, default: Any = MISSING) -> V | Any:
        """The value kept for `key` less than `max_age` seconds ago, else `default`."""
        with self._lock:
            kept = self._kept.get(key)
        if kept is None or self.clock() - kept[0] >= max_age:
            return default
        return kept[1]

    def put(self, key: K, value: V) -> V:
        with self._lock:
            self._kept[key] = (self.clock(), value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()
