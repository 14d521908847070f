"""Helpers shared by the listener's unit tests."""

from __future__ import annotations

from listener.messages import Inbound
from listener.settings import ListenerSettings


def settings(**kw) -> ListenerSettings:
    return ListenerSettings(_env_file=None, **kw)  # type: ignore[call-arg]


def inbound(n: int = 0, received: float = 0.0) -> Inbound:
    return Inbound(topic=f"diffusion/files/{n}", payload=b"{}", mid=n, qos=1, dup=False,
                   generation=1, received=received)
