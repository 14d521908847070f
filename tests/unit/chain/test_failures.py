"""`chain.failures`: which failures are the infrastructure's (the run scheduled again) and which
the event's (final), and `ride_out`'s bounded retries; the recovery's reading of a run Failed on
infrastructure (`worker.recovery.stranded_reason`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import uuid4

import httpx
import psycopg
import pytest
import redis
from prefect.client.schemas.objects import FlowRun
from prefect.states import Completed, Failed

from chain.failures import UNAVAILABLE, classify, ride_out
from chain.ledger_entry import ClaimLost, ClaimTimeout, LedgerUnavailable
from chain.mqtt import MqttError, PublishRefused
from flows.tasks.verify import DataMismatch
from wis2.errors import FieldError, InvalidInput
from worker.recovery import RecoverySettings, stranded_reason


def _status(code: int) -> httpx.HTTPStatusError:
    request = httpx.Request("GET", "http://files.example/x.csv")
    return httpx.HTTPStatusError("status", request=request,
                                 response=httpx.Response(code, request=request))


def _raised_from(outer: Exception, cause: Exception) -> Exception:
    try:
        try:
            raise cause
        except Exception as exc:
            raise outer from exc
    except Exception as exc:
        return exc


@pytest.mark.parametrize("exc", [
    LedgerUnavailable("ledger"), ClaimLost("lost"), ClaimTimeout("wis2/x/a", 1.0),
    psycopg.OperationalError("server closed the connection unexpectedly"),
    redis.ConnectionError("Error 111 connecting to redis:6379. Connection refused."),
    redis.TimeoutError("Timeout reading from socket"),
    MqttError("cannot reach broker"), httpx.ConnectError("refused"), _status(503),
    ConnectionRefusedError(111, "refused"), TimeoutError("download too slow"),
    _raised_from(RuntimeError("wrapped"), redis.ConnectionError("refused")),
])
def test_infrastructure_failures(exc: Exception) -> None:
    assert classify(exc) == "infrastructure"


@pytest.mark.parametrize("exc", [
    InvalidInput([FieldError(path="$.id", message="missing")], what="event"),
    DataMismatch("links[rel=canonical].length: announced 10 bytes, got 12", path="$.links"),
    PublishRefused("origin/a/wis2/x", "Not authorized"), _status(404),
    ValueError("anything else"), KeyError("argo"),
    _raised_from(RuntimeError("wrapped"), ValueError("bad field")),
])
def test_event_failures(exc: Exception) -> None:
    assert classify(exc) == "event"


def test_ride_out_retries_infrastructure_for_a_bounded_time_only() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise redis.ConnectionError("refused")
        return "ok"

    assert ride_out(flaky, seconds=30, what="x", first_delay=0.01) == "ok"
    assert len(calls) == 3
    with pytest.raises(ValueError):  # the event's: never retried
        ride_out(lambda: (calls.append(1), (_ for _ in ()).throw(ValueError("bad")))[0],
                 seconds=30, what="x", first_delay=0.01)
    calls.clear()
    with pytest.raises(redis.ConnectionError):  # past the deadline: raised
        ride_out(lambda: (calls.append(1), (_ for _ in ()).throw(
            redis.ConnectionError("down")))[0], seconds=0.05, what="x", first_delay=0.01)
    assert len(calls) >= 2


def _run(state: object) -> FlowRun:
    return FlowRun(id=uuid4(), name="r", flow_id=uuid4(), state=state)


def test_the_recovery_schedules_again_a_run_failed_on_infrastructure_only() -> None:
    settings = RecoverySettings(_env_file=None, unavailable_delay=30)
    now = datetime.now(UTC)
    unavailable = Failed(name=UNAVAILABLE, message="LedgerUnavailable: ...")
    unavailable.timestamp = now - timedelta(seconds=31)
    assert "a service unavailable" in (stranded_reason(_run(unavailable), {}, settings, now)
                                       or "")
    fresh = Failed(name=UNAVAILABLE, message="x")
    fresh.timestamp = now - timedelta(seconds=5)  # not before unavailable_delay
    assert stranded_reason(_run(fresh), {}, settings, now) is None
    event = Failed(message="InvalidInput: $.id")
    event.timestamp = now - timedelta(minutes=5)
    assert stranded_reason(_run(event), {}, settings, now) is None  # the event's: final
    old = Failed(name=UNAVAILABLE, message="x")
    old.timestamp = now - timedelta(hours=2)
    assert stranded_reason(_run(old), {}, settings, now) is None
    assert stranded_reason(_run(Completed()), {}, settings, now) is None


def test_a_worker_silent_only_during_an_api_outage_is_not_dead() -> None:
    """No worker can send a heartbeat while the API is away: a silence counts from the end of
    the outage this process saw (the recovery would otherwise reschedule live runs)."""
    from prefect.client.schemas.objects import Worker

    from worker.recovery import PoolRecovery, worker_is_dead

    settings = RecoverySettings(_env_file=None)
    now = datetime.now(UTC)
    worker = Worker(name="w2", work_pool_id=uuid4(), heartbeat_interval_seconds=10,
                    last_heartbeat_time=now - timedelta(seconds=70))
    assert worker_is_dead(worker, settings, now) is not None  # 70 s > 3 x 10 s
    # the outage ended 60 s ago: within the grace (150 s) after it, plus the timeout
    assert worker_is_dead(worker, settings, now, outage_end=now - timedelta(seconds=60)) is None
    old = Worker(name="w3", work_pool_id=uuid4(), heartbeat_interval_seconds=10,
                 last_heartbeat_time=now - timedelta(seconds=400))
    assert worker_is_dead(old, settings, now, outage_end=now - timedelta(seconds=300))
    recovery = PoolRecovery("pool", settings)
    assert recovery.outages.end() is None
    recovery.saw_outage()
    assert recovery.outages.end() is not None


def test_a_call_waiting_for_the_api_is_an_outage_while_it_waits() -> None:
    """A heartbeat or poll stuck in its client's retries: the outage is seen while it waits (a
    recovery look may decide meanwhile), and once it ended; a look's own slow reads too."""
    import time

    from worker.api_outages import ApiOutages, LookOutages

    outages = ApiOutages(slow_call=0.05)
    with outages.call():
        assert outages.end() is None  # not slow yet
        time.sleep(0.1)
        assert outages.end() is not None  # waiting: an outage now
        assert outages.last is None
    assert outages.last is not None  # ended slow
    quick = ApiOutages(slow_call=60)
    with quick.call():
        pass
    assert quick.end() is None

    look = LookOutages(0.05, quick.end)
    look.read()
    assert look.end() is None
    time.sleep(0.1)
    look.read()  # its reads took longer than slow_call
    assert look.end() is not None
    assert LookOutages(60, outages.end).end() == outages.last  # the process's view


def test_a_run_that_ended_here_without_its_final_state_is_reclaimed() -> None:
    """The engine gave up on an unavailable API and the Crashed state the worker proposed was
    refused too: the run stays Running on the server; the worker that executed it reclaims it."""
    from prefect.states import Running

    settings = RecoverySettings(_env_file=None)
    now = datetime.now(UTC)
    run = FlowRun(id=uuid4(), name="r", flow_id=uuid4(), state=Running(),
                  labels={"prefect.worker.name": "me"})
    since = now - timedelta(minutes=5)  # the run started after this worker: not a former one
    assert stranded_reason(run, {}, settings, now, own_name="me", own_since=since) is None
    assert "did not reach the API" in (stranded_reason(
        run, {}, settings, now, own_name="me", own_since=since, own_ended=[run.id]) or "")
    assert stranded_reason(run, {}, settings, now, own_name="me", own_runs=[run.id],
                           own_since=since, own_ended=[run.id]) is None  # executing again
