"""The MQTT session's bookkeeping of unacknowledged messages (no broker)."""

from __future__ import annotations

from listener.session import InFlight
from tests.unit.listener.helpers import inbound


def test_in_flight_counts_and_ages() -> None:
    now = [100.0]
    in_flight = InFlight(clock=lambda: now[0])
    assert (in_flight.count(), in_flight.oldest_age()) == (0, 0.0)
    a, b = inbound(1, received=90.0), inbound(2, received=95.0)
    in_flight.add(a)
    in_flight.add(b)
    assert (in_flight.count(), in_flight.oldest_age()) == (2, 10.0)
    assert a in in_flight and inbound(3) not in in_flight
    in_flight.remove(a)
    in_flight.remove(a)  # twice: no error
    assert (in_flight.count(), in_flight.oldest_age()) == (1, 5.0)
