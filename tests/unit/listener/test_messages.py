"""The listener's message check: what becomes an event for a route, what is rejected and why
(each payload parsed once, the listener's wording kept).
"""

from __future__ import annotations

import json

import pytest

from listener.messages import Rejection, check_message
from listener.runs import (
    idempotency_key,
    run_parameters,
)
from listener.settings import Route
from tests.fixtures.paths import BUFR_EVENT
from tests.unit.listener.helpers import settings


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


def test_unreadable_payloads_keep_the_listeners_wording() -> None:
    """The payload is parsed once (by parse_event); the reasons and messages stay the listener's."""
    s = settings()

    def rejected(payload: bytes) -> Rejection:
        rejection = check_message(s, "diffusion/files/a", payload)
        assert isinstance(rejection, Rejection)
        if rejection.reason in ("not_utf8", "not_json"):
            assert [(e.path, e.message) for e in rejection.errors] == [("$", rejection.message)]
        return rejection

    assert rejected(b"ok \xc3").reason == "not_utf8"
    assert rejected(b"ok \xc3").message == (
        "payload is not UTF-8 text (invalid byte at offset 3)")
    assert rejected(b"{not json").reason == "not_json"
    assert rejected(b"{not json").message == ("payload is not JSON: Expecting property name "
                                              "enclosed in double quotes at line 1 column 2")
    assert rejected(b"").message == "payload is not JSON: Expecting value at line 1 column 1"
    deep = b"[" * 100000 + b"]" * 100000
    with pytest.raises(RecursionError) as recursion:
        json.loads(deep)
    assert rejected(deep).reason == "not_json"
    assert rejected(deep).message == f"payload is not JSON that can be read: {recursion.value}"
    digits = b'{"n": ' + b"1" * 5000 + b"}"
    with pytest.raises(ValueError) as too_long:
        json.loads(digits)
    assert rejected(digits).message == f"payload is not JSON that can be read: {too_long.value}"
    # JSON that is not an object is an invalid event; a JSON string is not parsed a second time
    assert rejected(b"[1, 2]").message == (
        "invalid event: $: a CloudEvent is a JSON object, not list")
    double_encoded = json.dumps(BUFR_EVENT.read_text()).encode()
    assert rejected(double_encoded).reason == "invalid_event"
    assert rejected(double_encoded).message == (
        "invalid event: $: a CloudEvent is a JSON object, not str")
