"""The Prefect server SIGKILLed in the middle of a burst and started again (same port, same
database), on SQLite and on PostgreSQL (a cluster of the test's own): every event is published
exactly once on `origin/a/wis2/#` and no run is left unfinished; the listener and the worker
ride the outage out.

The whole node runs (`bench.faults.fault_node`: broker, Prefect server, wis2-warm worker,
listener, file server). "Mid-burst" is made, not raced: the file server holds the flows'
downloads (its gate), so flow runs are Running when the server is killed; the second half of the
burst is published while the server is down and the listener provably holds it (its /metrics);
the held runs are then released while the server is still down (their next API calls fail and
are retried by the Prefect client) and the server is started again. See
`bench.faults.prefect_server_sigkill_mid_burst`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from bench.faults import fault_node, prefect_server_sigkill_mid_burst
from localnode.postgres import postgres_problem

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(600)]

EVENTS = 10


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_prefect_server_sigkill_mid_burst_loses_and_duplicates_nothing(database: str) -> None:
    if database == "postgres" and (problem := postgres_problem()):
        pytest.fail(f"PostgreSQL is needed (make postgresql): {problem}")
    run_dir = Path(tempfile.mkdtemp(prefix=f"wis2-server-crash-{database}-"))
    with fault_node(run_dir, database=database, events=EVENTS, timeout=240,
                    tag=f"SRV{database[:2].upper()}") as ctx:
        result = prefect_server_sigkill_mid_burst(ctx)
        worker, listener = ctx.node.process("worker"), ctx.node.process("listener")
        debug = (f"{result.model_dump_json(indent=1)}\n--- listener ---\n{listener.tail(40)}\n"
                 f"--- worker ---\n{worker.tail(60)}")
        assert result.error is None, debug
        assert "held at the file server" in result.killed, debug
        assert result.events_sent == EVENTS
        assert result.received == EVENTS and result.lost == 0, debug
        assert result.duplicate_data_ids == 0, debug
        assert result.runs is not None and result.runs.events_covered == EVENTS, debug
        assert result.unfinished_runs == 0 and result.runs.failed == 0, debug
        # the listener and the worker rode it out: the same processes, still running
        assert worker.running and listener.running
    # only on success: keep the logs of a failure for the reader
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
