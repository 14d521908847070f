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
