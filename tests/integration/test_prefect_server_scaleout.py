"""The Prefect server's scale-out option (localnode/prefect_server.py): the API
(`prefect server start --no-services`) and the background services (`prefect server services
start`) in two processes, on a PostgreSQL database and Redis messaging (prefect-redis), behind
the node's auth string. The services process does its work from what the API process sends it
through Redis: the event persister writes the API's events to the database, including the events
the API sent while the services process was down (they wait in Redis)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from localnode.postgres import PostgresCluster
from localnode.prefect_server import PrefectServer
from localnode.redis import RedisServer

AUTH = ("admin", "s3cret-scaleout")


@pytest.fixture
def split_server(tmp_path: Path, postgres_cluster: PostgresCluster,
                 redis_server: RedisServer) -> Iterator[PrefectServer]:
    server = PrefectServer(
        tmp_path / "prefect", database_url=postgres_cluster.create_database("split"),
        auth_string=SecretStr(":".join(AUTH)), redis_url=redis_server.url(0),
        separate_services=True)
    server.start(timeout=180)
    try:
        yield server
    finally:
        server.stop()


def test_separate_services_need_redis(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="redis_url"):
        PrefectServer(tmp_path, separate_services=True)


def test_api_and_services_in_two_processes_share_events_through_redis(
    split_server: PrefectServer,
) -> None:
    assert split_server.services is not None and split_server.services.running
    assert "--no-services" in split_server.argv
    api = split_server.api_url
    assert httpx.post(f"{api}/flows/filter", json={}).status_code == 401
    split_server.services.stop()  # the API goes on alone; its events wait in Redis
    with httpx.Client(base_url=api, auth=AUTH, timeout=30) as client:
        flow = client.post("/flows/", json={"name": "scaleout-check"}).json()
        deployment = client.post("/deployments/", json={
            "name": "check", "flow_id": flow["id"]}).json()
        run = client.post(f"/deployments/{deployment['id']}/create_flow_run", json={}).json()
        resource = f"prefect.flow-run.{run['id']}"
        split_server.services.start(60)

        def persisted() -> list[str]:
            answer = client.post("/events/filter", json={
                "filter": {"any_resource": {"id": [resource]}}, "limit": 50})
            answer.raise_for_status()
            return [event["event"] for event in answer.json()["events"]]

        deadline = time.monotonic() + 120
        while "prefect.flow-run.Scheduled" not in (names := persisted()):
            assert time.monotonic() < deadline, (
                f"the run's Scheduled event was not persisted: {names}\n{split_server.tail()}")
            time.sleep(1)

    split_server.kill()  # both processes, as a crash of the host
    assert not split_server.running and not split_server.services.running
