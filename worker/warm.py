"""The `wis2-warm` worker: flow runs executed in the worker's own process, flow code kept imported.
Long because it is one worker class: the Prefect worker hooks it overrides (poll, heartbeat,
claim labels, run, states, riding out an unavailable API) share its state and belong together,
with its settings, job configuration and the /metrics of the flows it runs.

The standard `process` worker starts a Python interpreter per flow run (imports Prefect, pydantic,
the validators... ~3 CPU s and ~150-200 MB each). This worker imports each deployment's flow once
and runs every flow run in a thread of the worker process with Prefect's own engine
(`prefect.flow_engine.run_flow`), so a run costs only its own work.

    prefect work-pool create wis2-pool --type wis2-warm --overwrite
    prefect worker start --pool wis2-pool --type wis2-warm --limit 8

What it does differently from the `process` worker (by design, because runs share one process):

- **Flow code**: the deployment's entrypoint (e.g. `flows/publish_notification.py:...`) is
  resolved against the worker's project directory: `WIS2_PROJECT_DIR` of the *worker's*
  environment, else its working directory. The deployment's pull steps are not run (they would
  `chdir` the whole process). The flow is imported once per entrypoint and reused; if the
  entrypoint file changes (mtime) it is loaded again for the next runs. Other modules it imports
  are not reloaded: restart the worker after deploying new code.
- **Environment**: per-run environment variables from job variables (`env`) cannot be applied to
  a shared process; runs see the worker's own environment (and its `.env`). `WIS2_PROJECT_DIR`
  in the deployment's job variables is accepted and ignored.
- **Concurrency**: bounded by the worker's `--limit` (BaseWorker stops submitting when that many
  runs are in progress); without `--limit`, by `DEFAULT_THREADS` threads.
- **Isolation**: a failing or raising flow ends Failed/Crashed and never takes the worker down,
  but runs share memory, module state and the GIL (CPU-bound work of one run slows the others).
- **Cancellation** (best effort): a thread cannot be killed. A run cancelled while Running goes
  on until its current task ends; the server refuses to start its next tasks, and when the flow
  returns the worker marks it Cancelled. A worker stopped with SIGTERM/SIGINT waits for the runs
  in progress to finish.
- **Wake-up** (`worker/wakeup.py`): besides polling every PREFECT_WORKER_QUERY_SECONDS, the
  worker listens to the server's event stream and polls at once when a run is scheduled in its
  pool (`WIS2_WORKER_WAKEUP=false`: the poll alone); a lost stream only means the poll. While
  the stream is connected the regular poll runs every WIS2_WORKER_STREAM_POLL_SECONDS (10),
  and at a run's end after a poll that found more runs than free slots (a backlog).
- **Engine** (`worker/engine.py`): each run executes with Prefect's `run_flow`, on an API client
  kept open from one run to the next, and without Prefect's per-run suspension observer (no flow
  of the chain suspends itself; `WIS2_WORKER_SUSPENSION_OBSERVER=true` keeps it). A run goes from
  Pending to Running with no `Submitting` state in between, one PATCH of the run before its
  flow starts instead of three or four (`WIS2_WORKER_MERGE_RUN_PATCHES`). The deployments and
  flows it reads, and the server's default result storage, are kept
  `WIS2_WORKER_READ_CACHE_SECONDS` (30).
- **Recovery** (`worker/recovery.py`): while it polls its pool, the worker reschedules the runs
  stranded by a dead worker of the pool (Pending or Running, no heartbeat from their worker), and
  at start those it had claimed itself under the same `--name` before it was killed; a run
  rescheduled `WIS2_RECOVERY_MAX_RETRIES` times ends Failed instead.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import datetime
import importlib
import importlib.util
import inspect
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.to_thread
import httpx
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.responses import WorkerFlowRunResponse
from prefect.types._datetime import now
from prefect.workers.base import (
    BaseJobConfiguration,
    BaseVariables,
    BaseWorker,
    BaseWorkerResult,
)
from pydantic import Field, PrivateAttr
from pydantic_settings import BaseSettings, SettingsConfigDict

from chain.failures import is_infrastructure
from chain.metrics import FLOW_METRICS
from chain.retention import Housekeeper
from chain.settings import get_settings
from listener.observability import serve_metrics
from worker.engine import (
    ClientPool,
    ReadCache,
    flow_heartbeats,
    is_merged_pid_patch,
    keep_server_result_storage,
    plain_console_logs,
    results_paths_as_text,
    suspension_observer,
    walk_json_parameters,
    without_client_retries,
)
from worker.memory import MemoryReport
from worker.recovery import ENGINE_ERROR, PoolRecovery, Recovered
from worker.wakeup import PoolWakeup

if TYPE_CHECKING:
    from uuid import UUID

    from prefect.flows import Flow
    from prefect.states import State

log = logging.getLogger(__name__)

WORKER_TYPE = "wis2-warm"
DEFAULT_THREADS = 16  # flow runs at once when the worker is started without --limit
LABEL_QUICK_TRIES = 4  # tries of the run's worker labels without the client's retries,
LABEL_QUICK_DELAY = 0.05  # from this delay, doubling (then one with them)
RECHECK_DELAY = 0.25  # s: a wake-up poll that found no new run is tried once more after it
ENDED_KEPT = 1000  # runs remembered as executed here (recovery: own_ended)


class WarmWorkerSettings(BaseSettings):
    """Where the warm worker finds the flow code (`WIS2_PROJECT_DIR`, else its working dir)."""

    model_config = SettingsConfigDict(env_prefix="WIS2_", env_file=".env", extra="ignore")

    project_dir: Path | None = Field(
        default=None, description="Project directory the deployments' entrypoints are relative to"
    )
    worker_wakeup: bool = Field(
        default=True, description="Also listen to the server's event stream and poll at once "
        "when a run is scheduled in the pool (worker/wakeup.py); false: the poll alone")
    worker_stream_poll_seconds: float = Field(
        default=10.0, ge=0, description="While the event stream is connected (it wakes the "
        "worker for every run scheduled in its pool), the regular poll runs at most this often; "
        "a run's end polls at once when the last poll found more runs than free slots (a backlog). "
        "0: every PREFECT_WORKER_QUERY_SECONDS, as without the stream")
    worker_read_cache_seconds: float = Field(
        default=30.0, ge=0, description="Seconds the worker keeps the deployments, flows and "
        "default result storage it reads to submit runs (worker/engine.py); 0: read each time")
    worker_suspension_observer: bool = Field(
        default=False, description="Prefect's per-run observer of external suspension requests "
        "(a thread, a client and a websocket per run; worker/engine.py); off: no flow of the "
        "chain suspends")
    worker_flow_heartbeats: bool = Field(
        default=False, description="Prefect's flow-run heartbeats (a thread and an event per "
        "run, the run's end held up to 1 s; worker/engine.py); off: nothing of the node reads "
        "them (the recovery reads the worker's heartbeats)")
    worker_walk_json_parameters: bool = Field(
        default=False, description="Prefect's walk over every run's parameters for futures and "
        "states (worker/engine.py); off: skipped for JSON parameters, as a deployment run's are "
        "(it would find nothing)")
    worker_merge_run_patches: bool = Field(
        default=True, description="A run's start costs one PATCH of the run instead of three "
        "(its infrastructure pid written with the engine's, the engine's rename skipped when the "
        "run already has the name: worker/engine.py), and the worker's labels are set beside the "
        "run's start, not before it; false: Prefect's PATCHes, in Prefect's order")
    worker_results_paths_as_text: bool = Field(
        default=True, description="The results directory's paths formed as text, its base "
        "resolved once (worker/engine.py); false: Prefect's two realpaths per access")
    worker_plain_console_logs: bool = Field(
        default=True, description="The worker's console log lines written plain, same format "
        "(worker/engine.py); false: printed through Prefect's Rich console")
    worker_poll_limited: bool = Field(
        default=True, description="A poll asks for as many Scheduled runs as the worker has "
        "free slots (worker/warm.py `_poll_limit`); false: Prefect's poll (up to 200 runs, "
        "each with its parameters, whatever the free slots)")
    worker_memory_report_seconds: float = Field(
        default=0.0, ge=0, description="Log where the worker's memory grew (tracemalloc) this "
        "often (worker/memory.py); 0: off (it costs CPU and memory: to find a leak)")
    worker_metrics_port: int | None = Field(default=None, ge=0, le=65535, description="Port of "
        "the worker's /metrics (the flows' wis2_chain_*: they run in its process); unset: none")
    worker_metrics_host: str = Field(default="127.0.0.1", description="Its address")

    def resolved_project_dir(self) -> Path:
        return (self.project_dir or Path.cwd()).resolve()


class WarmJobConfiguration(BaseJobConfiguration):
    """The base job configuration (`env`, `labels`, `name`, `command`).

    Accepted for compatibility with the deployments' job variables (prefect.yaml passes
    `env.WIS2_PROJECT_DIR`), but not applied: the runs execute in the worker's process.
    `entrypoint` is taken from the deployment the worker reads to build this configuration, so
    running a flow costs no further API call for it."""

    _entrypoint: str | None = PrivateAttr(default=None)  # not a job variable

    def prepare_for_flow_run(self, flow_run: FlowRun, deployment: Any = None,
                             *args: Any, **kwargs: Any) -> None:
        super().prepare_for_flow_run(flow_run, deployment, *args, **kwargs)
        if deployment is not None:
            self._entrypoint = deployment.entrypoint

    @classmethod
    def _base_environment(cls) -> dict[str, str]:
        """Prefect's settings as environment variables for the run's infrastructure: none here
        (the run executes in this process, with its settings), so not computed for each run."""
        return {}

    @property
    def entrypoint(self) -> str | None:
        """The deployment's entrypoint, when the configuration was prepared for a flow run."""
        return self._entrypoint


class WarmVariables(BaseVariables):
    """Job variables of a `wis2-warm` pool: the base ones (only informative here)."""


class WarmWorkerResult(BaseWorkerResult):
    """Final state of a flow run executed in the worker's process (status 0: Completed)."""


class FlowLoadError(RuntimeError):
    """The deployment's flow could not be imported."""


@dataclass(frozen=True)
class _Loaded:
    flow: Flow[..., Any]
    mtime: float


class FlowCache:
    """Flows imported once per entrypoint (reloaded when the entrypoint file's mtime changes)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flows: dict[str, _Loaded] = {}

    def get(self, entrypoint: str, project_dir: Path) -> Flow[..., Any]:
        if ":" not in entrypoint:  # a module path `package.module.flow_function`
            key, path, func = entrypoint, None, ""
        else:
            file_part, func = entrypoint.rsplit(":", 1)
            path = (project_dir / file_part).resolve()
            key = f"{path}:{func}"
        try:
            mtime = path.stat().st_mtime if path is not None else 0.0
        except OSError as exc:
            raise FlowLoadError(
                f"entrypoint {entrypoint!r}: {path} not found (project directory {project_dir}; "
                "set WIS2_PROJECT_DIR or start the worker from the project directory)"
            ) from exc
        with self._lock:  # one import at a time; runs of an already loaded flow do not wait
            loaded = self._flows.get(key)
            if loaded is not None and loaded.mtime == mtime:
                return loaded.flow
            log.info("loading flow %s (project %s)", entrypoint, project_dir)
            try:
                flow = _import_flow(entrypoint, path, func, project_dir, fresh=loaded is not None)
            except Exception as exc:
                raise FlowLoadError(
                    f"cannot load flow {entrypoint!r}: {type(exc).__name__}: {exc}"
                ) from exc
            self._flows[key] = _Loaded(flow, mtime)
            return flow


def _import_flow(entrypoint: str, path: Path | None, func: str, project_dir: Path,
                 fresh: bool) -> Flow[..., Any]:
    """Import the flow as its package module when the file is the installed one (no second copy,
    no sys.path change); otherwise, or when `fresh`, as a script like Prefect does."""
    from prefect.flows import Flow, load_flow_from_entrypoint

    if path is None:
        return load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)
    if not fresh and path.is_relative_to(project_dir) and "." not in func:
        module_name = ".".join(path.relative_to(project_dir).with_suffix("").parts)
        try:
            spec = importlib.util.find_spec(module_name)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.origin and Path(spec.origin).resolve() == path:
            obj = getattr(importlib.import_module(module_name), func)
            if not isinstance(obj, Flow):
                raise TypeError(f"{func!r} in {path} is not a flow (decorate it with @flow)")
            return obj
    return load_flow_from_entrypoint(f"{path}:{func}", use_placeholder_flow=False)


class WarmWorker(BaseWorker[WarmJobConfiguration, WarmVariables, WarmWorkerResult]):
    """Runs flow runs in threads of the worker process, with their flows imported once."""

    type = WORKER_TYPE
    job_configuration = WarmJobConfiguration
    job_configuration_variables = WarmVariables

    _description = (
        "wis2-chain: execute flow runs in the worker's own process (threads, flow code imported "
        "once; no per-run environment, no pull steps). Bound it with --limit."
    )
    _display_name = "WIS2 warm (in-process)"
    _documentation_url = "https://docs.prefect.io/v3/concepts/workers"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._flows = FlowCache()
        settings = WarmWorkerSettings()
        self._pid = str(os.getpid())  # the "infrastructure" of every run of this worker
        self._merge_patches = settings.worker_merge_run_patches
        self._clients = ClientPool(self._pid if self._merge_patches else None)
        self._threads = anyio.CapacityLimiter(self._limit or DEFAULT_THREADS)
        self._project_dir = settings.resolved_project_dir()
        suspension_observer(settings.worker_suspension_observer)
        flow_heartbeats(settings.worker_flow_heartbeats)
        walk_json_parameters(settings.worker_walk_json_parameters)
        results_paths_as_text(settings.worker_results_paths_as_text)
        plain_console_logs(settings.worker_plain_console_logs)
        self._poll_limited = settings.worker_poll_limited
        self._reads = ReadCache(settings.worker_read_cache_seconds)
        keep_server_result_storage(settings.worker_read_cache_seconds)
        self._wakeup = PoolWakeup(self._work_pool_name, self._on_scheduled, self._logger) \
            if settings.worker_wakeup else None
        self._wake = asyncio.Event()
        self._stream_poll_seconds = settings.worker_stream_poll_seconds
        self._last_poll = -math.inf  # time.monotonic() of the last poll's answer
        self._more_waiting = False  # the last poll found more runs than free slots
        self._last_new = 0  # runs new to this worker in the last poll's answer
        self._announced = False  # the stream announced a run since the last wake-up poll
        self._background: list[asyncio.Task[None]] = []
        self._labelling: set[asyncio.Task[None]] = set()  # labels set beside runs' starts
        self._executing: set[UUID] = set()  # runs this process is executing (recovery skips)
        # runs whose execution here ended (the last ENDED_KEPT): one still Pending or Running
        # on the server never got its final state there (recovery reclaims it)
        self._ended: collections.deque[UUID] = collections.deque(maxlen=ENDED_KEPT)
        self._metrics: Any = None  # the /metrics server (setup)
        self._recovery = PoolRecovery(self._work_pool_name, own_name=self.name,
                                      own_runs=self._own_runs, own_ended=lambda: self._ended)
        if self._limit is None:
            log.warning("wis2-warm worker started without --limit: at most %d flow runs at once",
                        DEFAULT_THREADS)

    async def setup(self) -> None:
        await super().setup()
        self._reads.install(self.client)
        if self._merge_patches:
            self._skip_merged_pid_patches()
        settings = WarmWorkerSettings()
        self._metrics = serve_metrics(settings.worker_metrics_host, settings.worker_metrics_port,
                                      FLOW_METRICS, "wis2-warm")
        if self._wakeup is not None:
            self._background = [asyncio.create_task(self._wakeup.run()),
                                asyncio.create_task(self._poll_on_wake())]
        if settings.worker_memory_report_seconds > 0:
            self._background.append(asyncio.create_task(
                MemoryReport(logger=self._logger).run(settings.worker_memory_report_seconds)))
        # Results retention (chain/retention.py): this host's results, every hour by default.
        self._background.append(asyncio.create_task(Housekeeper(get_settings()).run()))

    async def teardown(self, *exc_info: Any) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._background = []
        await asyncio.gather(*self._labelling, return_exceptions=True)  # short: let them end
        if self._metrics is not None:
            self._metrics.stop()
        await super().teardown(*exc_info)
        self._clients.close()

    def _skip_merged_pid_patches(self) -> None:
        """Prefect's worker writes a started run's `infrastructure_pid` in a PATCH of its own;
        the runs this worker executes have it written by their engine's PATCH
        (`MergedPatches`): that PATCH is skipped."""
        update = self.client.update_flow_run

        async def update_flow_run(*args: Any, **kwargs: Any) -> Any:
            if not args and is_merged_pid_patch(kwargs, self._pid) \
                    and kwargs["flow_run_id"] in self._executing:
                return None
            return await update(*args, **kwargs)

        self.client.update_flow_run = update_flow_run  # type: ignore[method-assign]

    def _on_scheduled(self, flow_run_resource: str) -> None:
        log.debug("event stream: %s scheduled in pool %s", flow_run_resource or "(connected)",
                  self._work_pool_name)
        if flow_run_resource:
            self._announced = True
        self._wake.set()

    async def _poll_on_wake(self) -> None:
        """Poll as soon as the event stream says a run was scheduled (several events during one
        poll: one more poll), once a run slot is free (a slot freed by a run's end is filled at
        once while runs are being scheduled). The recovery stays with the regular poll."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            announced, self._announced = self._announced, False
            while self._limiter is not None and self._limiter.available_tokens < 1:
                await asyncio.sleep(0.05)
            try:
                await super().get_and_submit_flow_runs()
                if announced and not self._last_new and not self._wake.is_set():
                    # an event may reach the worker before the run's creation is committed:
                    # once more shortly, rather than at the next regular poll
                    await asyncio.sleep(RECHECK_DELAY)
                    await super().get_and_submit_flow_runs()
            except Exception as exc:  # the regular poll goes on and reports its own errors
                log.debug("poll on event failed: %s", exc, exc_info=True)

    async def run(
        self,
        flow_run: FlowRun,
        configuration: WarmJobConfiguration,
        task_status: anyio.abc.TaskStatus[int] | None = None,
    ) -> WarmWorkerResult:
        run_logger = self.get_flow_run_logger(flow_run)
        identifier = self._pid
        ignored = sorted(k for k, v in (configuration.env or {}).items()
                         if os.environ.get(k) != v and not k.startswith("PREFECT__"))
        if ignored:
            run_logger.debug("wis2-warm runs in the worker's environment; job variables env not "
                             "applied: %s", ", ".join(ignored))
        self._executing.add(flow_run.id)  # before started(): never seen as stranded
        if task_status is not None:
            task_status.started(os.getpid())  # the run's "infrastructure" is this process

        try:
            return await self._run(flow_run, configuration, run_logger, identifier)
        finally:
            self._ended.append(flow_run.id)
            self._executing.discard(flow_run.id)
            if self._more_waiting:  # a backlog: fill the slot now, not at the next poll
                self._wake.set()

    async def _run(self, flow_run: FlowRun, configuration: WarmJobConfiguration,
                   run_logger: Any, identifier: str) -> WarmWorkerResult:
        try:
            entrypoint = self._entrypoint(flow_run, configuration)
            context = contextvars.copy_context()  # settings/profile of the worker for the thread
            state = await anyio.to_thread.run_sync(
                context.run, self._execute, flow_run, entrypoint, limiter=self._threads)
        except FlowLoadError as exc:
            run_logger.error("%s", exc, exc_info=exc.__cause__ or exc)
            await self._propose_crashed_state(flow_run, str(exc))
            return WarmWorkerResult(identifier=identifier, status_code=1)
        except Exception as exc:
            run_logger.exception("flow run %s ended with an engine error", flow_run.id)
            await self._propose_crashed_state(
                flow_run, f"{ENGINE_ERROR}: {type(exc).__name__}: {exc}")
            return WarmWorkerResult(identifier=identifier, status_code=1)

        # A Completed state was accepted by the server, so the run was not being cancelled.
        ok = state.is_completed() or await self._finish_cancelling(flow_run)
        return WarmWorkerResult(identifier=identifier, status_code=0 if ok else 1)

    def _own_runs(self) -> set[UUID]:
        """Runs this worker holds: being submitted (claimed) or executing."""
        return self._executing | set(self._submitting_flow_run_ids)

    async def get_and_submit_flow_runs(self) -> list[FlowRun]:
        """Before each poll (at most every WIS2_RECOVERY_INTERVAL): reschedule stranded runs.
        A poll that fails because the API is unavailable (`chain.failures`) is reported and
        tried again at the next interval: Prefect's service loop would back off and, after
        about a minute of failures, end the worker (a Prefect server whose database or
        messaging restarts); the runs this worker executes go on meanwhile."""
        if self._client is not None:
            recovered: list[Recovered] = await self._recovery.maybe_run(self.client)
            for item in recovered:
                self._logger.warning("recovery: %s flow run %s (%s): %s", item.action,
                                     item.name, item.flow_run_id, item.reason)
        # a poll or heartbeat waiting over WIS2_RECOVERY_SLOW_CALL s is in the client's retries:
        # the API is unavailable (for the other workers' heartbeats too), seen by the recovery
        # from then on (`worker.api_outages`)
        if self._stream_polls():
            return []
        try:
            with self._recovery.outages.call():
                return await super().get_and_submit_flow_runs()
        except Exception as exc:
            if not is_infrastructure(exc):
                raise
            self._api_unavailable("polling the pool", exc)
            return []

    def _stream_polls(self) -> bool:
        """Whether the regular poll is left out this time: the event stream is connected (it
        wakes the worker for each run scheduled in the pool), the last poll was less than
        WIS2_WORKER_STREAM_POLL_SECONDS ago, and no run it found is left waiting for a free slot
        (a run's end polls then: `_polled`). The poll every PREFECT_WORKER_QUERY_SECONDS cost
        the server a request (and the pool's `last_polled` write) per second, most of them
        finding nothing; it stays the fallback for what the stream does not announce: runs that
        become due later (a retry's delay, a schedule), an event lost with a reconnection."""
        return (self._wakeup is not None and self._wakeup.connected.is_set()
                and not self._more_waiting
                and time.monotonic() - self._last_poll < self._stream_poll_seconds)

    def _poll_limit(self) -> int | None:
        """Runs one poll asks for: the free run slots, plus the runs still being submitted
        (claimed here, perhaps not yet Pending on the server, so returned again and skipped);
        at least 1 (a poll also tells the server the pool's queues are polled). None without
        `--limit` or with WIS2_WORKER_POLL_LIMITED=false: Prefect's default (the API's limit,
        200)."""
        if self._limiter is None or not self._poll_limited:
            return None
        return max(1, int(self._limiter.available_tokens) + len(self._submitting_flow_run_ids))

    async def _get_scheduled_flow_runs(self) -> list[WorkerFlowRunResponse]:
        """Prefect's poll without a limit returns up to 200 Scheduled runs, each with its
        parameters (a batch run of 50 events: ~65 kB), and the worker submits only as many as it
        has free slots: under a backlog every poll moved megabytes of JSON that the server
        serialised and the worker parsed, to start one or two runs. This poll asks for what can
        be submitted (`_poll_limit`), highest-priority queue first as Prefect's."""
        limit = self._poll_limit()
        if limit is None:
            runs = await super()._get_scheduled_flow_runs()
            self._polled(runs, limit)
            return runs

        scheduled_before = now("UTC") + datetime.timedelta(seconds=int(self._prefetch_seconds))
        body: dict[str, Any] = {"scheduled_before": str(scheduled_before), "limit": limit,
                                "work_queue_names": list(self._work_queues)}
        try:
            response = await self.client.request(
                "POST", "/work_pools/{name}/get_scheduled_flow_runs",
                path_params={"name": self._work_pool_name}, json=body)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 404:  # the pool is created at the next heartbeat
                return []
            raise
        runs = WorkerFlowRunResponse.model_validate_list(response.json())
        self._polled(runs, limit)
        return runs

    def _polled(self, runs: list[WorkerFlowRunResponse], limit: int | None) -> None:
        """What a poll's answer says (before its runs are submitted): how many runs are new
        (not being submitted already), and whether more may wait in the pool than the worker
        takes now (the server cut its answer at the limit, or it returned more new runs than
        free slots: a run's end polls again)."""
        self._last_poll = time.monotonic()
        self._last_new = sum(1 for r in runs if r.flow_run.id not in self._submitting_flow_run_ids)
        free = None if self._limiter is None else int(self._limiter.available_tokens)
        self._more_waiting = (limit is not None and len(runs) >= limit) or (
            free is not None and self._last_new > free)

    async def _sync_and_initialize(self) -> None:
        """The heartbeat (and pool sync): once the worker has synced, an unavailable API is
        reported and tried again at the next heartbeat instead of backing off to an exit."""
        try:
            with self._recovery.outages.call():
                await super()._sync_and_initialize()
        except Exception as exc:
            if not self._has_successfully_synced or not is_infrastructure(exc):
                raise
            self._api_unavailable("sending the heartbeat", exc)

    def _api_unavailable(self, doing: str, exc: BaseException) -> None:
        self._recovery.saw_outage()
        self._logger.warning("%s failed, the Prefect API is unavailable (%s): tried again",
                             doing, str(exc).splitlines()[0][:300])

    async def _propose_submitting_state(self, flow_run: FlowRun) -> None:
        """No `Submitting` state: the run starts in this process at once (Pending -> Running).
        Prefect's worker proposes it while infrastructure is being provisioned; here it would
        cost an orchestrated state change and an event per run, and tell the operator nothing."""

    async def _give_worker_labels_to_flow_run(self, flow_run_id: UUID) -> None:
        """The worker's labels tell the recovery which worker holds the run (a Pending run
        without them is only recovered after WIS2_RECOVERY_UNCLAIMED_TIMEOUT). Nothing of the
        run's start needs them (its Pending state claimed it): with WIS2_WORKER_MERGE_RUN_PATCHES
        they are set beside it, not before it (a PATCH less before the flow starts)."""
        if not self._merge_patches:
            await self._set_worker_labels(flow_run_id)
            return
        task = asyncio.create_task(self._set_worker_labels(flow_run_id))
        self._labelling.add(task)
        task.add_done_callback(self._labelling.discard)

    async def _set_worker_labels(self, flow_run_id: UUID) -> None:
        """Prefect's labels PATCH.

        Tried quickly first, without the client's retries: on SQLite the PATCH (a read, then a
        write) is answered 503 whenever another transaction wrote in between, and the client's
        first retry comes 2 s later, which was most of a steady event's latency there. Then with
        them (an API restarting); an API still too busy to store them must not crash a run
        that can go on."""
        for attempt in range(LABEL_QUICK_TRIES + 1):
            quick = attempt < LABEL_QUICK_TRIES
            try:
                with without_client_retries() if quick else contextlib.nullcontext():
                    await super()._give_worker_labels_to_flow_run(flow_run_id)
                return
            except Exception as exc:
                if attempt == LABEL_QUICK_TRIES:
                    log.warning("flow run %s: worker labels not set: %s", flow_run_id, exc)
                    return
                await anyio.sleep(LABEL_QUICK_DELAY * 2 ** attempt)

    @staticmethod
    def _entrypoint(flow_run: FlowRun, configuration: WarmJobConfiguration) -> str:
        """The entrypoint of the run's deployment, read when its job configuration was built."""
        if flow_run.deployment_id is None:
            raise FlowLoadError("flow run has no deployment: the wis2-warm worker runs "
                                "deployments only")
        if not configuration.entrypoint:
            raise FlowLoadError(f"deployment {flow_run.deployment_id} has no entrypoint")
        return configuration.entrypoint

    def _execute(self, flow_run: FlowRun, entrypoint: str) -> State:
        """In a worker thread: load (cached) and run the flow with Prefect's engine, on a pooled
        API client. `flow_run` as polled: the engine reads it again before it starts the flow."""
        from prefect.flow_engine import run_flow
        from prefect.logging.loggers import flow_run_logger

        flow = self._flows.get(entrypoint, self._project_dir)
        with self._clients.client_context(flow_run):
            state = run_flow(flow, flow_run=flow_run, return_type="state",
                             error_logger=flow_run_logger(flow_run=flow_run))
        if inspect.isawaitable(state):  # an async flow: its own event loop in this thread
            state = asyncio.run(_await(state))
        return state  # type: ignore[return-value]

    async def _finish_cancelling(self, flow_run: FlowRun) -> bool:
        """A run cancelled while its thread ran stays Cancelling: mark it Cancelled (True)."""
        try:
            current = await self.client.read_flow_run(flow_run.id)
        except Exception:
            log.debug("cannot read flow run %s after its end", flow_run.id, exc_info=True)
            return False
        if current.state is None or not (current.state.is_cancelling()
                                         or current.state.is_cancelled()):
            return False
        if current.state.is_cancelling():
            await self._mark_flow_run_as_cancelled(
                current, state_updates={"message": "Cancelled: the run's thread has returned."})
        return True


async def _await(awaitable: Any) -> Any:
    return await awaitable
