"""Blocks kept for `seconds` in a long-lived process (blocks/loading.py), without a server."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from prefect.blocks.core import Block

from blocks import loading
from blocks.loading import forget_blocks, load_block


class Counted(Block):
    _block_type_slug = "counted-test"
    value: str = "x"
    loads: ClassVar[list[str]] = []

    @classmethod
    def load(cls, name: str, *args: Any, **kwargs: Any) -> Counted:  # type: ignore[override]
        cls.loads.append(name)
        if name == "missing":
            raise ValueError("Unable to find block document named missing")
        return cls(value=name)


@pytest.fixture(autouse=True)
def fresh() -> None:
    forget_blocks()
    Counted.loads.clear()


def test_a_block_is_read_once_per_delay_and_each_caller_gets_a_copy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(loading._kept, "clock", lambda: now[0])
    first = load_block(Counted, "a", seconds=30)
    first.value = "changed by a run"
    assert load_block(Counted, "a", seconds=30).value == "a"
    assert Counted.loads == ["a"]
    now[0] += 31
    load_block(Counted, "a", seconds=30)
    assert Counted.loads == ["a", "a"]


def test_without_a_delay_or_when_missing_the_block_is_read_each_time() -> None:
    load_block(Counted, "b")
    load_block(Counted, "b")
    for _ in range(2):
        with pytest.raises(ValueError, match="Unable to find"):
            load_block(Counted, "missing", seconds=30)
    assert Counted.loads == ["b", "b", "missing", "missing"]
