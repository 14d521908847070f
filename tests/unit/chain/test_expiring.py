"""The one time-bounded cache of the chain (`chain.expiring.Expiring`)."""

from __future__ import annotations

from chain.expiring import MISSING, Expiring


def test_a_value_is_served_while_younger_than_the_age_asked() -> None:
    now = [100.0]
    kept: Expiring[str, int | None] = Expiring(clock=lambda: now[0])
    assert kept.get("a", 30) is MISSING
    assert kept.put("a", 1) == 1
    now[0] += 29.9
    assert kept.get("a", 30) == 1
    assert kept.get("a", 10) is MISSING  # another caller may accept less
    now[0] += 0.1
    assert kept.get("a", 30, default="old") == "old"


def test_none_is_a_value_and_clear_forgets_everything() -> None:
    kept: Expiring[str, int | None] = Expiring()
    kept.put("none", None)
    assert kept.get("none", 30) is None
    kept.clear()
    assert kept.get("none", 30) is MISSING
