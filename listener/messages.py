"""What comes in: a message received from the broker, and the check that gives its route and
event, or the reason (a dead-letter reason code) and readable message it is rejected with.

The payload is parsed once, by `wis2.cloudevent.parse_event`; the listener only words the
problems of a payload that is not UTF-8 JSON text its own way (`payload is ...`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime

from listener.deadletters import Reason, utcnow
from listener.settings import ListenerSettings, Route
from wis2.cloudevent import CloudEvent, UnreadableEvent, parse_event
from wis2.errors import FieldError, InvalidInput


@dataclass(eq=False)
class Inbound:
    """One MQTT message as received, with the connection (`generation`) it came on."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    dup: bool
    generation: int
    received: float = field(default_factory=time.monotonic)
    received_at: datetime = field(default_factory=utcnow)


@dataclass
class Accepted:
    """A valid message: the route it takes and its event."""

    item: Inbound
    route: Route
    event: CloudEvent


@dataclass
class Rejection:
    reason: Reason
    message: str
    errors: list[FieldError] = field(default_factory=list)


def unreadable_payload(exc: UnreadableEvent) -> Rejection:
    """Why a payload that is not UTF-8 JSON text is rejected (`not_utf8` or `not_json`)."""
    cause = exc.cause
    reason: Reason
    if isinstance(cause, UnicodeDecodeError):
        reason = "not_utf8"
        message = f"payload is not UTF-8 text (invalid byte at offset {cause.start})"
    elif isinstance(cause, json.JSONDecodeError):
        reason = "not_json"
        message = (f"payload is not JSON: {cause.msg} at line {cause.lineno} "
                   f"column {cause.colno}")
    else:  # RecursionError, or ValueError (e.g. an integer with too many digits)
        reason = "not_json"
        message = f"payload is not JSON that can be read: {cause}"
    return Rejection(reason, message, [FieldError(path="$", message=message)])


def check_message(
    settings: ListenerSettings, topic: str, payload: bytes
) -> tuple[Route, CloudEvent] | Rejection:
    """The route and event of a message, or why it is rejected."""
    if len(payload) > settings.max_payload_bytes:
        return Rejection("too_large", f"payload of {len(payload)} bytes is over the limit of "
                         f"{settings.max_payload_bytes} bytes (WIS2_LISTENER_MAX_PAYLOAD_BYTES)")
    route = settings.route_for(topic)
    if route is None:
        filters = ", ".join(r.topic_filter for r in settings.routes) or "none"
        return Rejection("unmapped_topic", f"no route for topic {topic!r} (routes: {filters})")
    try:
        return route, parse_event(payload)
    except UnreadableEvent as exc:
        return unreadable_payload(exc)
    except InvalidInput as exc:
        return Rejection("invalid_event", exc.summary(), exc.errors)
