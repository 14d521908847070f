"""What the `wis2-warm` worker changes in Prefect's engine for its runs (worker/engine.py), without
a server: pooled API clients, the suspension observer switch, no per-run environment.

Runs through a real worker and server: tests/integration/test_warm_worker.py.
"""

from __future__ import annotations

import copy
import threading
import types
import uuid

import prefect.flow_engine as flow_engine
import pytest
from prefect.context import SyncClientContext
from prefect.settings import PREFECT_API_URL, temporary_settings

from chain.expiring import Expiring
from worker.engine import (
    ClientPool,
    MergedPatches,
    flow_heartbeats,
    is_merged_pid_patch,
    suspension_observer,
    without_client_retries,
)
from worker.warm import WarmJobConfiguration


@pytest.fixture
def api_url():
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):  # never contacted
        yield


def test_a_run_gets_the_client_a_finished_run_gave_back(api_url) -> None:
    pool = ClientPool()
    assert SyncClientContext.get() is None
    with pool.client_context() as first:
        assert SyncClientContext.get() is first  # what the engine's get_or_create finds
    assert SyncClientContext.get() is None
    with pool.client_context() as second:
        assert second is first
        with pool.client_context() as other:  # a second run at the same time: its own client
            assert other is not first
    pool.close()
    assert first.client._closed and other.client._closed


def test_a_client_of_a_run_that_raised_is_closed_not_reused(api_url) -> None:
    pool = ClientPool()
    with pytest.raises(RuntimeError), pool.client_context() as broken:
        raise RuntimeError("engine error")
    assert broken.client._closed
    with pool.client_context() as fresh:
        assert fresh is not broken
    pool.close()


@pytest.mark.parametrize("name, switch, args", [
    ("observe_flow_run_suspension", suspension_observer, ("run-id", object())),
    ("_send_heartbeats", flow_heartbeats, (object(),)),
])
def test_what_the_worker_turns_off_is_off_until_asked_for(name, switch, args) -> None:
    """Off: a no-op (no thread, no client, no subscription, nothing to wait for at the end);
    on: Prefect's own again."""
    prefects = getattr(flow_engine, name)
    try:
        switch(False)
        off = getattr(flow_engine, name)
        assert off is not prefects
        before = threading.active_count()
        with off(*args):
            assert threading.active_count() == before
        switch(True)
        assert getattr(flow_engine, name) is prefects
    finally:
        setattr(flow_engine, name, prefects)


def test_without_client_retries_changes_only_the_retries_of_its_block() -> None:
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES

    with temporary_settings({PREFECT_API_URL: "http://api.example:4200/api",
                             PREFECT_CLIENT_MAX_RETRIES: 7}):
        for _ in range(2):  # the second time from the settings derived the first
            with without_client_retries():
                assert PREFECT_CLIENT_MAX_RETRIES.value() == 0
                assert PREFECT_API_URL.value() == "http://api.example:4200/api"
            assert PREFECT_CLIENT_MAX_RETRIES.value() == 7


def test_no_environment_is_computed_for_a_run_in_the_worker_process() -> None:
    assert WarmJobConfiguration._base_environment() == {}


def test_the_read_cache_keeps_deployments_for_its_delay_and_flows_for_good() -> None:
    import asyncio
    from uuid import uuid4

    from pydantic import BaseModel

    from worker.engine import ReadCache

    class Read(BaseModel):
        id: str
        job_variables: dict

    class Client:
        def __init__(self) -> None:
            self.calls: list[str] = []

        async def read_deployment(self, key, *args):
            self.calls.append("deployment")
            return Read(id=str(key), job_variables={"env": {}})

        async def read_flow(self, key):
            self.calls.append("flow")
            return Read(id=str(key), job_variables={})

    now = [0.0]
    client, cache = Client(), ReadCache(30, clock=lambda: now[0])
    cache.install(client)
    deployment, flow = uuid4(), uuid4()

    async def reads() -> None:
        first = await client.read_deployment(deployment)
        first.job_variables["env"]["RUN"] = "1"  # as Prefect's worker merges a run's env
        assert (await client.read_deployment(deployment)).job_variables == {"env": {}}
        await client.read_flow(flow)
        now[0] = 31
        await client.read_deployment(deployment)
        await client.read_flow(flow)

    asyncio.run(reads())
    assert client.calls == ["deployment", "flow", "deployment"]
    assert (cache.reads, cache.hits) == (3, 2)
    off = Client()
    ReadCache(0).install(off)
    asyncio.run(off.read_deployment(deployment))
    asyncio.run(off.read_deployment(deployment))
    assert off.calls == ["deployment", "deployment"]


def test_the_servers_default_result_storage_is_read_once_per_delay(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import prefect.client.orchestration as orchestration
    import prefect.results as results

    from worker import engine

    for name in ("_read_server_default_result_storage_block_id",
                 "_aread_server_default_result_storage_block_id"):
        monkeypatch.setattr(results, name, getattr(results, name))  # restored after the test
    monkeypatch.setattr(engine, "_storage", Expiring())
    reads: list[str] = []

    class Answer:
        default_result_storage_block_id = None

    class Client:
        def read_server_default_result_storage(self) -> Answer:
            reads.append("GET /admin/storage")
            if len(reads) == 1:
                raise RuntimeError("server busy")  # not kept
            return Answer()

    monkeypatch.setattr(orchestration, "get_client", lambda **kwargs: Client())
    engine.keep_server_result_storage(30)
    for _ in range(4):
        assert results._read_server_default_result_storage_block_id() is None
    assert reads == ["GET /admin/storage"] * 2


def test_json_data_is_told_from_what_prefect_must_walk() -> None:
    from prefect.states import Completed
    from prefect.utilities.annotations import quote

    from worker.engine import is_json_data

    event = {"id": "e1", "data": {"assets": {"a": {"href": "x", "file:size": 3}},
                                  "bbox": [1.5, -2, None], "ok": True}}
    assert is_json_data({"events": [event, copy.deepcopy(event)], "dataset": None})
    cyclic: list = []
    cyclic.append(cyclic)

    class Mapping(dict):
        pass

    for value in ({"event": quote(event)}, {"event": (1, 2)}, {"event": Completed(data=1)},
                  {"event": Mapping()}, {1: "x"}, {"event": cyclic}, {"event": b"x"},
                  {"event": {"nested": [object()]}}, {"events": [event, event]}):
        assert not is_json_data(value), value


def test_a_runs_json_parameters_are_not_walked_and_others_are(monkeypatch) -> None:
    """Off (the worker's default): JSON parameters skip Prefect's walk and come out equal; a
    State among them is still resolved by Prefect's walk. On: Prefect's walk for all."""
    from prefect import flow
    from prefect.flow_engine import FlowRunEngine
    from prefect.states import Completed

    from worker.engine import walk_json_parameters

    @flow
    def f(events: list, dataset: str | None = None) -> None:
        pass

    walks: list[str] = []
    prefects = flow_engine.visit_collection

    def counted(expr, *args, **kwargs):
        walks.append(kwargs.get("context", {}).get("parameter_name", "?"))
        return prefects(expr, *args, **kwargs)

    monkeypatch.setattr(flow_engine, "visit_collection", counted)
    events = [{"id": "e1", "data": {"bbox": [1.0, 2.0], "ok": True}}]
    try:
        walk_json_parameters(False)
        engine = FlowRunEngine(flow=f, parameters={"events": events, "dataset": "argo"})
        engine._resolve_parameters()
        assert engine.parameters == {"events": events, "dataset": "argo"} and walks == []
        engine = FlowRunEngine(flow=f, parameters={"events": [Completed(data=7)]})
        engine._resolve_parameters()
        assert engine.parameters == {"events": [7]} and walks == ["events"]
        walk_json_parameters(True)
        walks.clear()
        engine = FlowRunEngine(flow=f, parameters={"events": events, "dataset": "argo"})
        engine._resolve_parameters()
        assert engine.parameters == {"events": events, "dataset": "argo"}
        assert walks == ["events", "dataset"]
    finally:
        walk_json_parameters(True)


class RecordingClient:
    """Stands in for the engine's sync client: each call recorded; a run read has `name`."""

    def __init__(self, name: str) -> None:
        self.name, self.calls = name, []

    def read_flow_run(self, flow_run_id):
        self.calls.append(("read", flow_run_id))
        return types.SimpleNamespace(id=flow_run_id, name=self.name)

    def update_flow_run(self, **kwargs):
        self.calls.append(("update", kwargs))

    def set_flow_run_name(self, flow_run_id, name):
        self.calls.append(("rename", flow_run_id, name))


def test_the_engines_patch_carries_the_pid_and_a_rename_to_the_same_name_is_skipped() -> None:
    """As the engine calls them (`FlowRunEngine.initialize_run`, `begin_run`,
    `setup_run_context`): its PATCH of version and policy gets the worker's pid; renaming the
    run to the name it had when polled is skipped, to another name is not; after a read, the
    name read counts; other PATCHes go through unchanged."""
    client = RecordingClient(name="read-name")
    patches = MergedPatches(client, "4242")
    run_id, other_id, policy = uuid.uuid4(), uuid.uuid4(), object()
    patches.running(types.SimpleNamespace(id=run_id, name="IOPX01_LFVX_251403.BU"))

    client.update_flow_run(flow_run_id=run_id, flow_version="abc", empirical_policy=policy)
    client.set_flow_run_name(flow_run_id=run_id, name="IOPX01_LFVX_251403.BU")  # skipped
    client.set_flow_run_name(flow_run_id=run_id, name="another-name")
    client.set_flow_run_name(flow_run_id=other_id, name="IOPX01_LFVX_251403.BU")
    client.read_flow_run(run_id)
    client.set_flow_run_name(flow_run_id=run_id, name="read-name")  # skipped
    client.update_flow_run(flow_run_id=run_id, name="x")

    assert client.calls == [
        ("update", {"flow_run_id": run_id, "flow_version": "abc", "empirical_policy": policy,
                    "infrastructure_pid": "4242"}),
        ("rename", run_id, "another-name"),
        ("rename", other_id, "IOPX01_LFVX_251403.BU"),  # another run: renamed
        ("read", run_id),
        ("update", {"flow_run_id": run_id, "name": "x"}),
    ]


def test_the_workers_pid_patch_is_recognised_only_alone_and_with_this_pid() -> None:
    run_id = uuid.uuid4()
    assert is_merged_pid_patch({"flow_run_id": run_id, "infrastructure_pid": "4242"}, "4242")
    assert not is_merged_pid_patch({"flow_run_id": run_id, "infrastructure_pid": "7"}, "4242")
    assert not is_merged_pid_patch({"flow_run_id": run_id, "infrastructure_pid": "4242",
                                    "name": "x"}, "4242")


def test_a_pooled_client_merges_the_patches_only_when_asked(api_url) -> None:
    for pid, merged in (("4242", True), (None, False)):
        pool = ClientPool(pid)
        with pool.client_context() as ctx:
            patched = "update_flow_run" in vars(ctx.client)  # replaced on the instance
        pool.close()
        assert patched is merged


def test_the_results_paths_are_prefects_formed_as_text(tmp_path) -> None:
    """The same paths as Prefect's `LocalFileSystem._resolve_path` (base a symbolic link
    included), the same refusal of a path outside the base; Prefect's again when turned off."""
    from prefect.filesystems import LocalFileSystem

    from worker.engine import results_paths_as_text

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    storage = LocalFileSystem(basepath=str(tmp_path / "link"))
    prefects = LocalFileSystem._resolve_path
    keys = [None, "abc", "a/b/../c", str(tmp_path / "real" / "x")]
    expected = [prefects(storage, key) for key in keys]
    try:
        results_paths_as_text(True)
        assert LocalFileSystem._resolve_path is not prefects
        assert [storage._resolve_path(key) for key in keys] == expected
        for outside in ("../elsewhere", str(tmp_path / "other")):
            with pytest.raises(ValueError, match="outside of the base path"):
                storage._resolve_path(outside)
        results_paths_as_text(False)
        assert LocalFileSystem._resolve_path is prefects
    finally:
        LocalFileSystem._resolve_path = prefects


def test_prefects_console_handlers_write_plain_lines_when_asked() -> None:
    import io
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    from worker.engine import plain_console_logs

    stream = io.StringIO()
    handler = PrefectConsoleHandler(stream=stream)
    handler.setFormatter(logging.Formatter("%(levelname)s | %(message)s"))
    logger = logging.getLogger("wis2-test-plain-console")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        assert plain_console_logs(True) >= 1
        logger.warning("a [bold]line[/] of %d", 1)
        assert stream.getvalue() == "WARNING | a [bold]line[/] of 1\n"  # as written, no markup
        assert plain_console_logs(False) >= 1
        assert "emit" not in vars(handler)  # Prefect's Rich console again
    finally:
        logger.removeHandler(handler)
