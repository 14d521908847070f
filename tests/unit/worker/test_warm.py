"""The `wis2-warm` worker type, without starting a worker: its registration and job template.

A real worker running flow runs: tests/integration/test_warm_worker.py.
"""

from __future__ import annotations

from prefect.workers.base import BaseWorker

from worker.warm import WarmWorker


def test_entry_point_registers_the_worker_type() -> None:
    assert BaseWorker.get_worker_class_from_type("wis2-warm") is WarmWorker
    assert "wis2-warm" in BaseWorker.get_all_available_worker_types()
    template = WarmWorker.get_default_base_job_template()
    assert "env" in template["variables"]["properties"]  # prefect.yaml's job_variables.env


def test_worker_labels_are_tried_quickly_without_the_clients_retries(monkeypatch) -> None:
    """A 503 on the labels (SQLite) is tried again after 0.05 s, not after the client's 2 s;
    the last try has the client's retries (an API restarting)."""
    import uuid

    import anyio
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings
    from prefect.workers.base import BaseWorker

    import worker.warm as warm

    for failures, expected in ((2, [0, 0, 0]), (99, [0, 0, 0, 0, 7])):
        seen: list[int] = []

        async def flaky(self, flow_run_id, failures=failures, seen=seen) -> None:
            seen.append(PREFECT_CLIENT_MAX_RETRIES.value())
            if len(seen) <= failures:
                raise RuntimeError("HTTP 503: database is locked")

        monkeypatch.setattr(BaseWorker, "_give_worker_labels_to_flow_run", flaky)
        monkeypatch.setattr(warm, "LABEL_QUICK_DELAY", 0.001)
        worker = object.__new__(warm.WarmWorker)
        with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 7}):
            anyio.run(worker._give_worker_labels_to_flow_run, uuid.uuid4())  # never raises
        assert seen == expected


def test_a_poll_asks_for_the_runs_it_can_submit(monkeypatch) -> None:
    """The poll asks the server for the free slots (and the runs still being submitted), not
    Prefect's 200 runs with their parameters; at least one; Prefect's poll without --limit or
    when turned off."""
    import uuid

    import anyio
    from prefect.workers.base import BaseWorker

    import worker.warm as warm

    bodies: list[dict] = []

    class Response:
        def json(self) -> list:
            return []

    class Client:
        async def request(self, method, path, path_params=None, json=None) -> Response:
            assert (method, path, path_params) == (
                "POST", "/work_pools/{name}/get_scheduled_flow_runs", {"name": "wis2-pool"})
            bodies.append(json)
            return Response()

    worker = object.__new__(warm.WarmWorker)
    worker._client = Client()
    worker._work_pool_name, worker._work_queues, worker._prefetch_seconds = "wis2-pool", {"q"}, 10
    worker._submitting_flow_run_ids, worker._poll_limited = set(), True

    async def poll(limit: int, held: int, submitting: int) -> None:
        worker._limiter = anyio.CapacityLimiter(limit)
        for _ in range(held):
            worker._limiter.acquire_on_behalf_of_nowait(object())
        worker._submitting_flow_run_ids = {uuid.uuid4() for _ in range(submitting)}
        assert await worker._get_scheduled_flow_runs() == []

    anyio.run(poll, 8, 3, 0)
    anyio.run(poll, 8, 8, 2)
    anyio.run(poll, 2, 2, 0)
    assert [b["limit"] for b in bodies] == [5, 2, 1]
    assert all(b["work_queue_names"] == ["q"] and b["scheduled_before"] for b in bodies)

    async def prefects(self) -> list:
        return ["prefect's poll"]

    monkeypatch.setattr(BaseWorker, "_get_scheduled_flow_runs", prefects)
    worker._poll_limited = False  # WIS2_WORKER_POLL_LIMITED=false
    assert anyio.run(worker._get_scheduled_flow_runs) == ["prefect's poll"]
    worker._limiter, worker._poll_limited = None, True  # no --limit
    assert anyio.run(worker._get_scheduled_flow_runs) == ["prefect's poll"]
    assert len(bodies) == 3
