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
