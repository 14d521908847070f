"""Block documents kept for a while in a long-lived process: the `wis2-warm` worker runs every
flow run in its own process, and each run would otherwise read the broker and dataset blocks
from the Prefect API again (`WIS2_BLOCK_CACHE_SECONDS`, 0: read each time). A block edited in
the UI is seen by the runs that start after that delay; a missing block is never kept."""

from __future__ import annotations

import threading
import time
from typing import TypeVar

from prefect.blocks.core import Block

B = TypeVar("B", bound=Block)

_lock = threading.Lock()
_kept: dict[tuple[type[Block], str], tuple[float, Block]] = {}


def load_block(block_type: type[B], name: str, seconds: float = 0.0) -> B:
    """`block_type.load(name)`, or its copy read less than `seconds` ago in this process."""
    if seconds <= 0:
        return block_type.load(name)
    key = (block_type, name)
    with _lock:
        kept = _kept.get(key)
    if kept is not None and time.monotonic() - kept[0] < seconds:
        return kept[1].model_copy(deep=True)  # type: ignore[return-value]
    block = block_type.load(name)
    with _lock:
        _kept[key] = (time.monotonic(), block)
    return block.model_copy(deep=True)


def forget_blocks() -> None:
    """Drop every kept block (the next loads read the API)."""
    with _lock:
        _kept.clear()
