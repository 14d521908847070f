"""The `wis2-warm` worker takes a freshly scheduled run from the server's event stream, without
waiting for its poll (worker/wakeup.py), and still works by polling when the stream is unavailable.

Each test starts a real `prefect worker start --type wis2-warm` subprocess on a pool of its own
with a deployment of a trivial flow (tests/integration/warm_flows.py). Timings are asserted
against the poll interval, never against the machine's speed: with a 600 s poll (jitter: the next
poll comes at least 420 s after the first one, longer than a test may last), a run created after
the first poll and started at all can only have been taken because of its event.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.settings import temporary_settings

from chain.processes import ManagedProcess
from localnode.prefect_server import PrefectServer, prefect_cli
from tests.fixtures.gates import ApiGate
from tests.fixtures.paths import REPO
from tests.fixtures.prefect_api import QUIET_SERVICES

pytestmark = pytest.mark.timeout(240)

LONG_POLL = 600  # seconds between two polls of the worker (PREFECT_WORKER_QUERY_SECONDS)
CONNECTED = "event stream connected"


def client_env(api: PrefectServer, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "WIS2_"))}
    env.update(api.client_env(), PREFECT_HOME=str(home), WIS2_PROJECT_DIR=str(REPO),
               PREFECT_LOGGING_LEVEL="INFO")
    return env


def make_pool(env: dict[str, str]) -> tuple[str, uuid.UUID]:
    """A wis2-warm pool of its own and a deployment of the sleep flow on it."""
    pool = f"warm-events-{uuid.uuid4().hex[:6]}"
    done = subprocess.run([prefect_cli(), "work-pool", "create", pool, "--type", "wis2-warm"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    with get_client(sync_client=True) as client:
        deployment_id = client.create_deployment(
            flow_id=client.create_flow_from_name("warm-test-sleep"), name=pool,
            entrypoint="tests/integration/warm_flows.py:sleep_flow", work_pool_name=pool,
            work_queue_name="default")
    return pool, deployment_id


@contextmanager
def warm_worker(pool: str, env: dict[str, str], log: Path) -> Iterator[ManagedProcess]:
    worker = ManagedProcess("worker", [prefect_cli(), "worker", "start", "--pool", pool,
                                       "--type", "wis2-warm", "--limit", "2"],
                            log, env=env, cwd=log.parent)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop(timeout=30)


def wait_for(what: str, check, timeout: float, log: Path, worker: ManagedProcess):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert worker.running, f"the worker exited:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"{what}: not after {timeout}s\n" \
                                            f"{log.read_text()[-4000:]}"
        time.sleep(0.3)


def first_poll_done(pool: str) -> bool:
    """The server records a poll of the pool's queue (`last_polled`) once it has answered it."""
    with get_client(sync_client=True) as client:
        queue = client.read_work_queue_by_name("default", work_pool_name=pool)
    return queue.last_polled is not None


def final(run_id: uuid.UUID) -> FlowRun | None:
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
    return run if run.state is not None and run.state.is_final() else None


def started_after_creation(run: FlowRun) -> float:
    assert run.start_time is not None and run.created is not None
    return (run.start_time - run.created).total_seconds()


def test_a_run_is_taken_from_the_event_stream_before_the_next_poll(prefect_api, tmp_path):
    env = client_env(prefect_api, tmp_path / "home")
    env["PREFECT_WORKER_QUERY_SECONDS"] = str(LONG_POLL)
    pool, deployment_id = make_pool(env)
    log = tmp_path / "worker.log"
    with warm_worker(pool, env, log) as worker:
        wait_for("subscribed", lambda: CONNECTED in log.read_text(), 120, log, worker)
        wait_for("first poll", lambda: first_poll_done(pool), 120, log, worker)
        runs = []
        for _ in range(2):  # the second one: the stream still works after a run
            with get_client(sync_client=True) as client:
                created = client.create_flow_run_from_deployment(
                    deployment_id, parameters={"seconds": 0})
            run_id = created.id
            runs.append(wait_for("run final", lambda: final(run_id), 120, log, worker))  # noqa: B023
    for run in runs:
        assert run.state is not None and run.state.is_completed(), run.state
        # the next poll is >= 0.7 * LONG_POLL after the first one
        assert started_after_creation(run) < LONG_POLL * 0.2, (run.created, run.start_time)


def test_without_the_event_stream_the_poll_still_takes_runs(prefect_api, tmp_path):
    """Through an HTTP-only proxy (no websocket): the stream never connects, the worker says so
    and runs its runs by polling."""
    gate = ApiGate(prefect_api.api_url, allow=10**9)
    try:
        env = client_env(prefect_api, tmp_path / "home")
        env.update(PREFECT_API_URL=gate.api_url, PREFECT_WORKER_QUERY_SECONDS="1")
        pool, deployment_id = make_pool(env)
        log = tmp_path / "worker.log"
        with warm_worker(pool, env, log) as worker:
            wait_for("stream reported unavailable",
                     lambda: "event stream unavailable" in log.read_text(), 120, log, worker)
            with get_client(sync_client=True) as client:
                created = client.create_flow_run_from_deployment(
                    deployment_id, parameters={"seconds": 0})
            run = wait_for("run final", lambda: final(created.id), 120, log, worker)
            assert run.state is not None and run.state.is_completed(), run.state
            assert worker.running
            assert CONNECTED not in log.read_text()
    finally:
        gate.close()


def test_after_a_server_restart_the_stream_reconnects(tmp_path):
    """The server is SIGKILLed and started again on the same port and database: the worker stays
    up, subscribes again, and takes a new run from its event (still long before its poll)."""
    server = PrefectServer(home=tmp_path / "server", extra_env=QUIET_SERVICES)
    server.start(timeout=120)
    try:
        with temporary_settings(updates=server.client_settings()):
            env = client_env(server, tmp_path / "home")
            env["PREFECT_WORKER_QUERY_SECONDS"] = str(LONG_POLL)
            pool, deployment_id = make_pool(env)
            log = tmp_path / "worker.log"
            with warm_worker(pool, env, log) as worker:
                wait_for("subscribed", lambda: CONNECTED in log.read_text(), 120, log, worker)
                wait_for("first poll", lambda: first_poll_done(pool), 120, log, worker)
                server.stop(sig=signal.SIGKILL)
                server = PrefectServer(home=tmp_path / "server", port=server.port,
                                       extra_env=QUIET_SERVICES)
                server.start(timeout=120)
                wait_for("subscribed again", lambda: log.read_text().count(CONNECTED) >= 2,
                         150, log, worker)
                with get_client(sync_client=True) as client:
                    created = client.create_flow_run_from_deployment(
                        deployment_id, parameters={"seconds": 0})
                run = wait_for("run final", lambda: final(created.id), 120, log, worker)
                assert run.state is not None and run.state.is_completed(), run.state
                assert started_after_creation(run) < LONG_POLL * 0.2
    finally:
        server.stop()
