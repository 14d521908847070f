"""The state a node with several worker hosts shares: the publication ledger in PostgreSQL
(WIS2_LEDGER_URL) with its per-data_id claims, and the task results in Redis (WIS2_RESULTS_URL).
Each test module starts its own PostgreSQL cluster and Redis server on free ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chain.ledger import (
    ClaimTimeout,
    LedgerEntry,
    LedgerUnavailable,
    PostgresLedger,
    SqliteLedger,
)
from chain.processes import free_port
from localnode.postgres import PG_USER, PostgresCluster
from localnode.redis import RedisServer
from tests.fixtures.paths import BUFR_EVENT
from tests.integration.test_publish_notification import (  # noqa: F401  (fixtures)
    chain,
    on_session_broker,
)

pytestmark = pytest.mark.timeout(180)
REPO = Path(__file__).resolve().parents[2]


def ledger_url(cluster: PostgresCluster, database: str) -> str:
    cluster.create_database(database)
    return f"postgresql://{PG_USER}@{cluster.host}:{cluster.port}/{database}"


# ---- the ledger in PostgreSQL ----------------------------------------------------------------
def test_the_postgres_ledger_records_and_decides_like_the_sqlite_one(
        postgres_cluster: PostgresCluster, tmp_path: Path) -> None:
    """Same entries, extra fields kept; the table is created by the first of many concurrent
    first uses."""
    sqlite = SqliteLedger.in_dir(tmp_path)
    pg_ledger = PostgresLedger(ledger_url(postgres_cluster, "ledger_records"))
    for ledger in (sqlite, pg_ledger):
        assert ledger.get("wis2/x/a") is None
        entry = ledger.record("wis2/x/a", notification_id="n1", rel="canonical",
                              checksum="sha256:AAA", pubtime="2026-11-30T00:00:00Z",
                              kind="wcmp2-record", href="https://x/a.json")
        assert ledger.get("wis2/x/a") == entry
        assert (entry.model_extra or {})["kind"] == "wcmp2-record"
        ledger.record("wis2/x/b", notification_id="nb", rel="canonical")
        assert ledger.get_many(["wis2/x/a", "wis2/x/b", "wis2/x/never", "wis2/x/a"]) == {
            "wis2/x/a": entry, "wis2/x/b": ledger.get("wis2/x/b")}
        assert ledger.get_many([]) == {}
        assert ledger.forget("wis2/x/b")
        ledger.record("wis2/x/a", notification_id="n2", rel="update", checksum="sha256:BBB")
        assert ledger.all()["wis2/x/a"].notification_id == "n2"
        assert ledger.forget("wis2/x/a") and not ledger.forget("wis2/x/a")

    fresh = PostgresLedger(ledger_url(postgres_cluster, "ledger_first_use"))
    errors: list[BaseException] = []

    def first_use(i: int) -> None:
        try:
            PostgresLedger(fresh.location).record(f"k{i}", notification_id=str(i), rel="canonical")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=first_use, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(fresh.all()) == 12


@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
def test_record_many_records_all_in_one_transaction_or_none(
        kind: str, postgres_cluster: PostgresCluster, tmp_path: Path) -> None:
    """`record_many` (a batch run's record-batch): the entries replace what was there, all at
    once; an entry the database refuses leaves every entry of the call unrecorded."""
    ledger = (PostgresLedger(ledger_url(postgres_cluster, "ledger_record_many"))
              if kind == "postgresql" else SqliteLedger.in_dir(tmp_path))
    ledger.record("wis2/x/a", notification_id="old", rel="canonical", checksum="sha256:AAA")
    entries = {"wis2/x/a": LedgerEntry(notification_id="n1", rel="update", checksum="sha256:B",
                                       pubtime="2026-11-30T00:00:00Z"),
               "wis2/x/b": LedgerEntry(notification_id="n2", rel="canonical", kind="batch")}
    assert ledger.record_many(entries) == 2
    assert ledger.all() == entries
    assert ledger.record_many({}) == 0
    refused = LedgerEntry.model_construct(notification_id=None, rel="canonical")  # NOT NULL
    with pytest.raises(Exception, match=r"(?i)not.null"):
        ledger.record_many({"wis2/x/c": LedgerEntry(notification_id="n3", rel="canonical"),
                            "wis2/x/d": refused})
    assert ledger.all() == entries  # neither c nor d


def test_an_unreachable_ledger_fails_naming_wis2_ledger_url() -> None:
    """Retried for WIS2_LEDGER_RETRY_SECONDS (test_service_outages.py: a server coming back
    within it), then `LedgerUnavailable` naming the URL and the setting."""
    ledger = PostgresLedger(f"postgresql://{PG_USER}@127.0.0.1:{free_port()}/nowhere",
                            retry_seconds=1)
    with pytest.raises(LedgerUnavailable, match=r"WIS2_LEDGER_URL=postgresql://.*failed for 1 s "
                       r"\(WIS2_LEDGER_RETRY_SECONDS\).*Connection refused"):
        ledger.get("wis2/x/a")


# ---- claims across processes -----------------------------------------------------------------
HOLD_CLAIM = """
import sys, time
from chain.ledger import open_ledger
with open_ledger(sys.argv[1]).claim([sys.argv[2]], timeout=10):
    print("claimed", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def claim_holder() -> Iterator[object]:
    started: list[subprocess.Popen[str]] = []

    def hold(location: str, data_id: str) -> subprocess.Popen[str]:
        holder = subprocess.Popen([sys.executable, "-c", HOLD_CLAIM, location, data_id],
                                  cwd=REPO, stdout=subprocess.PIPE, text=True)
        started.append(holder)
        assert holder.stdout is not None and holder.stdout.readline().strip() == "claimed"
        return holder

    yield hold
    for holder in started:
        if holder.poll() is None:
            holder.kill()
        holder.wait(10)


@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
def test_a_claimed_data_id_waits_and_a_killed_holder_frees_it_at_once(
        kind: str, postgres_cluster: PostgresCluster, tmp_path: Path,
        claim_holder: object) -> None:
    location = (ledger_url(postgres_cluster, "claims") if kind == "postgresql"
                else str(SqliteLedger.in_dir(tmp_path).path))
    from chain.ledger import open_ledger

    ledger = open_ledger(location)
    holder = claim_holder(location, "wis2/x/held")  # type: ignore[operator]
    with pytest.raises(ClaimTimeout, match=r"'wis2/x/held'.*WIS2_CACHE_LOCK_TIMEOUT"):
        with ledger.claim(["wis2/x/free", "wis2/x/held"], timeout=0.5):
            pass
    with ledger.claim(["wis2/x/free"], timeout=0.5):  # left free by the failed claim
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    # free at once: the server / the kernel dropped it with its holder (no hold timeout)
    with ledger.claim(["wis2/x/held"], timeout=5):
        pass


# ---- task results in Redis -------------------------------------------------------------------
BUILD = """
import json, sys
from chain.ledger import ledger_location
from chain.settings import ChainSettings
from flows.tasks import configured_tasks
from wis2.cloudevent import parse_event
from wis2.dataset import load_dataset
settings = ChainSettings()
event = parse_event(open(sys.argv[1], encoding="utf-8").read())
state = configured_tasks(settings).build(event, load_dataset("argo"), ledger_location(settings),
                                         return_state=True)
notes = state.result()
print(json.dumps({"state": state.name, "ids": [n.id for n in notes],
                  "pubtimes": [n.properties.pubtime for n in notes]}), flush=True)
"""


def test_a_build_result_in_redis_is_a_cache_hit_on_another_host(
        redis_server: RedisServer, tmp_path: Path, prefect_api: object) -> None:
    """Two processes sharing nothing but Redis (own WIS2_RESULTS_DIR, own working directory):
    the second reads the first's build as a cache hit: same ids, same pubtime."""
    outputs = []
    for host in ("a", "b"):
        workdir = tmp_path / host
        workdir.mkdir()
        env = {**os.environ, **prefect_api.client_env(),  # type: ignore[attr-defined]
               "WIS2_RESULTS_DIR": str(workdir / "results"),
               "WIS2_RESULTS_URL": redis_server.url()}
        done = subprocess.run([sys.executable, "-c", BUILD, str(BUFR_EVENT)], cwd=workdir,
                              env={**env, "PYTHONPATH": str(REPO)}, capture_output=True,
                              text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    first, second = outputs
    assert first["state"] == "Completed" and second["state"] == "Cached"
    assert second["ids"] == first["ids"] and second["pubtimes"] == first["pubtimes"]
    for host in ("a", "b"):  # nothing on the hosts' disks: the result is in Redis
        assert list((tmp_path / host / "results").glob("wnm-build-*")) == []
    import redis

    with redis.Redis.from_url(redis_server.url()) as client:
        assert len(client.keys("wnm-build-*")) == 1


def test_a_hosts_sqlite_ledger_is_imported_into_postgresql(
        postgres_cluster: PostgresCluster, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`wis2-chain ledger-import`: a node moving to several worker hosts keeps its history
    (the relations of its files); an entry already in PostgreSQL is kept."""
    from typer.testing import CliRunner

    from cli.main import app

    url = ledger_url(postgres_cluster, "ledger_import")
    local = SqliteLedger.in_dir(tmp_path)
    local.record("wis2/x/a", notification_id="n1", rel="canonical", checksum="sha256:AAA")
    local.record("wis2/x/b", notification_id="n2", rel="canonical", checksum="sha256:BBB")
    shared = PostgresLedger(url)
    newer = shared.record("wis2/x/b", notification_id="n3", rel="update", checksum="sha256:CCC")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WIS2_RESULTS_DIR", str(tmp_path))
    monkeypatch.setenv("WIS2_LEDGER_URL", url)
    done = CliRunner().invoke(app, ["ledger-import"])
    assert done.exit_code == 0, done.output
    assert "imported 1 of 2 entries" in done.output
    assert shared.all() == {"wis2/x/a": local.get("wis2/x/a"), "wis2/x/b": newer}
    monkeypatch.delenv("WIS2_LEDGER_URL")
    refused = CliRunner().invoke(app, ["ledger-import"])
    assert refused.exit_code == 2 and "WIS2_LEDGER_URL is not set" in refused.output


def test_an_event_whose_file_stays_claimed_fails_naming_the_data_id(
        on_session_broker: Any, chain: Any, claim_holder: Any,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another run holds the file longer than WIS2_CACHE_LOCK_TIMEOUT: the run fails, its message
    names the data_id, nothing is published; once the holder is gone the event goes through."""
    from tests.integration.test_publish_notification import bufr_event, read_artifacts, run

    monkeypatch.setenv("WIS2_CACHE_LOCK_TIMEOUT", "1")
    from wis2.cloudevent import parse_event
    from wis2.dataset import load_dataset
    from wis2.mapping import data_ids_of

    [data_id] = data_ids_of(parse_event(json.dumps(bufr_event())), load_dataset("argo"))
    holder = claim_holder(str(SqliteLedger.in_dir(chain.results).path), data_id)
    state = run(bufr_event())
    assert state.is_failed()
    assert data_id in state.message and "WIS2_CACHE_LOCK_TIMEOUT" in state.message
    failures = [a for a in read_artifacts(state.state_details.flow_run_id).values()
                if a.key and a.key.startswith("failed-")]
    assert failures and data_id in failures[0].data
    assert on_session_broker.settle() == []
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    again = run(bufr_event())
    assert again.is_completed(), again.message
    assert [m["properties"]["data_id"] for _, m in on_session_broker.wait_for(1)] == [data_id]


def test_a_batch_round_claims_its_files_from_build_to_record(
        on_session_broker: Any, chain: Any, claim_holder: Any,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A publish-batch run claims the data_ids of its events as publish-notification does:
    while another process holds one of them past WIS2_CACHE_LOCK_TIMEOUT, the batch's events
    fail naming it (nothing built, published or recorded); once the holder is gone the batch
    publishes each file once."""
    from flows.publish_batch import BatchRunResult, publish_batch
    from tests.integration.test_publish_batch import numbered_event
    from wis2.cloudevent import parse_event
    from wis2.dataset import load_dataset
    from wis2.mapping import data_ids_of

    monkeypatch.setenv("WIS2_CACHE_LOCK_TIMEOUT", "1")
    events = [numbered_event(i) for i in (80, 81)]
    [held] = data_ids_of(parse_event(json.dumps(events[1])), load_dataset("argo"))
    holder = claim_holder(str(SqliteLedger.in_dir(chain.results).path), held)
    state = publish_batch(events=events, dataset="argo", return_state=True)
    assert state.is_failed()
    result: BatchRunResult = state.result(raise_on_failure=False)
    assert [e.status for e in result.events] == ["failed", "failed"]
    assert all(held in (e.error or "") and "WIS2_CACHE_LOCK_TIMEOUT" in (e.error or "")
               for e in result.events), result.events
    assert on_session_broker.settle() == []
    assert SqliteLedger.in_dir(chain.results).all() == {}
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    again = publish_batch(events=events, dataset="argo", return_state=True)
    assert again.is_completed(), again.message
    assert sorted(m["properties"]["data_id"] for _, m in on_session_broker.wait_for(2)) == \
        sorted(n.data_id for e in again.result().events for n in e.notifications)
    assert held in SqliteLedger.in_dir(chain.results).all()


def test_a_batch_runs_results_in_redis_are_cache_hits_of_a_single_run_on_another_host(
        redis_server: RedisServer, chain: Any, on_session_broker: Any,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """WIS2_RESULTS_URL: the batch tasks read and write the results in Redis as the single-event
    tasks do. A publish-notification run of a batched event on a host that shares only Redis
    (own results directory, own ledger: only the cache can tell) finds its build and publication
    cached: same id, not sent again; and the reverse."""
    import redis

    from flows.publish_batch import BatchRunResult, publish_batch
    from flows.publish_notification import NotificationRunResult, publish_notification
    from tests.integration.test_publish_batch import numbered_event, task_runs

    def keys() -> set[bytes]:
        with redis.Redis.from_url(redis_server.url()) as client:
            return set(client.keys("wnm-*"))

    before = keys()  # this module's earlier tests share the Redis server
    monkeypatch.setenv("WIS2_RESULTS_URL", redis_server.url())
    batch = publish_batch(events=[numbered_event(i) for i in (70, 71)], return_state=True)
    assert batch.is_completed(), batch.message
    batched: BatchRunResult = batch.result()
    monkeypatch.setenv("WIS2_RESULTS_DIR", str(tmp_path / "other-host"))
    alone = publish_notification(event=numbered_event(70), return_state=True)
    assert alone.is_completed(), alone.message
    single: NotificationRunResult = alone.result()
    assert single.ids == [batched.events[0].notifications[0].id]
    assert [n.sent for n in single.notifications] == [False]
    states = {r.name.rsplit("-", 1)[0]: r.state_name
              for r in task_runs(alone.state_details.flow_run_id, 5)}
    assert states["build-notifications"] == "Cached", states
    assert states["publish-notification"] == "Cached", states

    first: NotificationRunResult = publish_notification(
        event=numbered_event(72), return_state=True).result()
    monkeypatch.setenv("WIS2_RESULTS_DIR", str(tmp_path / "third-host"))
    again = publish_batch(events=[numbered_event(72)], return_state=True)
    assert again.is_completed(), again.message
    assert [e.status for e in again.result().events] == ["cached"]
    assert again.result().ids == first.ids

    assert len(on_session_broker.settle()) == 3  # 70, 71, 72: each once
    for results in (chain.results, tmp_path / "other-host", tmp_path / "third-host"):
        assert list(results.glob("wnm-*")) == []  # on no host's disk
    written = Counter(key.decode().rsplit("-", 1)[0] for key in keys() - before)
    assert written == {"wnm-build": 3, "wnm-published": 3}, written
