"""How the `wis2-warm` worker runs a flow run in one of its threads: Prefect's engine (`run_flow`),
with what a run in a long-lived process does not need to pay for again each time.

Prefect 3.9's engine is written for one run per process. Run after run in one process, it would:

- **open a new API client for each run** (the engine's `SyncClientContext`): an httpx client
  whose TLS context loads the CA bundle, ~20 ms of CPU even for an `http://` API, before the
  first request. `ClientPool` keeps the clients of finished runs open and gives one to the next
  run (one run at a time per client); they are closed when the worker stops.
- **watch each deployment run for an external suspension** (`observe_flow_run_suspension`): a
  thread, an event loop, a third API client, a read of the run and a websocket subscription to
  the server's event stream, all set up before the flow may start, then a poll every 10 s. No
  flow of this chain suspends itself or can be resumed meaningfully half-way (its steps are
  cached and claimed; cancel a run, or let it finish), so the worker turns this observer off
  (`suspension_observer(False)`); `WIS2_WORKER_SUSPENSION_OBSERVER=true` keeps Prefect's.
- **send the flow run's heartbeats** (`PREFECT_FLOWS_HEARTBEAT_FREQUENCY`, 180 s by default, no
  way to turn them off): a thread per run, a `prefect.flow-run.heartbeat` event at its start
  (a row of the events table and one per related resource), and at the run's end the engine
  waits for that thread, which sleeps in steps of 1 s: each run held its worker slot for about
  half a second more. Those events only serve automations that detect a run which stopped
  beating; the node runs no automation (its triggers service is off) and the worker's recovery
  finds the runs of a dead worker by the worker's own heartbeats (worker/recovery.py). The
  worker turns them off (`flow_heartbeats(False)`); `WIS2_WORKER_FLOW_HEARTBEATS=true` keeps
  Prefect's.
- **read the run's deployment twice and its flow once** before each run (Prefect's worker checks
  the deployment still exists, then builds the job configuration from it and the flow).
  `ReadCache` (`WIS2_WORKER_READ_CACHE_SECONDS`, 30 s; 0: off) keeps what the worker read for that
  long (a flow, whose name never changes, for good): an edited or deleted deployment is seen by
  the runs submitted after that delay.
- **walk each run's parameters for futures and states** (`FlowRunEngine._resolve_parameters`,
  Prefect's `visit_collection` over every nested value, each visit a Python call with its
  context): a batch run's 50 events were a sixth of the worker's CPU in a burst, to find
  nothing, since a deployment run's parameters come from the API as JSON, which holds no
  future, state or annotation. `walk_json_parameters(False)` checks in one plain loop that
  they are JSON data (dicts with string keys, lists, strings, numbers, booleans, null, of
  exactly those types) and then skips the walk, which would have returned them unchanged; any
  other value (a subflow called with Python objects) is walked as by Prefect.
  `WIS2_WORKER_WALK_JSON_PARAMETERS=true` keeps Prefect's walk for every run.
- **PATCH each run three times as it starts**: Prefect's worker writes the run's
  `infrastructure_pid`, the engine its flow version and retry policy, then its name (the
  flow's `flow_run_name`). `MergedPatches` writes the pid with the engine's PATCH and skips
  the rename when the run already has that name (the listener names its runs at creation), so
  one PATCH is left of three for the listener's runs; `WIS2_WORKER_MERGE_RUN_PATCHES=false`
  keeps Prefect's.
- **resolve every path of the results directory with the file system** (Prefect's
  `LocalFileSystem._resolve_path`: two `realpath`s a call, several calls per cached task): the
  single-event tasks' took 15 ms of a steady run. `results_paths_as_text` forms them as
  `flows.tasks.cache_store.ResultsDirectory` does (the base resolved once; symbolic links inside
  the results directory not followed: the chain makes none); `WIS2_WORKER_RESULTS_PATHS_AS_TEXT=
  false` keeps Prefect's.
- **print each log line through a Rich console** (Prefect's console handler: ~1.5 ms a line, 25
  ms of a steady run). `plain_console_logs` writes them as a plain stream handler, same format
  and stream; `WIS2_WORKER_PLAIN_CONSOLE_LOGS=false` keeps Rich's.
- **read the server's default result storage** (`GET /admin/storage`) three times per run
  (Prefect's result stores look it up whenever a flow or task needs its default storage):
  `keep_server_result_storage` keeps the answer for `WIS2_WORKER_READ_CACHE_SECONDS` too (a
  failed read is not kept: Prefect's local default, as without it).

Measured side by side in `bench/RESULTS.md` (the per-run API requests, CPU and latency).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from uuid import UUID

from chain.expiring import MISSING, Expiring

log = logging.getLogger(__name__)


class ClientPool:
    """Prefect sync API clients kept open between runs; each run takes one, gives it back.
    With `infrastructure_pid`, each client merges the run's PATCHes (`MergedPatches`)."""

    def __init__(self, infrastructure_pid: str | None = None) -> None:
        self._lock = threading.Lock()
        self._free: list[Any] = []  # prefect.context.SyncClientContext, client open
        self._closed = False
        self._pid = infrastructure_pid
        self._patches: dict[int, MergedPatches] = {}  # by id() of a client context

    @contextlib.contextmanager
    def client_context(self, flow_run: Any = None) -> Iterator[Any]:
        """A `SyncClientContext` current for the block (the engine's `get_or_create` finds it
        and neither opens nor closes a client), for `flow_run`; a client that failed is not
        reused."""
        from prefect.context import SyncClientContext

        with self._lock:
            ctx = self._free.pop() if self._free else None
        if ctx is None:
            ctx = SyncClientContext()  # the settings of the calling context (the worker's)
            ctx.client.__enter__()
            if self._pid is not None:
                self._patches[id(ctx)] = MergedPatches(ctx.client, self._pid)
        if flow_run is not None and id(ctx) in self._patches:
            self._patches[id(ctx)].running(flow_run)
        token = SyncClientContext.__var__.set(ctx)
        healthy = False
        try:
            yield ctx
            healthy = True
        finally:
            SyncClientContext.__var__.reset(token)
            with self._lock:
                keep = healthy and not self._closed
                if keep:
                    self._free.append(ctx)
                else:
                    self._patches.pop(id(ctx), None)
            if not keep:
                _close(ctx)

    def close(self) -> None:
        """Close the idle clients; a client in use is closed when its run gives it back."""
        with self._lock:
            self._closed = True
            free, self._free = self._free, []
            self._patches.clear()
        for ctx in free:
            _close(ctx)


class MergedPatches:
    """Spares a run two of the PATCHes its start costs, on `client` (a sync API client that
    serves one run at a time): the engine's write of the run's flow version and retry policy
    carries the run's `infrastructure_pid` too (Prefect's worker writes it in a PATCH of its
    own, which `is_merged_pid_patch` then recognises), and the engine's rename of the run is
    skipped when the run, as the worker polled it (`running`) or the engine read it, already
    has that name (the listener names its runs at creation as their flows do:
    `chain/deployments.py`). Any other call goes through unchanged."""

    def __init__(self, client: Any, infrastructure_pid: str) -> None:
        self._pid = infrastructure_pid
        self._names: dict[Any, str] = {}  # the run this client serves: its name
        self._read, self._update = client.read_flow_run, client.update_flow_run
        self._rename = client.set_flow_run_name
        client.read_flow_run = self.read_flow_run
        client.update_flow_run = self.update_flow_run
        client.set_flow_run_name = self.set_flow_run_name

    def running(self, flow_run: Any) -> None:
        """The client now serves `flow_run` (as polled: its name)."""
        self._names = {flow_run.id: flow_run.name}

    def read_flow_run(self, flow_run_id: Any, *args: Any, **kwargs: Any) -> Any:
        run = self._read(flow_run_id, *args, **kwargs)
        self._names = {flow_run_id: run.name}
        return run

    def update_flow_run(self, *args: Any, **kwargs: Any) -> Any:
        if not args and kwargs.keys() == _ENGINE_PATCH:
            kwargs["infrastructure_pid"] = self._pid
        return self._update(*args, **kwargs)

    def set_flow_run_name(self, flow_run_id: Any, name: str) -> Any:
        if self._names.get(flow_run_id) == name:
            log.debug("flow run %s already named %r: not renamed", flow_run_id, name)
            return None
        return self._rename(flow_run_id, name)


# the engine's PATCH of a run it starts (`FlowRunEngine.initialize_run`), by keyword
_ENGINE_PATCH = frozenset({"flow_run_id", "flow_version", "empirical_policy"})


def is_merged_pid_patch(kwargs: dict[str, Any], infrastructure_pid: str) -> bool:
    """Whether a worker's `update_flow_run(**kwargs)` is Prefect's worker writing the run's
    `infrastructure_pid` alone, as the engine's merged PATCH does (`MergedPatches`)."""
    return kwargs.keys() == {"flow_run_id", "infrastructure_pid"} \
        and kwargs["infrastructure_pid"] == infrastructure_pid


def _close(ctx: Any) -> None:
    try:
        ctx.client.__exit__(None, None, None)
    except Exception as exc:  # already broken: nothing to release
        log.debug("closing a Prefect client: %s", exc)


_PREFECTS: dict[str, Any] = {}  # Prefect's own functions this module replaced, by name


def _replace_in_prefect(name: str, enabled: bool, off: Any,
                        module: str = "prefect.flow_engine") -> None:
    """Prefect's own `<module>.<name>` when `enabled`, else `off` in its place, for this
    process; `name` may be dotted (`FlowRunEngine._resolve_parameters`: a method)."""
    import importlib

    *path, attribute = name.split(".")
    owner = functools.reduce(getattr, path, importlib.import_module(module))
    _PREFECTS.setdefault(name, getattr(owner, attribute))
    setattr(owner, attribute, _PREFECTS[name] if enabled else off)


@contextlib.contextmanager
def _no_suspension_observer(flow_run_id: Any, suspension_request: Any,
                            polling_interval: float = 10) -> Iterator[None]:
    yield


def suspension_observer(enabled: bool) -> None:
    """Turn Prefect's per-run suspension observer on or off for the flow runs of this process."""
    _replace_in_prefect("observe_flow_run_suspension", enabled, _no_suspension_observer)


@contextlib.contextmanager
def _no_heartbeats(engine: Any, join_on_exit: bool = True) -> Iterator[None]:
    yield


def flow_heartbeats(enabled: bool) -> None:
    """Turn Prefect's flow-run heartbeats on or off for the flow runs of this process."""
    _replace_in_prefect("_send_heartbeats", enabled, _no_heartbeats)


_JSON_SCALARS = frozenset({str, int, float, bool, type(None)})
_RESOLVE_PARAMETERS = "FlowRunEngine._resolve_parameters"


def is_json_data(value: Any) -> bool:
    """Whether `value` is JSON data: dicts with string keys, lists, strings, numbers, booleans
    and None, of exactly those types (no subclass, no tuple: Prefect's annotations are tuples),
    each container once (as parsed from JSON; a container met twice, perhaps inside itself, is
    left to Prefect's walk)."""
    stack, seen = [value], set()
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is dict or kind is list:
            if id(item) in seen:
                return False
            seen.add(id(item))
            if kind is dict:
                if any(type(key) is not str for key in item):
                    return False
                stack.extend(item.values())
            else:
                stack.extend(item)
        elif kind not in _JSON_SCALARS:
            return False
    return True


def _resolve_parameters_unless_json(engine: Any) -> None:
    """Prefect's `FlowRunEngine._resolve_parameters`, skipped for JSON data (which it would
    return unchanged: `visit_collection` keeps every value its visit does not replace, and
    `resolve_to_final_result` replaces only futures and states)."""
    if engine.parameters and is_json_data(engine.parameters):
        engine.parameters = dict(engine.parameters)
        return
    _PREFECTS[_RESOLVE_PARAMETERS](engine)


def walk_json_parameters(enabled: bool) -> None:
    """Prefect's walk over a flow run's parameters for every run of this process (`enabled`), or
    only for parameters that are not JSON data."""
    _replace_in_prefect(_RESOLVE_PARAMETERS, enabled, _resolve_parameters_unless_json)


def results_paths_as_text(enabled: bool) -> None:
    """Every `LocalFileSystem` of this process (the single-event tasks' results directory) forms
    its paths as `ResultsDirectory` does (`enabled`), or with Prefect's two `realpath`s a call."""
    from flows.tasks.cache_store import resolve_as_text

    _replace_in_prefect("LocalFileSystem._resolve_path", not enabled, resolve_as_text,
                        module="prefect.filesystems")  # Prefect's unless enabled


def _plain_emit(handler: logging.StreamHandler[Any], record: logging.LogRecord) -> None:
    logging.StreamHandler.emit(handler, record)


def plain_console_logs(enabled: bool) -> int:
    """Prefect's console handlers of this process write each line as a plain `StreamHandler`
    does, with the same formatter (`enabled`), instead of printing it through a Rich console
    (highlighting and wrapping, ~1.5 ms a line: a tenth of a steady run's time in the worker).
    Returns the handlers changed."""
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *(item for item in logging.Logger.manager.loggerDict.values()
                                      if isinstance(item, logging.Logger))]
    changed = 0
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler):
                if enabled:
                    handler.emit = functools.partial(_plain_emit, handler)  # type: ignore
                else:
                    handler.__dict__.pop("emit", None)
                changed += 1
    return changed


_NO_RETRIES: list[tuple[Any, Any]] = []  # (settings, the same without client retries): one pair


@contextlib.contextmanager
def without_client_retries() -> Iterator[None]:
    """The API calls of the block are not retried by Prefect's client (it waits 2, 4, 8... s
    between tries): for a caller that tries again quickly itself. The settings are derived once
    per settings object (`temporary_settings` would cost ~27 ms of validation each time)."""
    import prefect.context
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES

    ctx = prefect.context.get_settings_context()
    if not _NO_RETRIES or _NO_RETRIES[0][0] is not ctx.settings:
        quick = ctx.settings.copy_with_update(updates={PREFECT_CLIENT_MAX_RETRIES: 0})
        _NO_RETRIES[:] = [(ctx.settings, quick)]
    with prefect.context.SettingsContext(profile=ctx.profile, settings=_NO_RETRIES[0][1]):
        yield


class ReadCache:
    """The worker client's reads of deployments (kept `seconds`) and flows (kept for good), by
    id; each caller gets its own copy (Prefect's worker merges a run's job variables into the
    deployment it read)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.hits = self.reads = 0
        self._deployments: Expiring[UUID, Any] = Expiring(clock)
        self._flows: dict[UUID, Any] = {}

    def install(self, client: Any) -> None:
        """Make `client.read_deployment` and `client.read_flow` (one id argument) use the cache."""
        if self.seconds <= 0:
            return
        client.read_deployment = self._cached(client.read_deployment, self._deployment_hit,
                                              self._deployment_store)
        client.read_flow = self._cached(client.read_flow, self._flows.get, self._flows.__setitem__)

    def _deployment_hit(self, key: UUID) -> Any:
        return self._deployments.get(key, self.seconds, default=None)

    def _deployment_store(self, key: UUID, value: Any) -> None:
        self._deployments.put(key, value)

    def _cached(self, read: Callable[..., Awaitable[Any]], hit: Callable[[UUID], Any],
                store: Callable[[UUID, Any], None]) -> Callable[..., Awaitable[Any]]:
        async def cached(key: UUID, *args: Any, **kwargs: Any) -> Any:
            if args or kwargs:
                return await read(key, *args, **kwargs)
            value = hit(key)
            if value is None:
                self.reads += 1
                value = await read(key)
                store(key, value)
            else:
                self.hits += 1
            return value.model_copy(deep=True)
        return cached


_storage: Expiring[str, Any] = Expiring()  # "default": the server's default storage block id


def keep_server_result_storage(seconds: float) -> None:
    """Make Prefect's reads of the server's default result storage block id (`GET
    /admin/storage`, prefect.results) keep a successful answer for `seconds` in this process."""
    import prefect.results as results

    if seconds <= 0:
        return

    def kept() -> tuple[bool, Any]:
        value = _storage.get("default", seconds)
        return (False, None) if value is MISSING else (True, value)

    def keep(value: Any) -> Any:
        return _storage.put("default", value)

    def read_sync() -> Any:
        from prefect.client.orchestration import get_client

        found, value = kept()
        if found:
            return value
        try:
            answer = get_client(sync_client=True).read_server_default_result_storage()
        except Exception:  # as Prefect: local defaults (not kept)
            log.debug("cannot read the server's default result storage", exc_info=True)
            return None
        return keep(answer.default_result_storage_block_id)

    async def read_async() -> Any:
        from prefect.client.orchestration import get_client

        found, value = kept()
        if found:
            return value
        try:
            answer = await get_client().read_server_default_result_storage()
        except Exception:
            log.debug("cannot read the server's default result storage", exc_info=True)
            return None
        return keep(answer.default_result_storage_block_id)

    results._read_server_default_result_storage_block_id = read_sync
    results._aread_server_default_result_storage_block_id = read_async
