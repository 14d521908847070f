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
            anyio.run(worker._set_worker_labels, uuid.uuid4())  # never raises
        assert seen == expected


def test_a_poll_asks_for_the_runs_it_can_submit(monkeypatch) -> None:
    """The poll asks the server for the free slots (and the runs still being submitted), not
    Prefect's 200 runs with their parameters; at least one; Prefect's poll without --limit or
    when turned off."""
    import types
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

    polled = types.SimpleNamespace(flow_run=types.SimpleNamespace(id=uuid.uuid4()))

    async def prefects(self) -> list:
        return [polled]

    monkeypatch.setattr(BaseWorker, "_get_scheduled_flow_runs", prefects)
    worker._poll_limited = False  # WIS2_WORKER_POLL_LIMITED=false
    assert anyio.run(worker._get_scheduled_flow_runs) == [polled]
    worker._limiter, worker._poll_limited = None, True  # no --limit
    assert anyio.run(worker._get_scheduled_flow_runs) == [polled]
    assert len(bodies) == 3


def test_the_labels_are_set_beside_the_runs_start_unless_turned_off(monkeypatch) -> None:
    """WIS2_WORKER_MERGE_RUN_PATCHES: the labels' PATCH does not hold the run's start (it
    returns before the PATCH is answered, which still happens); off: awaited, as Prefect's."""
    import asyncio
    import uuid

    from prefect.workers.base import BaseWorker

    import worker.warm as warm

    answered: list[bool] = []

    async def slow(self, flow_run_id) -> None:
        await asyncio.sleep(0.01)
        answered.append(True)

    monkeypatch.setattr(BaseWorker, "_give_worker_labels_to_flow_run", slow)

    async def start(merge: bool) -> tuple[int, int]:
        worker = object.__new__(warm.WarmWorker)
        worker._merge_patches, worker._labelling = merge, set()
        await worker._give_worker_labels_to_flow_run(uuid.uuid4())
        before = len(answered)
        await asyncio.gather(*worker._labelling)
        return before, len(answered)

    assert asyncio.run(start(True)) == (0, 1)  # returned before the answer, answered after
    answered.clear()
    assert asyncio.run(start(False)) == (1, 1)


def test_the_regular_poll_is_left_to_the_stream_only_while_it_is_connected(monkeypatch) -> None:
    """With the event stream connected, the regular poll runs every
    WIS2_WORKER_STREAM_POLL_SECONDS; every time when the stream is down, when it is 0, or when
    the last poll filled the free slots (a backlog: more runs may wait)."""
    import asyncio
    import types
    import uuid

    import worker.warm as warm

    clock = [1000.0]
    monkeypatch.setattr(warm.time, "monotonic", lambda: clock[0])
    worker = object.__new__(warm.WarmWorker)
    worker._wakeup = type("Stream", (), {"connected": asyncio.Event()})()
    worker._stream_poll_seconds, worker._last_poll, worker._more_waiting = 10.0, -1e9, False
    worker._submitting_flow_run_ids = set()
    worker._limiter = types.SimpleNamespace(available_tokens=8)  # free run slots

    def runs(n: int) -> list:
        return [types.SimpleNamespace(flow_run=types.SimpleNamespace(id=uuid.uuid4()))
                for _ in range(n)]

    assert not worker._stream_polls()  # never polled
    worker._polled(runs(1), limit=8)
    assert not worker._stream_polls()  # the stream is down
    worker._wakeup.connected.set()
    assert worker._stream_polls()
    clock[0] += 9.9
    assert worker._stream_polls()
    clock[0] += 0.2
    assert not worker._stream_polls()  # 10 s since the last poll
    worker._polled(runs(8), limit=8)
    assert worker._more_waiting and not worker._stream_polls()  # the answer was cut at 8
    worker._polled([], limit=8)
    assert worker._stream_polls()
    # 1 slot free, 2 runs being submitted (Pending by now, so not returned): the limit of 3 is
    # not reached, but 2 new runs for 1 slot: one waits, the next run's end polls for it
    worker._limiter.available_tokens = 1
    worker._submitting_flow_run_ids = {uuid.uuid4(), uuid.uuid4()}
    worker._polled(runs(2), limit=3)
    assert worker._last_new == 2 and worker._more_waiting and not worker._stream_polls()
    worker._polled([*runs(1), types.SimpleNamespace(flow_run=types.SimpleNamespace(
        id=next(iter(worker._submitting_flow_run_ids))))], limit=3)
    assert worker._last_new == 1 and not worker._more_waiting  # one new run, one free slot
    worker._stream_poll_seconds = 0.0
    assert not worker._stream_polls()
    worker._stream_poll_seconds, worker._wakeup = 10.0, None  # WIS2_WORKER_WAKEUP=false
    assert not worker._stream_polls()
