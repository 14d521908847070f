"""Backoff delays and the Prefect API backoff: retries while unavailable, gives up on stop."""

from __future__ import annotations

import asyncio
import itertools
import uuid

import pytest

from listener.backoff import ApiBackoff, backoff_delays
from listener.messages import Inbound
from listener.observability import Metrics
from listener.runs import (
    ApiBusy,
    ApiRejected,
    ApiUnavailable,
    DeploymentMissing,
    RunCreated,
)
from listener.stopping import StopSignal
from tests.unit.listener.helpers import inbound, settings


def test_backoff_delays_double_up_to_the_maximum() -> None:
    assert list(itertools.islice(backoff_delays(1.0, 10.0), 6)) == [1, 2, 4, 8, 10, 10]
    assert list(itertools.islice(backoff_delays(5.0, 5.0), 2)) == [5, 5]


def api_backoff(stop: StopSignal, abandoned: list[Inbound]) -> tuple[ApiBackoff, Metrics]:
    metrics = Metrics()
    s = settings(retry_min_delay=0.001, retry_max_delay=0.002)
    return ApiBackoff(s, metrics, stop, abandoned.append), metrics


def created() -> RunCreated:
    return RunCreated(run_id=uuid.uuid4(), name="quiet-fox", created=True)


def test_api_backoff_retries_while_unavailable() -> None:
    async def scenario() -> None:
        stop, abandoned = StopSignal(), []
        api, metrics = api_backoff(stop, abandoned)
        answers: list[Exception | RunCreated] = [
            ApiUnavailable("HTTP 503"), DeploymentMissing("not deployed"), created()]
        statuses = []

        async def call() -> RunCreated:
            statuses.append((api.status, api.ok.is_set()))
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

        result = await api.call(call, [inbound()], {"event_id": "e"})
        assert result is not None and result.name == "quiet-fox"
        # 503 marks the API unavailable (the other workers wait); a missing deployment does not
        assert statuses == [("unknown", True), ("unavailable: HTTP 503", False),
                            ("unavailable: HTTP 503", False)]
        assert (api.status, api.ok.is_set(), abandoned) == ("ok", True, [])
        assert metrics.api_errors._value.get() == 2

        async def missing() -> RunCreated:
            raise DeploymentMissing("no batch deployment")

        with pytest.raises(DeploymentMissing):
            await api.call(missing, [inbound()], {}, retry_missing=False)

        async def refused() -> RunCreated:
            raise ApiRejected("HTTP 422: bad parameters")

        api.ok.clear()
        with pytest.raises(ApiRejected):
            await api.call(refused, [inbound()], {})
        assert api.ok.is_set()

    asyncio.run(scenario())


def test_api_backoff_gives_up_on_stop_leaving_messages_unacknowledged() -> None:
    async def scenario() -> None:
        stop, abandoned = StopSignal(), []
        api, _ = api_backoff(stop, abandoned)
        items = [inbound(1), inbound(2)]

        async def down() -> RunCreated:
            stop.set()  # the stop comes while the call is failing
            raise ApiUnavailable("connection refused")

        assert await api.call(down, items, {}) is None
        assert abandoned == items

    asyncio.run(scenario())


def test_a_busy_api_is_tried_again_quickly_before_the_backoff() -> None:
    """503 (on SQLite: a transaction met another's write): `busy_retries` quick tries from
    `busy_retry_delay`, doubling, then the back-off from `retry_min_delay`."""
    async def scenario() -> list[float]:
        stop, waits = StopSignal(), []

        async def sleep(seconds: float) -> None:
            waits.append(seconds)

        stop.sleep = sleep  # type: ignore[method-assign]
        s = settings(busy_retries=2, busy_retry_delay=0.05, retry_min_delay=1.0)
        api = ApiBackoff(s, Metrics(), stop, lambda item: None)
        answers: list[Exception | RunCreated] = [
            ApiBusy("HTTP 503"), ApiBusy("HTTP 503"), ApiBusy("HTTP 503"), created()]

        async def call() -> RunCreated:
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

        assert await api.call(call, [inbound()], {"event_id": "e"}) is not None
        return waits

    waits = asyncio.run(scenario())
    assert len(waits) == 3, waits
    assert 0.05 <= waits[0] <= 0.0625 and 0.1 <= waits[1] <= 0.125, waits
    assert 1.0 <= waits[2] <= 1.25, waits  # the back-off's first delay, after the quick ones
