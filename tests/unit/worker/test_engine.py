"""What the `wis2-warm` worker changes in Prefect's engine for its runs (worker/engine.py), without
a server: pooled API clients, the suspension observer switch, no per-run environment.

Runs through a real worker and server: tests/integration/test_warm_worker.py.
"""

from __future__ import annotations

import prefect.flow_engine as flow_engine
import pytest
from prefect.context import SyncClientContext
from prefect.settings import PREFECT_API_URL, temporary_settings

from worker.engine import ClientPool, suspension_observer
from worker.warm import WarmJobConfiguration


@pytest.fixture
def api_url():
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):  # never contacted
        yield


def test_a_run_gets_the_client_a_finished_run_gave_back(api_url) -> None:
    pool = ClientPool()
    assert SyncClientContext.get() is None
    with pool.client_context() as first:
        assert SyncClientContext.get() is first  # what the engine's get_or_create finds
    assert SyncClientContext.get() is None
    with pool.client_context() as second:
        assert second is first
        with pool.client_context() as other:  # a second run at the same time: its own client
            assert other is not first
    pool.close()
    assert first.client._closed and other.client._closed


def test_a_client_of_a_run_that_raised_is_closed_not_reused(api_url) -> None:
    pool = ClientPool()
    with pytest.raises(RuntimeError), pool.client_context() as broken:
        raise RuntimeError("engine error")
    assert broken.client._closed
    with pool.client_context() as fresh:
        assert fresh is not broken
    pool.close()


def test_the_suspension_observer_is_off_until_asked_for() -> None:
    prefects = flow_engine.observe_flow_run_suspension
    try:
        suspension_observer(False)
        off = flow_engine.observe_flow_run_suspension
        assert off is not prefects
        with off("run-id", object()):  # a no-op: no thread, no client, no subscription
            pass
        suspension_observer(True)
        assert flow_engine.observe_flow_run_suspension is prefects
    finally:
        flow_engine.observe_flow_run_suspension = prefects


def test_no_environment_is_computed_for_a_run_in_the_worker_process() -> None:
    assert WarmJobConfiguration._base_environment() == {}
