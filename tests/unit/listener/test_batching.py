"""Adaptive batching: the batch policy (missing batch deployments), a burst collected by route."""

from __future__ import annotations

import asyncio
import logging

import pytest

from listener.batching import BatchPolicy, by_route, collect
from listener.messages import Accepted, Inbound, check_message
from listener.runs import (
    DeploymentMissing,
)
from listener.settings import Route
from listener.stopping import StopSignal
from tests.fixtures.paths import BUFR_EVENT
from tests.unit.listener.helpers import inbound, settings


def test_batch_policy_remembers_missing_batch_deployments(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    policy = BatchPolicy(max_size=50, recheck=60, clock=lambda: now[0])
    route = Route(topic_filter="diffusion/files/#")
    assert policy.allows(route)
    assert not policy.allows(Route(topic_filter="a/#", batch_deployment=None))
    assert not BatchPolicy(max_size=1).allows(route)
    with caplog.at_level(logging.WARNING, logger="listener"):
        policy.missing("publish-batch/default", DeploymentMissing("not found"))
        now[0] = 30.0
        policy.missing("publish-batch/default", DeploymentMissing("not found"))
    assert sum("batch deployment missing" in r.getMessage() for r in caplog.records) == 1
    now[0] = 90.0
    assert not policy.allows(route)  # 60 s since it was last found missing, not more
    now[0] = 90.5
    assert policy.allows(route)  # looked up again
    policy.missing("publish-batch/default", DeploymentMissing("not found"))
    policy.found("publish-batch/default")
    assert policy.allows(route)


def test_collect_takes_a_burst_grouped_by_route() -> None:
    event = check_message(settings(), "diffusion/files/x", BUFR_EVENT.read_bytes())[1]
    meteo, other = Route(topic_filter="diffusion/files/meteo/#"), Route(topic_filter="#")

    async def accept(item: Inbound) -> Accepted | None:
        if item.mid == 3:
            return None  # dead-lettered
        return Accepted(item, meteo if item.mid % 2 else other, event)

    async def scenario() -> None:
        queue: asyncio.Queue[Inbound | None] = asyncio.Queue()
        for n in range(1, 7):
            queue.put_nowait(inbound(n))
        first = Accepted(inbound(0), other, event)
        taken = await collect(first, queue, accept, max_size=4, max_wait=0, stop=StopSignal())
        assert [a.item.mid for a in taken] == [0, 1, 2, 4]  # 3 was rejected; 5 and 6 wait
        assert queue.qsize() == 2
        groups = by_route(taken)
        assert [[a.item.mid for a in group] for group in groups] == [[0, 2, 4], [1]]
        # a stop signal (None) in the queue is handed back to the workers
        queue.put_nowait(None)
        taken = await collect(first, queue, accept, max_size=10, max_wait=0, stop=StopSignal())
        assert [a.item.mid for a in taken] == [0, 5, 6]
        assert queue.get_nowait() is None
        stopped = StopSignal()
        stopped.set()
        queue.put_nowait(inbound(7))
        assert await collect(first, queue, accept, max_size=10, max_wait=0, stop=stopped) == [
            first]

    asyncio.run(scenario())


def test_a_burst_is_collected_for_several_runs_per_call_and_split_into_batches() -> None:
    policy = BatchPolicy(max_size=3, runs_per_call=4)
    assert policy.collect_size == 12
    assert [len(b) for b in policy.split(list(range(7)))] == [3, 3, 1]  # type: ignore[arg-type]
    assert BatchPolicy(max_size=50).collect_size == 50
