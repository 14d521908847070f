"""Create Prefect flow runs from deployments, idempotently.

The Prefect server enforces idempotency keys per flow (`flow_runs` unique on flow id +
idempotency key, `INSERT ... ON CONFLICT DO NOTHING`, see prefect/server/models/flow_runs.py):
a second `POST /deployments/{id}/create_flow_run` with the same key returns the existing run
with status 200 instead of 201. The listener uses that to count duplicates (redeliveries).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from uuid import UUID

import httpx
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import DeploymentFlowRunCreate
from prefect.exceptions import ObjectNotFound
from prefect.states import Scheduled, to_state_create
from pydantic import BaseModel

log = logging.getLogger(__name__)

RETRIABLE_STATUS = {401, 403, 408, 425, 429}


class ApiUnavailable(RuntimeError):
    """The API could not take the request now (unreachable, 5xx, timeout...): retry later."""


class DeploymentMissing(ApiUnavailable):
    """The deployment does not exist (yet): retry later, it may be deployed meanwhile."""


class ApiRejected(RuntimeError):
    """The API refused this particular flow run (e.g. parameters against the schema)."""

    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        self.detail = detail
        super().__init__(f"Prefect API refused the flow run ({status}): {detail}")


class RunCreated(BaseModel):
    flow_run_id: UUID
    flow_run_name: str
    created: bool  # False: a run with this idempotency key already existed


def idempotency_key(deployment: str, dataset: str | None, identity: str) -> str:
    """One flow run per (deployment, dataset, event identity)."""
    return f"wis2-listener:{deployment}:{dataset or '-'}:{identity}"


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:1000]
    return str(body)[:1000]


class RunTrigger:
    """Creates flow runs of named deployments through one Prefect client."""

    def __init__(self, client: PrefectClient, timeout: float = 30.0, tags: list[str] | None = None):
        self.client = client
        self.timeout = timeout
        self.tags = list(tags or [])
        self._deployments: dict[str, UUID] = {}

    async def deployment_id(self, name: str) -> UUID:
        if name not in self._deployments:
            try:
                deployment = await self._call(self.client.read_deployment_by_name(name))
            except DeploymentMissing:
                raise DeploymentMissing(
                    f"deployment {name!r} not found in the Prefect API: deploy it "
                    "(prefect --no-prompt deploy --all)"
                ) from None
            self._deployments[name] = deployment.id
        return self._deployments[name]

    async def _call(self, coro: Any) -> Any:
        """Await one API call, mapping every failure to ApiUnavailable / ApiRejected."""
        try:
            return await asyncio.wait_for(coro, self.timeout)
        except TimeoutError:
            raise ApiUnavailable(f"no answer from the Prefect API in {self.timeout}s") from None
        except ObjectNotFound:
            raise DeploymentMissing("not found") from None
        except httpx.HTTPStatusError as exc:
            _check(exc.response)
            raise  # not reached: _check raises for every error status
        except httpx.TransportError as exc:
            raise ApiUnavailable(
                f"Prefect API unreachable: {type(exc).__name__}: {exc or 'no detail'}") from None

    async def create(
        self,
        deployment: str,
        parameters: dict[str, Any],
        key: str,
        name: str | None = None,
    ) -> RunCreated:
        """Create (or find, same `key`) the flow run; `ApiUnavailable` / `ApiRejected` else."""
        deployment_id = await self.deployment_id(deployment)
        body = DeploymentFlowRunCreate(
            parameters=parameters, state=to_state_create(Scheduled()), name=name,
            tags=self.tags, idempotency_key=key,
        ).model_dump(mode="json", exclude_unset=True)
        try:
            response = await self._call(self.client.request(
                "POST", "/deployments/{id}/create_flow_run",
                path_params={"id": deployment_id}, json=body,
            ))
            _check(response)
        except DeploymentMissing:  # deleted, or deployed again under a new id
            self._deployments.pop(deployment, None)
            raise DeploymentMissing(
                f"deployment {deployment!r} ({deployment_id}) not found in the Prefect API"
            ) from None
        run = response.json()
        return RunCreated(
            flow_run_id=run["id"], flow_run_name=run.get("name") or "",
            created=response.status_code == 201,
        )


def _check(response: httpx.Response) -> None:
    status = response.status_code
    if status < 400:
        return
    if status == 404:
        raise DeploymentMissing("not found")
    if status >= 500 or status in RETRIABLE_STATUS:
        raise ApiUnavailable(f"Prefect API answered {status}: {_detail(response)}")
    raise ApiRejected(status, _detail(response))
