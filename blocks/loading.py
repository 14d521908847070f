"""Block documents kept for a while in a long-lived process: the `wis2-warm` worker runs every
flow run in its own process, and each run would otherwise read the broker and dataset blocks
from the Prefect API again (`WIS2_BLOCK_CACHE_SECONDS`, 0: read each time). A block edited in
the UI is seen by the runs that start after that delay; a missing block is never kept."""

from __future__ import annotations

from typing import TypeVar

from prefect.blocks.core import Block

from chain.expiring import MISSING, Expiring

B = TypeVar("B", bound=Block)

_kept: Expiring[tuple[type[Block], str], Block] = Expiring()


def load_block(block_type: type[B], name: str, seconds: float = 0.0) -> B:
    """`block_type.load(name)`, or its copy read less than `seconds` ago in this process."""
    if seconds <= 0:
        return block_type.load(name)
    key = (block_type, name)
    block = _kept.get(key, seconds)
    if block is MISSING:
        block = _kept.put(key, block_type.load(name))
    return block.model_copy(deep=True)  # type: ignore[return-value]


def forget_blocks() -> None:
    """Drop every kept block (the next loads read the API)."""
    _kept.clear()
