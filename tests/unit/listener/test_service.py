"""Listener pieces without processes: settings, routing, message checks, dead-letter store, logs."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from listener.deadletters import DeadLetter, DeadLetterStore
from listener.observability import LogfmtFormatter, Metrics
from listener.runs import (
    RunCreator,
    batch_idempotency_key,
    batch_parameters,
    idempotency_key,
    run_parameters,
)
from listener.service import Rejection, check_message
from listener.settings import ListenerSettings, Route
from tests.fixtures.paths import BUFR_EVENT


def settings(**kw) -> ListenerSettings:
    return ListenerSettings(_env_file=None, **kw)  # type: ignore[call-arg]


def test_defaults_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings()
    assert s.subscriptions == ["diffusion/files/#"]
    assert s.routes == [Route(topic_filter="diffusion/files/#",
                              deployment="publish-notification/default", dataset="argo")]
    assert s.session_expiry == 3 * 24 * 3600 and s.max_payload_bytes == 1024 * 1024
    monkeypatch.setenv("WIS2_LISTENER_ROUTES", json.dumps([
        {"topic_filter": "diffusion/files/meteo/#", "deployment": "publish-notification/synop",
         "dataset": "synop"}, {"topic_filter": "diffusion/files/#"}]))
    monkeypatch.setenv("WIS2_LISTENER_SUBSCRIPTIONS", '["$share/chain/diffusion/files/#"]')
    monkeypatch.setenv("WIS2_LISTENER_BROKER_HOST", "mosquitto")
    monkeypatch.setenv("WIS2_LISTENER_PASSWORD", "s3cret")
    s = settings()
    assert s.host == "mosquitto"
    assert s.route_for("diffusion/files/meteo/synop/bufr").dataset == "synop"
    assert s.route_for("diffusion/files/coriolis/argo/bufr").deployment == (
        "publish-notification/default")
    assert s.route_for("elsewhere/x") is None
    assert "s3cret" not in repr(s) and "s3cret" not in s.connection().describe()


@pytest.mark.parametrize("bad", [
    {"WIS2_LISTENER_ROUTES": '[{"topic_filter": "a/#/b"}]'},
    {"WIS2_LISTENER_ROUTES": '[{"topic_filter": "a/#", "deployment": "no-slash"}]'},
    {"WIS2_LISTENER_SUBSCRIPTIONS": '["$share//a"]'},
    {"WIS2_LISTENER_SUBSCRIPTIONS": "[]"},
    {"WIS2_LISTENER_RETRY_MIN_DELAY": "5", "WIS2_LISTENER_RETRY_MAX_DELAY": "1"},
])
def test_bad_settings_are_refused(monkeypatch: pytest.MonkeyPatch, bad: dict[str, str]) -> None:
    for key, value in bad.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError):
        settings()


def test_shared_subscription_route() -> None:
    route = Route(topic_filter="$share/g/diffusion/files/+/argo/#")
    assert route.matches("diffusion/files/coriolis/argo/bufr")
    assert not route.matches("diffusion/files/coriolis/synop/bufr")


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


def test_deadletter_store_dedupes_and_replays(tmp_path: Path) -> None:
    store = DeadLetterStore(tmp_path / "dl")
    assert store.list() == []
    a = store.add(DeadLetter.new("t/1", b"\xff bin", "not_utf8", "not UTF-8"))
    b = store.add(DeadLetter.new("t/1", b"{x", "not_json", "not JSON"))
    again = store.add(DeadLetter.new("t/1", b"{x", "not_json", "not JSON"))
    assert again.id == b.id and again.count == 2
    assert {x.id for x in store.list()} == {a.id, b.id}
    assert store.get(a.id).payload is None and store.get(a.id).payload_bytes() == b"\xff bin"
    store.set_payload(b.id, b'{"fixed": true}')
    failed = store.mark_replayed(a.id, "t/1")
    store.unmark_replayed(a.id, failed)
    assert store.get(a.id).replays == []
    store.mark_replayed(b.id, "t/1")
    assert [x.id for x in store.list()] == [a.id]
    assert store.get(b.id).status == "replayed" and len(store.list(include_replayed=True)) == 2
    assert not list((tmp_path / "dl").glob(".tmp-*"))
    # a replayed, unchanged copy that comes back reopens its record
    store.mark_replayed(a.id, "t/1")
    assert store.get(a.id).status == "replayed"
    store.add(DeadLetter.new("t/1", b"\xff bin", "not_utf8", "not UTF-8"))
    assert store.get(a.id).status == "open" and store.get(a.id).count == 2
    with pytest.raises(KeyError):
        store.get("../../etc/passwd")


def test_logfmt_and_metrics() -> None:
    record = logging.makeLogRecord({"msg": "flow run created", "levelname": "INFO",
                                    "name": "listener", "event_id": "a b", "run": "x"})
    line = LogfmtFormatter().format(record)
    assert 'msg="flow run created"' in line and 'event_id="a b"' in line and "run=x" in line
    assert json.loads(LogfmtFormatter(as_json=True).format(record))["event_id"] == "a b"
    metrics = Metrics(oldest_unacked=lambda: 4.5)
    text = metrics.render().decode()
    for name in ("wis2_listener_events_received_total", "wis2_listener_rejected_total",
                 "wis2_listener_api_errors_total", "wis2_listener_oldest_unacked_age_seconds 4.5"):
        assert name in text


def test_batching_settings_and_batch_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings()
    assert (s.batch_max_size, s.batch_max_wait, s.max_in_flight) == (50, 0.2, 200)
    assert (s.concurrency, s.api_concurrency) == (4, 1)
    assert s.max_in_flight >= s.batch_max_size * s.concurrency  # batches can fill
    assert s.routes[0].batch_deployment == "publish-batch/default"
    monkeypatch.setenv("WIS2_LISTENER_BATCH_MAX_SIZE", "1")
    monkeypatch.setenv("WIS2_LISTENER_BATCH_MAX_WAIT", "0.5")
    monkeypatch.setenv("WIS2_LISTENER_ROUTES", json.dumps(
        [{"topic_filter": "diffusion/files/#", "batch_deployment": None}]))
    s = settings()
    assert (s.batch_max_size, s.batch_max_wait) == (1, 0.5)
    assert s.routes[0].batch_deployment is None
    with pytest.raises(ValidationError):
        Route(topic_filter="a/#", batch_deployment="no-slash")

    events = []
    for i in range(3):
        data = json.loads(BUFR_EVENT.read_text())
        data["id"] = f"e{i}"
        events.append(check_message(settings(), "diffusion/files/x", json.dumps(data).encode())[1])
    route = Route(topic_filter="diffusion/files/#")
    key = batch_idempotency_key(events, "publish-batch/default")
    assert key == batch_idempotency_key(events[::-1], "publish-batch/default")  # order-free
    assert key != batch_idempotency_key(events[:2], "publish-batch/default")
    assert key != batch_idempotency_key(events, "publish-batch/other")
    assert key != idempotency_key(events[0], "publish-batch/default")
    params = batch_parameters(events, route)
    assert [e["id"] for e in params["events"]] == ["e0", "e1", "e2"]
    assert params["dataset"] == "argo"


class RecordingClient:
    """Stands in for the Prefect client: answers like the API and keeps the requests."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict]] = []

    async def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        self.requests.append((method, path, kwargs))
        request = httpx.Request(method, "http://api" + path)
        if path.startswith("/deployments/name/"):
            return httpx.Response(200, json={"id": str(uuid.uuid4())}, request=request)
        return httpx.Response(201, json={"id": str(uuid.uuid4()), "name": "quiet-fox"},
                              request=request)


def test_run_creation_skips_the_servers_schema_check() -> None:
    """The listener parsed the event already: the server need not check it again (a run
    creation's largest cost); the idempotency key and parameters go with the request."""
    event = check_message(settings(), "diffusion/files/x", BUFR_EVENT.read_bytes())[1]
    route = Route(topic_filter="diffusion/files/#")
    creator = RunCreator()
    creator._client = client = RecordingClient()

    created = asyncio.run(creator.create(event, route))

    assert created.created and created.name == "quiet-fox"
    method, path, kwargs = client.requests[-1]
    assert (method, path) == ("POST", "/deployments/{id}/create_flow_run")
    body = kwargs["json"]
    assert body["enforce_parameter_schema"] is False
    assert body["idempotency_key"] == idempotency_key(event, route.deployment)
    assert body["parameters"] == run_parameters(event, route)
    assert body["state"]["type"] == "SCHEDULED"
