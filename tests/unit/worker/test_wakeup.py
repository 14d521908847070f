"""worker/wakeup.py without a server: which events wake the worker, and a stream that cannot
connect is retried and never raises. With a real server:
tests/integration/test_warm_worker_events.py.
"""

from __future__ import annotations

import asyncio
import logging
from uuid import uuid4

import pytest
from prefect.events.schemas.events import Event
from prefect.settings import PREFECT_API_URL, temporary_settings

from chain.processes import free_port
from worker import wakeup
from worker.wakeup import PoolWakeup, pool_of


def scheduled(pool: str | None) -> Event:
    related = [{"prefect.resource.id": f"prefect.deployment.{uuid4()}",
                "prefect.resource.role": "deployment", "prefect.resource.name": "default"}]
    if pool is not None:
        related.append({"prefect.resource.id": f"prefect.work-pool.{uuid4()}",
                        "prefect.resource.role": "work-pool", "prefect.resource.name": pool,
                        "prefect.work-pool.type": "wis2-warm"})
    return Event(event="prefect.flow-run.Scheduled",
                 resource={"prefect.resource.id": f"prefect.flow-run.{uuid4()}"}, related=related)


def test_the_pool_of_a_run_is_its_related_work_pool() -> None:
    assert pool_of(scheduled("wis2-pool")) == "wis2-pool"
    assert pool_of(scheduled(None)) is None


def test_the_stream_asks_for_the_scheduled_states_only() -> None:
    names = PoolWakeup("wis2-pool", lambda _: None)._event_filter().event.name
    assert "prefect.flow-run.Scheduled" in names
    assert "prefect.flow-run.Pending" not in names and "prefect.flow-run.Running" not in names


def test_an_unreachable_stream_is_retried_and_never_raises(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(wakeup, "FIRST_RETRY_DELAY", 0.05)
    monkeypatch.setattr(wakeup, "MAX_RETRY_DELAY", 0.05)
    woken: list[str] = []

    async def listen_a_while() -> None:
        waker = PoolWakeup("wis2-pool", woken.append)
        task = asyncio.create_task(waker.run())
        for _ in range(200):  # until it has failed twice (or 10 s)
            await asyncio.sleep(0.05)
            if sum("event stream unavailable" in r.message for r in caplog.records) >= 2:
                break
        assert not task.done()  # still retrying: it never returns nor raises by itself
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    caplog.set_level(logging.DEBUG, logger="worker.wakeup")
    with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}):
        asyncio.run(listen_a_while())
    failures = [r for r in caplog.records if "event stream unavailable" in r.message]
    assert len(failures) >= 2
    assert failures[0].levelno == logging.INFO and failures[1].levelno == logging.DEBUG
    assert woken == []
