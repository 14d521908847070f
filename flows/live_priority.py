"""Live events before a backfill: before each of its batches, a backfill waits while runs of the
live deployments (`publish-notification`, `publish-batch`, created by the listener) are due,
pending or running, at most `WIS2_BACKFILL_YIELD_SECONDS` per batch.

A backfill's batch runs are sub-flows of its own run: they never wait in the work pool, so the
pool's queue priorities cannot put live runs first. On a node of two cores the backfill's batches
and the live runs share the Prefect server and the worker's CPU; a live event arriving beside a
batch waited for it, and for the next ones (`bench/RESULTS.md`). Now a live run waits at most for
the batch already in progress. The limit keeps a backfill going under a sustained live load (it
then sends a batch at least every `WIS2_BACKFILL_YIELD_SECONDS`).

One API request (a count) per look, every `LOOK_SECONDS` while live runs are found; a look that
fails (the API unavailable, a backfill run without a server) lets the batch go.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from uuid import UUID

from chain.deployments import PUBLISH_BATCH_FLOW, PUBLISH_NOTIFICATION_FLOW

log = logging.getLogger(__name__)

LOOK_SECONDS = 0.2
# Only runs due in the last minute are live events waiting: an older run not yet final is a
# backlog or a stranded run (the recovery's), which must not slow a backfill down for ever.
LIVE_WINDOW_SECONDS = 60.0
LIVE_FLOWS = [PUBLISH_NOTIFICATION_FLOW, PUBLISH_BATCH_FLOW]


def count_live_runs(deployment_ids: list[UUID] | None = None) -> int:
    """Runs of the live deployments (or of `deployment_ids` only) due in the last
    `LIVE_WINDOW_SECONDS` and still Scheduled, Pending or Running; the backfill's own batch runs
    (sub-flows, no deployment) are not counted."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterExpectedStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    now = datetime.now(UTC)
    runs = FlowRunFilter(
        deployment_id=FlowRunFilterDeploymentId(is_null_=False, any_=deployment_ids),
        state=FlowRunFilterState(type=FlowRunFilterStateType(
            any_=[StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING])),
        expected_start_time=FlowRunFilterExpectedStartTime(
            after_=now - timedelta(seconds=LIVE_WINDOW_SECONDS), before_=now))
    with get_client(sync_client=True) as client:
        return client.count_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=LIVE_FLOWS)),
                                      flow_run_filter=runs)


def give_way(limit: float, count: Callable[[], int] = count_live_runs,
             clock: Callable[[], float] = time.monotonic,
             sleep: Callable[[float], None] = time.sleep) -> float:
    """Wait while live runs are found, at most `limit` seconds (0: never); the seconds waited."""
    if limit <= 0:
        return 0.0
    start = clock()
    while True:
        try:
            live = count()
        except Exception as exc:  # never stops a backfill: the batch goes
            log.debug("cannot count the live runs: %s", exc)
            return clock() - start
        waited = clock() - start
        if live == 0 or waited >= limit:
            return waited
        sleep(min(LOOK_SECONDS, limit - waited))
