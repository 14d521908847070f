"""Flow-run creation: parameters, idempotency keys of single and batch runs, the request sent
to the Prefect API (a recording stand-in for the client, no server)."""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx

from flows.pipeline import file_label
from flows.publish_batch import batch_label
from listener.messages import check_message
from listener.runs import (
    RunCreator,
    batch_idempotency_key,
    batch_parameters,
    idempotency_key,
    run_parameters,
)
from listener.settings import Route
from tests.fixtures.paths import BUFR_EVENT
from tests.unit.listener.helpers import settings


def three_events() -> list:
    """Three accepted events (ids e0, e1, e2) of the same file."""
    events = []
    for i in range(3):
        data = json.loads(BUFR_EVENT.read_text())
        data["id"] = f"e{i}"
        events.append(check_message(settings(), "diffusion/files/x", json.dumps(data).encode())[1])
    return events


def test_batch_keys_and_parameters() -> None:
    events = three_events()
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
        if path.endswith("/bulk"):
            return httpx.Response(200, json={"results": [
                {"status": "CREATED", "flow_run_id": str(uuid.uuid4())} for _ in kwargs["json"]]},
                request=request)
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
    # named as its flow names it (flows/publish_notification.py run_name): not renamed later
    assert body["name"] == file_label(body["parameters"]["event"]) == event.file_label()


def test_a_batch_run_is_created_with_the_name_its_flow_gives_it() -> None:
    events = three_events()
    route = Route(topic_filter="diffusion/files/#", batch_deployment="publish-batch/default")
    creator = RunCreator()
    creator._client = client = RecordingClient()

    asyncio.run(creator.create_batch(events, route))
    asyncio.run(creator.create_batches([events[:2], events[2:]], route))

    single, bulk = client.requests[1][2]["json"], client.requests[-1][2]["json"]
    assert single["name"] == batch_label(single["parameters"]["events"])
    assert single["name"].startswith("batch-3-events-")
    assert [b["name"] for b in bulk] == [batch_label(b["parameters"]["events"]) for b in bulk]
