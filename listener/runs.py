"""Creating flow runs through the Prefect API, idempotently.

The idempotency key is derived from the event (`CloudEvent.identity_key()`: source, id and the
assets' checksums) and the deployment. Prefect's server inserts a run with a key
`ON CONFLICT DO NOTHING` on (flow_id, idempotency_key) and returns the existing run instead,
answering 200 rather than 201 (prefect/server/api/deployments.py `create_flow_run_from_deployment`):
a redelivered event therefore never gets a second run, and the status code tells duplicates apart.

A batch run (several events, one run of the route's batch deployment) has a key derived from the
sorted identity keys of its events: the same batch delivered again gets no second run. Several
batch runs may be created in one call (`create_batches`, Prefect's bulk creation): each keeps its
own key, enforced the same way (a retried call returns the runs it created). Redelivered events
may form another batch after a crash; that run then finds their notifications already built and
published (the flows cache per event identity and per notification id).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import httpx

from chain.deployments import batch_run_name
from listener.settings import Route
from wis2.cloudevent import CloudEvent

log = logging.getLogger(__name__)


class ApiUnavailable(RuntimeError):
    """The API could not take the request now (unreachable, 5xx, 429, missing deployment): retry."""


class ApiBusy(ApiUnavailable):
    """The API answered 503: it is up and asks to try again (on SQLite: a transaction met
    another's write, `database is locked`; on PostgreSQL also while its database is away)."""


class DeploymentMissing(ApiUnavailable):
    """The route's deployment does not exist (yet): its events wait, others go on."""


class ApiRejected(RuntimeError):
    """The API refused the request itself (4xx): retrying would not help."""


RUN_TAG = "wis2-listener"  # every run the listener creates


@dataclass(frozen=True)
class RunCreated:
    run_id: UUID
    name: str
    created: bool  # False: an existing run was returned (duplicate event)


def idempotency_key(event: CloudEvent, deployment: str) -> str:
    return f"wis2-listener:{deployment}:{event.identity_key()}"


def batch_idempotency_key(events: Sequence[CloudEvent], deployment: str) -> str:
    material = "\n".join(sorted(event.identity_key() for event in events))
    return f"wis2-listener:{deployment}:batch:{hashlib.sha256(material.encode()).hexdigest()}"


def run_parameters(event: CloudEvent, route: Route) -> dict[str, Any]:
    return {"event": event.to_dict(), "dataset": route.dataset}


def batch_parameters(events: Sequence[CloudEvent], route: Route) -> dict[str, Any]:
    return {"events": [event.to_dict() for event in events], "dataset": route.dataset}


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
        detail = body.get("detail", body) if isinstance(body, dict) else body
    except ValueError:
        detail = response.text
    return f"HTTP {response.status_code}: {str(detail)[:500]}"


class RunCreator:
    """Holds one Prefect client (opened with `async with`) and a cache of deployment ids."""

    def __init__(self, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self._client: Any = None
        self._deployments: dict[str, UUID] = {}

    async def __aenter__(self) -> RunCreator:
        from prefect.client.orchestration import get_client

        self._client = get_client(httpx_settings={"timeout": self.timeout})
        await self._client.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.__aexit__(*exc)

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        from prefect.exceptions import PrefectHTTPStatusError

        try:
            return await self._client.request(method, path, **kwargs)
        except PrefectHTTPStatusError as exc:
            code = exc.response.status_code
            if code == 503:
                raise ApiBusy(_detail(exc.response)) from None
            if code >= 500 or code in (408, 429):
                raise ApiUnavailable(_detail(exc.response)) from None
            if code in (401, 403):  # wrong credentials: keep the events, do not dead-letter them
                raise ApiUnavailable(f"{_detail(exc.response)}: the Prefect API refused this "
                                     "listener's credentials (PREFECT_API_AUTH_STRING)") from None
            raise ApiRejected(_detail(exc.response)) from None
        except (TimeoutError, httpx.HTTPError, OSError) as exc:
            raise ApiUnavailable(f"{type(exc).__name__}: {exc}".rstrip(": ")) from None

    async def deployment_id(self, name: str) -> UUID:
        if name not in self._deployments:
            flow, _, deployment = name.partition("/")
            try:
                response = await self._call(
                    "GET", "/deployments/name/{flow}/{deployment}",
                    path_params={"flow": flow, "deployment": deployment},
                )
            except ApiRejected as exc:
                # Not deployed (yet): keep the events queued until someone deploys it.
                raise DeploymentMissing(f"deployment {name!r} not found ({exc})") from None
            self._deployments[name] = UUID(response.json()["id"])
        return self._deployments[name]

    async def waiting_runs(self) -> int:
        """The listener's runs (any replica's, of the deployments this one has created runs
        of) that wait Scheduled and are due: created, not yet taken by a worker (a run
        scheduled for later, e.g. a retry's, is not counted)."""
        from prefect.types._datetime import now

        if not self._deployments:
            return 0
        body = {"flow_runs": {"tags": {"all_": [RUN_TAG]},
                              "deployment_id": {"any_": [str(i) for i in
                                                         self._deployments.values()]},
                              "state": {"type": {"any_": ["SCHEDULED"]}},
                              "expected_start_time": {"before_": now("UTC").isoformat()}}}
        response = await self._call("POST", "/flow_runs/count", json=body)
        return int(response.json())

    async def create(self, event: CloudEvent, route: Route) -> RunCreated:
        """A run of the route's deployment for one event."""
        return await self._create(route.deployment, run_parameters(event, route),
                                  idempotency_key(event, route.deployment), event.file_label())

    async def create_batch(self, events: Sequence[CloudEvent], route: Route) -> RunCreated:
        """One run of the route's batch deployment for several events."""
        assert route.batch_deployment is not None
        return await self._create(route.batch_deployment, batch_parameters(events, route),
                                  batch_idempotency_key(events, route.batch_deployment),
                                  batch_name(events))

    async def create_batches(self, batches: Sequence[Sequence[CloudEvent]],
                             route: Route) -> list[RunCreated | str]:
        """Runs of the route's batch deployment, one per batch of events, in ONE call (Prefect's
        bulk creation, at most 100): per batch, its run (`created` is always True: the bulk
        answer does not tell an existing run apart) or the server's error for it."""
        deployment = route.batch_deployment
        assert deployment is not None
        bodies = [_run_body(batch_parameters(events, route),
                            batch_idempotency_key(events, deployment), batch_name(events))
                  for events in batches]
        response = await self._post(deployment, "/deployments/{id}/create_flow_run/bulk",
                                    bodies)
        results = response.json().get("results", [])
        if len(results) != len(bodies):
            raise ApiUnavailable(f"bulk run creation answered {len(results)} results for "
                                 f"{len(bodies)} runs")
        return [RunCreated(run_id=UUID(r["flow_run_id"]), name="", created=True)
                if r.get("status") == "CREATED" and r.get("flow_run_id")
                else str(r.get("error") or "not created") for r in results]

    async def _create(
        self, deployment: str, parameters: dict[str, Any], key: str, name: str
    ) -> RunCreated:
        response = await self._post(deployment, "/deployments/{id}/create_flow_run",
                                    _run_body(parameters, key, name))
        run = response.json()
        return RunCreated(run_id=UUID(run["id"]), name=run.get("name", ""),
                          created=response.status_code == 201)

    async def _post(self, deployment: str, path: str, body: Any) -> httpx.Response:
        deployment_id = await self.deployment_id(deployment)
        try:
            return await self._call("POST", path, path_params={"id": deployment_id}, json=body)
        except ApiRejected as exc:
            if "404" in str(exc).split(":", 1)[0]:  # deployment deleted since it was cached
                self._deployments.pop(deployment, None)
                raise DeploymentMissing(f"deployment {deployment!r} not found") from None
            raise


def batch_name(events: Sequence[CloudEvent]) -> str:
    return batch_run_name(len(events), events[0].file_label())


def _run_body(parameters: dict[str, Any], key: str, name: str) -> dict[str, Any]:
    """A run's creation: named as its flow names it (`flow_run_name`), so that the worker need
    not rename it; parameters, idempotency key and tag."""
    from prefect.client.schemas.actions import DeploymentFlowRunCreate
    from prefect.states import Scheduled, to_state_create

    return DeploymentFlowRunCreate(
        name=name,
        parameters=parameters,
        state=to_state_create(Scheduled()),
        tags=[RUN_TAG],
        idempotency_key=key,
        # The listener has parsed every event already (bad ones went to the dead letters):
        # the server need not check them against the deployment's parameter schema again,
        # the largest single cost of a run creation (manual runs keep the check).
        enforce_parameter_schema=False,
    ).model_dump(mode="json", exclude_unset=True)
