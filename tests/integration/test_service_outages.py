"""The services the worker hosts share go away in the middle of the work: the PostgreSQL of the
ledger (and of the Prefect server: the same cluster) SIGKILLed, the Redis of the task results
SIGKILLed or unreachable (SIGSTOP); each comes back. Nothing is lost, no file gets a second
message id, no run is left Failed or Crashed.

(a) The ledger alone (a PostgreSQL cluster of the test's own): a read made while the server is
dead waits for it; a claim whose locks died with the server, and which another run took and
recorded meanwhile, is taken again by `confirm()` (waiting for the new holder) and says so.
(b) The recovery's judgement of workers through an outage of the Prefect API (a real Prefect
server behind `ApiGate`): a look whose read of the pool's workers waited through the outage
leaves a live worker's run alone, and reschedules it once the worker stays silent past the grace
(the genuine case: tests/integration/test_worker_crash.py).
(c) The whole scaled node (`bench.faults.fault_node` with a topology: two workers, two listener
replicas, its own PostgreSQL and Redis; the scenarios of `bench/faults_scaled.py`, also run by
`make bench --faults`): the burst's runs are held Running at the gated file server, the service
is killed or frozen, the runs are released while it is away, it comes back 3 s or 60 s later;
every event's notification on `origin/a/wis2/#`. The node's runs wait only 10 s for a service
(WIS2_LEDGER_RETRY_SECONDS, WIS2_RESULTS_RETRY_SECONDS; 120 by default, as `make bench` runs
them): a 3-second outage is ridden out inside the runs, a 60-second one fails the released runs
as `Unavailable` (a service, not the event) and the recovery runs them again once it is back;
both workers live throughout, so no run may be rescheduled as a dead worker's.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bench import chain as bench_chain
from bench import faults_scaled  # noqa: F401  (registers the scenarios)
from bench.faults import SCENARIOS, FaultContext, fault_node
from chain.ledger import PostgresLedger
from localnode.postgres import PG_USER, PostgresCluster, postgres_problem
from localnode.redis import redis_problem
from localnode.scaled import Topology
from tests.fixtures.gates import ApiGate
from worker.recovery import RECOVERING, WORKER_LABEL, PoolRecovery, RecoverySettings

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1500)]

EVENTS = 10


class _Retried(logging.Handler):
    """Set once `chain.failures.ride_out` logged a retry: the operation provably waits."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "unavailable" in record.getMessage():
            self.seen.set()


@pytest.fixture
def retried() -> Iterator[_Retried]:
    handler = _Retried()
    logger = logging.getLogger("chain.failures")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def _holds(url: str, key_of: str) -> bool:
    """Whether some other session holds the claim of `key_of` (a try-lock from a third one)."""
    from chain.ledger_entry import claim_key

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (claim_key(key_of),)).fetchone()
        return not (row and row[0])


def _waiting(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                           "AND NOT granted").fetchone()
    return int(row[0]) if row else 0


def test_the_ledger_waits_for_its_server_and_takes_a_lost_claim_again(
        tmp_path: Path, retried: _Retried) -> None:
    if problem := postgres_problem():
        pytest.fail(f"PostgreSQL is needed (make postgresql): {problem}")
    with PostgresCluster(log_path=tmp_path / "postgres.log") as cluster:
        cluster.create_database("ledger")
        url = f"postgresql://{PG_USER}@{cluster.host}:{cluster.port}/ledger"
        ledger = PostgresLedger(url, retry_seconds=120)
        ledger.record("wis2/x/a", notification_id="n1", rel="canonical", checksum="sha256:A")

        # a read while the server is dead waits for it (made, not raced: the retry is logged)
        cluster.kill()
        got: list[object] = []
        reader = threading.Thread(target=lambda: got.append(ledger.get("wis2/x/a")))
        reader.start()
        assert retried.seen.wait(60), "the read did not wait for the ledger"
        cluster.start()
        reader.join(120)
        assert [e.notification_id for e in got] == ["n1"]  # type: ignore[attr-defined]

        # a claim held across a restart: its locks die with the server
        with ledger.claim(["wis2/x/c"], timeout=60) as claim:
            assert claim.confirm() is True  # held all along
            cluster.kill()
            cluster.start()
            other = PostgresLedger(url, retry_seconds=60)
            holding, release = threading.Event(), threading.Event()

            def another_run() -> None:  # takes the file meanwhile: only possible as it was lost
                with other.claim(["wis2/x/c"], timeout=5):
                    other.record("wis2/x/c", notification_id="other", rel="canonical")
                    holding.set()
                    release.wait(120)

            thread = threading.Thread(target=another_run)
            thread.start()
            assert holding.wait(60), "the claim was not free after the restart"
            confirmed: list[bool] = []
            confirming = threading.Thread(target=lambda: confirmed.append(claim.confirm()))
            confirming.start()
            deadline = time.monotonic() + 60
            while _waiting(url) < 1:  # confirm() waits for the other holder
                assert time.monotonic() < deadline, "confirm() did not wait for the holder"
                time.sleep(0.1)
            release.set()
            thread.join(60)
            confirming.join(60)
            assert confirmed == [False]  # lost, taken again: read the ledger again
            assert _holds(url, "wis2/x/c")  # this claim's session holds it again
            assert ledger.get("wis2/x/c").notification_id == "other"  # type: ignore[union-attr]
            assert claim.confirm() is True
        assert not _holds(url, "wis2/x/c")  # released at the end of the block


# ---- the recovery's judgement of a live worker through an outage of the Prefect API ------------
def test_a_look_that_waited_through_an_api_outage_takes_no_live_workers_run(
        prefect_api: Any) -> None:
    """A recovery look that starts while the API is unavailable waits in its client's retries
    (made here: its read of the pool's workers is held at a proxy); meanwhile no worker's
    heartbeat can reach the API, so when the look's reads return, the live worker looks silent.
    The look must not take its run (it did: the outage was seen after its decisions); a worker
    that stays silent once the API is back (dead) still has its run rescheduled."""
    asyncio.run(_live_worker_through_an_api_outage(prefect_api.api_url))


async def _live_worker_through_an_api_outage(api_url: str) -> None:
    from prefect.client.orchestration import PrefectClient, get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.states import Running

    pool, worker = f"outage-{uuid.uuid4().hex[:8]}", "live-worker"
    settings = RecoverySettings(worker_timeout=1, outage_grace=3, slow_call=2, interval=0.01)
    async with get_client() as client:
        await client.create_work_pool(WorkPoolCreate(name=pool, type="wis2-warm"))
        flow_id = await client.create_flow_from_name("outage-probe")
        deployment_id = await client.create_deployment(flow_id=flow_id, name=pool,
                                                       work_pool_name=pool)
        run = await client.create_flow_run_from_deployment(deployment_id)
        await client.set_flow_run_state(run.id, Running(), force=True)
        await client.update_flow_run_labels(run.id, {WORKER_LABEL: worker})
        await client.send_worker_heartbeat(pool, worker, heartbeat_interval_seconds=1)

        gate = ApiGate(api_url, allow=0,
                       holds=lambda method, path: path.endswith(f"/{pool}/workers/filter"))
        recovery = PoolRecovery(pool, settings)
        try:
            async with PrefectClient(gate.api_url) as through_gate:
                look = asyncio.create_task(recovery.maybe_run(through_gate))
                await asyncio.to_thread(gate.wait_held, 1, 60)  # the look waits for the API
                # the outage lasts longer than the look's slow_call and the worker's timeout
                # (the fault's length, not a synchronisation: nothing else runs meanwhile)
                await asyncio.sleep(settings.slow_call + 1)
                gate.release()  # the API is back; the worker's heartbeat is still on its way
                done = await asyncio.wait_for(look, 60)
                assert [d for d in done if d.action == "rescheduled"] == []
                state = (await client.read_flow_run(run.id)).state
                assert state is not None and state.is_running(), state

                # the worker stays silent once the API is back: dead after the grace
                deadline = time.monotonic() + 60
                while not (done := await recovery.maybe_run(through_gate)):
                    assert time.monotonic() < deadline, "the dead worker's run was left"
                    await asyncio.sleep(0.2)
        finally:
            gate.close()
        assert [(d.action, d.flow_run_id) for d in done] == [("rescheduled", run.id)], done
        assert f"its worker {worker} sent no heartbeat" in done[0].reason
        state = (await client.read_flow_run(run.id)).state
        assert state is not None and state.is_scheduled() and state.name == RECOVERING


# ---- the whole scaled node -------------------------------------------------------------------
@pytest.fixture(scope="module")
def scaled() -> Iterator[FaultContext]:
    for problem in (postgres_problem(), redis_problem()):
        if problem:
            pytest.fail(f"PostgreSQL and Redis are needed (make postgresql redis): {problem}")
    run_dir = Path(tempfile.mkdtemp(prefix="wis2-outages-"))
    with fault_node(run_dir, events=EVENTS, timeout=420, tag="OUT",
                    topology=Topology(workers=2, listeners=2), worker_limit=4,
                    env={"WIS2_LEDGER_RETRY_SECONDS": "10", "WIS2_RESULTS_RETRY_SECONDS": "10",
                         "WIS2_RECOVERY_UNAVAILABLE_DELAY": "5"}) as ctx:
        yield ctx
    shutil.rmtree(run_dir, ignore_errors=True)


def _assert_ridden_out(ctx: FaultContext, name: str, marker: str) -> None:
    result = SCENARIOS[name](ctx)
    debug = (f"{result.model_dump_json(indent=1)}\n" + "\n".join(
        f"--- {p.name} ---\n{p.tail(40)}" for p in ctx.node.processes
        if p.name.split("-")[0] in ("worker", "prefect")))
    assert result.error is None, debug
    assert "held at the file server" in result.killed, debug
    assert result.received == EVENTS and result.lost == 0, debug
    assert result.distinct_message_ids_for_duplicates == 0, debug  # never a second id
    runs = bench_chain.flow_run_counts(ctx.node.state, marker, settle=180)
    assert runs.events_covered == EVENTS, runs
    assert runs.unfinished == 0 and runs.failed == 0, (runs, debug)  # none Failed, Crashed
    if "60s" in name:  # past the runs' 10 s: failed as Unavailable, run again, Completed
        assert bench_chain.rescheduled_after_unavailable(ctx.node.state, marker) >= 1, debug
    # both workers lived throughout: none of their runs was taken as a dead worker's
    assert bench_chain.rescheduled_as_their_workers_died(ctx.node.state, marker) == 0, debug


def test_the_ledgers_and_prefects_postgresql_killed_mid_burst(scaled: FaultContext) -> None:
    """Issue 29 (1) and (4): PostgreSQL (the ledger and the Prefect database) back in 3 s."""
    _assert_ridden_out(scaled, "postgres-sigkill-mid-burst", "_pgkill_")


def test_the_ledgers_and_prefects_postgresql_killed_for_60_s_mid_burst(
        scaled: FaultContext) -> None:
    """Issue 29 (1), (3) and (4): the ledger's claims and records, and the Prefect server's
    database, away for 60 s: the released runs fail as Unavailable and run again."""
    _assert_ridden_out(scaled, "postgres-sigkill-60s-mid-burst", "_pgkill60_")


def test_the_results_redis_killed_mid_burst(scaled: FaultContext) -> None:
    _assert_ridden_out(scaled, "redis-sigkill-mid-burst", "_rdkill_")


def test_the_results_redis_unreachable_for_60_s_mid_burst(scaled: FaultContext) -> None:
    _assert_ridden_out(scaled, "redis-unreachable-60s-mid-burst", "_rdstop60_")
