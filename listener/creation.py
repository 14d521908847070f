"""Creating the flow runs of accepted messages, then acknowledging them.

A message is acknowledged only after the Prefect API accepted its run (or returned the existing
one: a duplicate), or after it was dead-lettered because the API refused the run. A group of
events of one route gets ONE run of the route's batch deployment; a missing batch deployment (or
a refused batch) falls back to one run per event.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from listener.backoff import ApiBackoff
from listener.batching import BatchPolicy
from listener.messages import Accepted, Rejection
from listener.observability import Metrics
from listener.rejecting import Rejecter
from listener.runs import ApiRejected, DeploymentMissing, RunCreated, RunCreator
from listener.session import MqttSession
from listener.settings import Route
from wis2.errors import FieldError

log = logging.getLogger("listener")


@dataclass(eq=False)
class RunCreation:
    """Creates the runs of accepted messages (through `api`, with back-off), acknowledges them."""

    creator: RunCreator
    api: ApiBackoff
    session: MqttSession
    rejecter: Rejecter
    batches: BatchPolicy
    metrics: Metrics

    async def create(self, members: list[Accepted]) -> None:
        """Batch runs for `members` (same route: one per `batch_max_size`, several in one call
        when `batch_runs_per_call` allows), or one run each."""
        try:
            if len(members) > 1 and self.batches.allows(members[0].route):
                batches = self.batches.split(members)
                if len(batches) > 1:
                    await self._create_batches(members[0].route, batches)
                else:
                    await self._create_batch(members[0].route, members)
            else:
                for member in members:
                    await self._create_run(member)
        except Exception as exc:
            unacked = [m.item for m in members if m.item in self.session.in_flight]
            await self.rejecter.internal_error(unacked, exc)

    def _counted(self, result: RunCreated, deployment: str, batch_size: int = 0) -> str:
        """Count a run created (or found: a duplicate); what to log about it."""
        if not result.created:
            self.metrics.duplicates.labels(deployment=deployment).inc()
            return ("duplicate batch: its flow run already exists" if batch_size else
                    "duplicate event: its flow run already exists")
        self.metrics.runs_created.labels(deployment=deployment).inc()
        if not batch_size:
            return "flow run created"
        self.metrics.batches_created.labels(deployment=deployment).inc()
        self.metrics.batch_size.observe(batch_size)
        return "batch flow run created"

    async def _create_run(self, accepted: Accepted) -> None:
        item, route, event = accepted.item, accepted.route, accepted.event
        try:
            result = await self.api.call(
                lambda: self.creator.create(event, route), [item],
                {"event_id": event.id, "deployment": route.deployment})
        except ApiRejected as exc:
            await self.rejecter.dead_letter(item, Rejection(
                "api_rejected", f"the Prefect API refused the flow run: {exc}",
                [FieldError(path="$", message=str(exc))]))
            return
        if result is None:
            return
        what = self._counted(result, route.deployment)
        acked = self.session.ack(item)
        log.info(what, extra={"event_id": event.id, "topic": item.topic,
                              "deployment": route.deployment, "flow_run_id": str(result.run_id),
                              "flow_run": result.name, "redelivered": item.dup, "acked": acked})

    async def _create_batches(self, route: Route, batches: list[list[Accepted]]) -> None:
        """Several batch runs in one API call; a batch the call did not create (refused, the
        call failed, the deployment missing) goes the way of a single batch."""
        deployment = route.batch_deployment
        items = [m.item for batch in batches for m in batch]
        results: list[RunCreated | str] | None = None
        try:
            results = await self.api.call(
                lambda: self.creator.create_batches([[m.event for m in b] for b in batches],
                                                    route), items,
                {"event_id": batches[0][0].event.id, "events": len(items),
                 "runs": len(batches), "deployment": deployment}, retry_missing=False)
        except (DeploymentMissing, ApiRejected) as exc:
            log.warning("bulk run creation refused: one call per batch instead",
                        extra={"deployment": deployment, "runs": len(batches),
                               "error": str(exc)})
        else:
            if results is None:  # stopping: left unacknowledged
                return
        for members, result in zip(batches, results or [None] * len(batches), strict=True):
            if not isinstance(result, RunCreated):
                if result is not None:
                    log.warning("bulk run creation refused one batch: created alone", extra={
                        "deployment": deployment, "events": len(members), "error": result})
                await self._create_batch(route, members)
                continue
            self._acked_batch(result, route, members)

    async def _create_batch(self, route: Route, members: list[Accepted]) -> None:
        deployment = route.batch_deployment
        assert deployment is not None
        events = [m.event for m in members]
        items = [m.item for m in members]
        try:
            result = await self.api.call(
                lambda: self.creator.create_batch(events, route), items,
                {"event_id": events[0].id, "events": len(events), "deployment": deployment},
                retry_missing=False)
        except DeploymentMissing as exc:
            self.batches.missing(deployment, exc)
            result = None
            fallback = True
        except ApiRejected as exc:
            log.warning("the Prefect API refused the batch run: one run per event instead",
                        extra={"deployment": deployment, "events": len(events),
                               "error": str(exc)})
            fallback = True
        else:
            fallback = False
            self.batches.found(deployment)
        if fallback:
            for member in members:
                await self._create_run(member)
            return
        if result is None:
            return
        self._acked_batch(result, route, members)

    def _acked_batch(self, result: RunCreated, route: Route, members: list[Accepted]) -> None:
        deployment = route.batch_deployment or route.deployment
        items = [m.item for m in members]
        what = self._counted(result, deployment, batch_size=len(members))
        acked = sum(self.session.ack(item) for item in items)
        log.info(what, extra={"events": len(members), "first_event_id": members[0].event.id,
                              "deployment": deployment, "flow_run_id": str(result.run_id),
                              "flow_run": result.name, "redelivered": sum(i.dup for i in items),
                              "acked": acked})
