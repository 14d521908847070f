"""Recovery of flow runs stranded by a dead worker: reschedule them, a bounded number of times.

Prefect 3.9 workers only take Scheduled runs, and nothing on the server moves a Pending or
Running run whose worker died (SIGKILL, OOM, a lost host): its events would never be published.
This module finds such runs in a work pool and moves them back to Scheduled, so that any worker
of the pool (the same one restarted, or another one already running) runs them again. Rerunning
is safe: the build and publish tasks are cached per event and per notification id
(`flows/tasks/caching.py`), so a rerun publishes the same notification (same message id) and
never sends an acknowledged one again; the cache locks of the dead run expire with it.

How a run is found stranded, with Prefect's own records only:

- a worker labels each run it claims (`prefect.worker.name`, Prefect's worker labels) and sends
  heartbeats (`PREFECT_WORKER_HEARTBEAT_SECONDS`); a Pending or Running run whose worker has not
  sent one for `worker_timeout` (default: 3 heartbeat intervals, Prefect's own "offline" rule)
  is stranded; no silence counts during an outage of the API, nor `outage_grace` seconds
  after (`worker.api_outages`: how this process sees them);
- a worker that starts again with the same `--name` reclaims at once the runs labelled with its
  name whose state predates its start and that it is not running (`own_name`/`own_runs`: the
  `wis2-warm` worker); give each live worker its own name; it also reclaims the runs it
  executed whose final state never reached the API (`own_ended`: the engine gave up on an
  API that stayed unavailable, and the Crashed state it then proposed was refused too);
- a Pending run that no worker labelled (killed between the claim and the label) is stranded
  once it has been Pending for `unclaimed_timeout`;
- a run Crashed because its process died (Prefect's process worker reports "Process exited
  with status code: -9", e.g. after the OOM killer) or because the `wis2-warm` worker's engine
  failed (e.g. the Prefect API away for longer than the client's retries) in the last hour is
  stranded too: Prefect retries never cover Crashed;
- a run that ended Failed because a service it needs was unavailable (a Failed state named
  `Unavailable`: `chain.failures` tells those failures from the event's own) in the last hour,
  `unavailable_delay` seconds after it failed: the same events run again, and their caches and
  ids make the rerun publish what was missing and nothing twice.

Each stranded run is proposed a Scheduled state named `Recovering` (server orchestration rules
apply: never forced), whose message names the dead worker. A run that was already rescheduled
and taken again `max_retries` times (counted in its state history) is proposed Failed instead,
with a `failed-...` artifact naming its event(s): a run that keeps killing its worker is not
retried forever. The `wis2-warm` worker runs this every `interval` seconds while it polls its pool;
with Prefect's `process` worker, run `wis2-chain recover --pool <pool> --watch` alongside.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from chain.failures import UNAVAILABLE
from worker.api_outages import ApiOutages, LookOutages

if TYPE_CHECKING:
    from uuid import UUID

    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import FlowRun, Worker

log = logging.getLogger(__name__)

WORKER_LABEL = "prefect.worker.name"  # set by BaseWorker._give_worker_labels_to_flow_run
RECOVERING = "Recovering"  # name of the Scheduled state given to a rescheduled run
HEARTBEAT_MULTIPLE = 3  # Prefect's foreman: offline after 3 missed heartbeats
# Crashed state messages of a flow-run process that died (runner's state proposer, BaseWorker)
ENGINE_ERROR = "engine error in the wis2-warm worker"  # worker/warm.py: its Crashed message
PROCESS_DIED = ("Process exited with status code", "Flow run infrastructure exited with non-zero",
                ENGINE_ERROR)
CRASHED_LOOKBACK = timedelta(hours=1)  # older Crashed runs are left to the operator


class RecoverySettings(BaseSettings):
    """`WIS2_RECOVERY_*`: how stranded runs are found and how often they are retried."""

    model_config = SettingsConfigDict(env_prefix="WIS2_RECOVERY_", env_file=".env",
                                      extra="ignore")

    enabled: bool = Field(default=True, description="Look for stranded runs at all")
    interval: float = Field(default=10.0, gt=0, description="Seconds between two looks")
    worker_timeout: float | None = Field(
        default=None, gt=0,
        description="Seconds without a heartbeat after which a worker is dead; default: 3 times "
        "the heartbeat interval it registered (PREFECT_WORKER_HEARTBEAT_SECONDS)")
    unclaimed_timeout: float = Field(
        default=45.0, gt=0, description="Seconds a Pending run without a worker label may wait")
    max_retries: int = Field(
        default=3, ge=0, description="Reschedules of one run; then it is marked Failed")
    outage_grace: float = Field(
        default=150.0, ge=0,
        description="Seconds after the Prefect API was last found unavailable during which no "
        "worker is judged dead by a missing heartbeat (a heartbeat sent during the outage waits "
        "in the client's retry backoff, up to 128 s with PREFECT_CLIENT_MAX_RETRIES=7)")
    unavailable_delay: float = Field(
        default=30.0, ge=0,
        description="Seconds after a run failed because a service was unavailable (a Failed "
        "state named Unavailable) before it is scheduled again")
    slow_call: float = Field(
        default=20.0, gt=0,
        description="Seconds after which a call to the Prefect API (a poll, a heartbeat, the "
        "recovery's own reads) counts as retried through an outage of the API, from then on "
        "while it is still waiting")
    crashed_grace: float = Field(
        default=30.0, ge=0,
        description="Seconds a Crashed run is left alone first: the process worker reports a "
        "dead process twice, the second time late, and would crash the rescheduled run again")


@dataclass(frozen=True)
class Recovered:
    """What was done to one stranded run."""

    flow_run_id: UUID
    name: str
    action: str  # "rescheduled" | "failed" | "skipped"
    reason: str


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def worker_is_dead(worker: Worker | None, settings: RecoverySettings, now: datetime,
                   outage_end: datetime | None = None) -> str | None:
    """Why `worker` counts as dead (None: alive). `outage_end`: when the API was last found
    unavailable; a silence counts from `outage_grace` seconds after it at the earliest."""
    if worker is None:
        return "is not registered in the pool any more"
    if worker.last_heartbeat_time is None:
        return "never sent a heartbeat"
    timeout = settings.worker_timeout or HEARTBEAT_MULTIPLE * (worker.heartbeat_interval_seconds
                                                               or 30)
    last = _aware(worker.last_heartbeat_time)
    if outage_end is not None and outage_end > last:  # a heartbeat may be in retry backoff
        last = outage_end + timedelta(seconds=settings.outage_grace)
    silent = (now - last).total_seconds()
    if silent > timeout:
        return f"sent no heartbeat for {silent:.0f} s (timeout {timeout:.0f} s)"
    return None


def stranded_reason(run: FlowRun, workers: dict[str, Worker], settings: RecoverySettings,
                    now: datetime, own_name: str | None = None,
                    own_runs: Collection[UUID] = (),
                    own_since: datetime | None = None,
                    outage_end: datetime | None = None,
                    own_ended: Collection[UUID] = ()) -> str | None:
    """Why the Pending/Running/Crashed `run` is stranded (None: leave it)."""
    state = run.state
    if state is not None and state.is_failed():
        age = now - _aware(state.timestamp)
        if (state.name == UNAVAILABLE and age < CRASHED_LOOKBACK
                and age.total_seconds() >= settings.unavailable_delay):
            return f"Failed, a service unavailable: {(state.message or '').splitlines()[0]}"
        return None
    if state is not None and state.is_crashed():
        message = state.message or ""
        age = now - _aware(state.timestamp)
        if (message.startswith(PROCESS_DIED) and age < CRASHED_LOOKBACK
                and age.total_seconds() >= settings.crashed_grace):
            return f"Crashed: {message.strip()}"
        return None
    if state is None or not (state.is_pending() or state.is_running()):
        return None
    if run.id in own_runs:  # this worker holds it (maybe not labelled yet)
        return None
    if run.id in own_ended:  # executed here, but its final state never reached the API
        return "its execution in this worker ended, but its final state did not reach the API"
    claimant = (run.labels or {}).get(WORKER_LABEL)
    if claimant is None:
        age = (now - _aware(state.timestamp)).total_seconds()
        if state.is_pending() and age > settings.unclaimed_timeout:
            return f"Pending for {age:.0f} s and claimed by no worker"
        return None  # a Running run without a label: cannot tell who runs it
    if own_name is not None and claimant == own_name:
        if own_since is not None and _aware(state.timestamp) >= own_since:
            return None  # since this worker started: another live worker of the same name
        return f"claimed by this worker ({own_name}) before it restarted"
    dead = worker_is_dead(workers.get(str(claimant)), settings, now, outage_end)
    return f"its worker {claimant} {dead}" if dead else None


def event_summaries(parameters: dict[str, Any]) -> list[dict[str, Any]]:
    """The event(s) a run was given (`event` or `events`), as received."""
    if isinstance(parameters.get("events"), list):
        return [e for e in parameters["events"] if isinstance(e, dict)]
    event = parameters.get("event")
    return [event] if isinstance(event, dict) else []


def _files(event: dict[str, Any]) -> list[str]:
    assets = (event.get("data") or {}).get("assets") or {}
    return sorted(str(a.get("href", k)).rsplit("/", 1)[-1] for k, a in assets.items()
                  if isinstance(a, dict))


def _artifact_key(name: str) -> str:
    key = re.sub(r"[^a-z0-9]+", "-", f"failed-{name}".lower()).strip("-")
    return key[:80].rstrip("-")


def failure_markdown(run: FlowRun, reason: str, attempts: int) -> str:
    """The failure report of a run given up on: why, and each event to replay."""
    events = event_summaries(run.parameters or {})
    lines = [
        f"# Given up after {attempts} recoveries",
        "",
        f"Each time this run was executing, its worker or process died without finishing it, or "
        f"a service it needs was unavailable; last: {reason}. It is not retried again "
        "(WIS2_RECOVERY_MAX_RETRIES).",
        "Look for what kills the worker (its log, `dmesg` for the OOM killer) or keeps the "
        "service away (docs/operating/outages.md), fix it, then replay each event with a custom "
        "run of `publish-notification/default` (`event`).",
        "",
        f"## {len(events)} event(s)",
        "",
    ]
    for event in events:
        lines += [f"### event `{event.get('id')}`: {', '.join(_files(event)) or 'no file'}", "",
                  "```json", json.dumps(event, indent=2, ensure_ascii=False, default=str), "```",
                  ""]
    return "\n".join(lines)


async def _recovery_count(client: PrefectClient, run: FlowRun) -> int:
    """Reschedules of `run` that a worker took (a `Recovering` state followed by Pending or
    Running). One followed by nothing but a late Crashed report of the former attempt does not
    count: the run did not run again."""
    states = sorted(await client.read_flow_run_states(run.id), key=lambda s: s.timestamp)
    count, rescheduled = 0, False
    for state in states:
        if state.name == RECOVERING and state.is_scheduled():
            rescheduled = True
        elif rescheduled and (state.is_pending() or state.is_running()):
            count, rescheduled = count + 1, False
    return count


async def _reschedule(client: PrefectClient, run: FlowRun, reason: str,
                      settings: RecoverySettings) -> Recovered:
    from prefect.client.schemas.actions import ArtifactCreate
    from prefect.states import Failed, Scheduled

    done = await _recovery_count(client, run)
    events = ", ".join(f"{e.get('id')}" for e in event_summaries(run.parameters or {}))
    if done >= settings.max_retries:
        message = (f"Failed after {done} recoveries: {reason}; not retried again "
                   f"(events: {events or 'none'})")[:2000]
        result = await client.set_flow_run_state(run.id, Failed(message=message))
        if result.status.value == "ACCEPT":
            await client.create_artifact(ArtifactCreate(
                key=_artifact_key(run.name), type="markdown", flow_run_id=run.id,
                data=failure_markdown(run, reason, done),
                description=f"Given up after {done} recoveries: {reason}"[:500]))
            log.error("flow run %s (%s) failed: %s", run.name, run.id, message)
            return Recovered(run.id, run.name, "failed", message)
        return Recovered(run.id, run.name, "skipped", f"Failed refused: {result.details}")
    message = (f"Rescheduled (recovery {done + 1} of {settings.max_retries}): "
               f"{reason}")[:2000]
    result = await client.set_flow_run_state(
        run.id, Scheduled(name=RECOVERING, scheduled_time=_now(), message=message))
    if result.status.value != "ACCEPT":
        return Recovered(run.id, run.name, "skipped", f"Scheduled refused: {result.details}")
    log.info("flow run %s (%s) was %s: %s", run.name, run.id, run.state.name, message)
    return Recovered(run.id, run.name, "rescheduled", message)


async def recover_pool(client: PrefectClient, pool: str, settings: RecoverySettings,
                       own_name: str | None = None,
                       own_runs: Callable[[], Collection[UUID]] = frozenset,
                       own_since: datetime | None = None,
                       outage_end: Callable[[], datetime | None] = lambda: None,
                       own_ended: Callable[[], Collection[UUID]] = frozenset
                       ) -> list[Recovered]:
    """Reschedule (or fail, past `max_retries`) the stranded runs of `pool`, once.

    `outage_end()`: when the API was last found unavailable, asked at each decision, the
    look's own slow reads counting too (`worker.api_outages.LookOutages`)."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterEndTime,
        FlowRunFilterState,
        FlowRunFilterStateName,
        FlowRunFilterStateType,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import StateType

    look = LookOutages(settings.slow_call, outage_end)
    workers = {w.name: w for w in await client.read_workers_for_work_pool(pool)}
    runs: list[FlowRun] = []
    while True:
        page = await client.read_flow_runs(
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.PENDING, StateType.RUNNING]))),
            limit=200, offset=len(runs))
        runs += page
        if len(page) < 200:
            break
    runs += await client.read_flow_runs(
        work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CRASHED])),
            end_time=FlowRunFilterEndTime(after_=_now() - CRASHED_LOOKBACK)),
        limit=200)
    runs += await client.read_flow_runs(
        work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(name=FlowRunFilterStateName(any_=[UNAVAILABLE])),
            end_time=FlowRunFilterEndTime(after_=_now() - CRASHED_LOOKBACK)),
        limit=200)
    look.read()  # the reads above waited through an outage: no silence before now counts
    done: list[Recovered] = []
    for run in runs:
        if stranded_reason(run, workers, settings, _now(), own_name, own_runs(),
                           own_since, look.end(), own_ended()) is None:
            continue
        try:
            # read again: the run may have ended, or been claimed by this worker meanwhile
            started = time.monotonic()
            run = await client.read_flow_run(run.id)
            look.read(started)
            reason = stranded_reason(run, workers, settings, _now(), own_name, own_runs(),
                                     own_since, look.end(), own_ended())
            if reason is None:
                continue
            done.append(await _reschedule(client, run, reason, settings))
        except Exception as exc:  # next look will try again
            log.warning("cannot recover flow run %s (%s): %s", run.name, run.id, exc)
    return done


class PoolRecovery:
    """Looks for stranded runs of a pool at most every `settings.interval` seconds."""

    def __init__(self, pool: str, settings: RecoverySettings | None = None,
                 own_name: str | None = None,
                 own_runs: Callable[[], Collection[UUID]] = frozenset,
                 own_ended: Callable[[], Collection[UUID]] = frozenset) -> None:
        self.pool = pool
        self.own_ended = own_ended
        self.settings = settings or RecoverySettings()
        self.own_name = own_name
        self.own_runs = own_runs
        self.own_since = _now()  # runs claimed under own_name before this: a former process
        self.outages = ApiOutages(self.settings.slow_call)  # this process's calls to the API
        self._next = 0.0

    def saw_outage(self) -> None:
        """The API was found unavailable now: no worker is judged dead by a silence before,
        nor for `outage_grace` seconds after (`api_outages`)."""
        self.outages.saw()

    async def maybe_run(self, client: PrefectClient) -> list[Recovered]:
        """One look if the interval has passed (never raises: the next look tries again)."""
        if not self.settings.enabled or time.monotonic() < self._next:
            return []
        self._next = time.monotonic() + self.settings.interval
        try:
            with self.outages.call():  # a slow look was retried through an API outage
                return await recover_pool(client, self.pool, self.settings, self.own_name,
                                          self.own_runs, self.own_since, self.outages.end,
                                          self.own_ended)
        except Exception as exc:
            self.saw_outage()
            log.warning("looking for stranded flow runs of pool %s failed: %s", self.pool, exc)
            return []


async def watch(pool: str, settings: RecoverySettings, once: bool = False) -> None:
    """`wis2-chain recover`: look for stranded runs of `pool` every interval (or once)."""
    from prefect.client.orchestration import get_client

    recovery = PoolRecovery(pool, settings)
    async with get_client() as client:
        while True:
            for item in await recovery.maybe_run(client):
                if item.action == "rescheduled":  # (failed ones are logged as errors)
                    log.warning("rescheduled flow run %s (%s): %s", item.name, item.flow_run_id,
                                item.reason)
            if once:
                return
            await asyncio.sleep(max(0.0, recovery._next - time.monotonic()))


__all__ = ["RECOVERING", "PoolRecovery", "Recovered", "RecoverySettings", "recover_pool",
           "stranded_reason", "watch", "worker_is_dead"]
