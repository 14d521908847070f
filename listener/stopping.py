"""The stop request (SIGTERM/SIGINT), shared by the listener's parts: read from any thread
(`requested`, e.g. paho's network thread), awaited on the asyncio loop (`wait`, `sleep`)."""

from __future__ import annotations

import asyncio
import contextlib


class StopSignal:
    """Set once; never cleared."""

    def __init__(self) -> None:
        self.requested = False
        self._event = asyncio.Event()

    def set(self) -> None:
        self.requested = True
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()

    async def sleep(self, seconds: float) -> None:
        """Sleep `seconds`, or less when the stop is requested meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), seconds)
