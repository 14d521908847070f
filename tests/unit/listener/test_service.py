"""The listener's message check: what becomes an event for a route, what is rejected and why."""

from __future__ import annotations

import json

import pytest

from listener.runs import idempotency_key, run_parameters
from listener.service import Rejection, check_message
from listener.settings import ListenerSettings, Route
from tests.fixtures.paths import BUFR_EVENT


def settings(**kw) -> ListenerSettings:
    return ListenerSettings(_env_file=None, **kw)  # type: ignore[call-arg]


def test_check_message_accepts_the_reference_event() -> None:
    route, event = check_message(settings(), "diffusion/files/coriolis/argo/bufr",
                                 BUFR_EVENT.read_bytes())
    assert route.dataset == "argo"
    params = run_parameters(event, route)
    assert params["dataset"] == "argo" and params["event"]["id"] == event.id
    key = idempotency_key(event, route.deployment)
    assert key.endswith(event.identity_key()) and route.deployment in key


@pytest.mark.parametrize(("topic", "payload", "reason", "needle"), [
    ("diffusion/files/a", b"\xff\xfe\x00", "not_utf8", "not UTF-8"),
    ("diffusion/files/a", b"{not json", "not_json", "not JSON"),
    ("diffusion/files/a", b'{"specversion": "1.0"}', "invalid_event", "$.id"),
    ("diffusion/files/a", b"x" * 2000, "too_large", "2000 bytes"),
    ("other/topic", b"{}", "unmapped_topic", "other/topic"),
])
def test_check_message_rejections(topic: str, payload: bytes, reason: str, needle: str) -> None:
    s = settings(max_payload_bytes=1000, routes=[Route(topic_filter="diffusion/files/#")])
    rejection = check_message(s, topic, payload)
    assert isinstance(rejection, Rejection)
    assert rejection.reason == reason
    assert needle in rejection.message + " ".join(str(e) for e in rejection.errors)


def test_invalid_event_names_the_field() -> None:
    event = json.loads(BUFR_EVENT.read_text())
    event["data"]["assets"] = {k: {**v, "file:checksum": "12zz"} for k, v in
                               event["data"]["assets"].items()}
    rejection = check_message(settings(), "diffusion/files/x", json.dumps(event).encode())
    assert isinstance(rejection, Rejection) and rejection.reason == "invalid_event"
    assert any("file:checksum" in e.path for e in rejection.errors), rejection.errors
