"""publish-metadata / republish-metadata against a real Prefect API and a real broker.

The flows run in this process (tracked by the session's Prefect server); a subscriber with the
public `everyone` account checks what the Global Brokers would receive on the metadata topic.
"""

from __future__ import annotations

import base64
import contextvars
import hashlib
import json
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from blocks.mqtt_broker import MqttBroker
from chain.ledger import ClaimLost, PostgresLedger, SqliteLedger, open_ledger
from chain.metrics import FLOW_METRICS
from chain.mqtt import connect
from flows.publish_metadata import publish_metadata, republish_metadata
from listener.observability import serve_metrics
from localnode.postgres import PG_USER, PostgresCluster, postgres_problem
from tests.fixtures.paths import ARGO_METADATA, DATA
from wis2.metadata_notification import Wcmp2Record, metadata_data_id
from wis2.validation import validate_notification

pytestmark = pytest.mark.timeout(180)

TOPIC = "origin/a/wis2/fr-ifremer-argo/metadata"
ARGO_ID = "urn:wmo:md:fr-ifremer-argo:cor:msg:argo"
BASE_URL = "https://node.example.org/wis2/metadata"
DEMO = DATA / "demo-metadata.json"


class Subscriber:
    """The public `everyone` account subscribed to the centre's metadata topic."""

    def __init__(self, broker: Any) -> None:
        self.messages: list[dict[str, Any]] = []
        self.topics: list[str] = []
        self._cond = threading.Condition()
        subscribed = threading.Event()
        self.client = connect(broker.connection("everyone"))
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.on_message = self._on_message
        self.client.subscribe(TOPIC, qos=1)
        assert subscribed.wait(10), "subscription not acknowledged"

    def _on_message(self, client, userdata, message) -> None:
        with self._cond:
            self.topics.append(message.topic)
            self.messages.append(json.loads(message.payload))
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = 15) -> list[dict[str, Any]]:
        """The messages received, once there are at least `count`; AssertionError after
        `timeout` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.messages) >= count, timeout):
                raise AssertionError(f"{len(self.messages)} of {count} message(s) after "
                                     f"{timeout} s on {sorted(set(self.topics))}")
            return list(self.messages)

    def settle(self, seconds: float = 1.5) -> list[dict[str, Any]]:
        """Everything received after a quiet period (to check nothing more arrives)."""
        time.sleep(seconds)
        with self._cond:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def node(
    prefect_api, session_broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, Path]]:
    """Settings of one node: its own results (ledger), metadata directory and broker block."""
    block = f"md-broker-{uuid.uuid4().hex[:8]}"
    MqttBroker.from_connection(session_broker.connection("publisher")).save(block)
    paths = {"results": tmp_path / "results", "metadata": tmp_path / "www" / "metadata"}
    monkeypatch.setenv("WIS2_RESULTS_DIR", str(paths["results"]))
    monkeypatch.setenv("WIS2_METADATA_DIR", str(paths["metadata"]))
    monkeypatch.setenv("WIS2_METADATA_BASE_URL", BASE_URL)
    monkeypatch.setenv("WIS2_BROKER_BLOCK", block)
    monkeypatch.setenv("WIS2_PUBLISH_RETRIES", "1")
    monkeypatch.setenv("WIS2_RETRY_BASE_DELAY", "0.2")
    monkeypatch.setenv("WIS2_WCMP2_KPI", "false")
    yield paths


@pytest.fixture
def subscriber(session_broker) -> Iterator[Subscriber]:
    sub = Subscriber(session_broker)
    yield sub
    sub.close()


def _assert_valid(message: dict[str, Any]) -> None:
    report = validate_notification(message, topic=TOPIC, profile="publish")
    assert report.ok, report.rows()


def _sha512_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha512(data).digest()).decode()


def test_canonical_then_update_then_deletion(node, subscriber) -> None:
    raw = ARGO_METADATA.read_bytes()
    served = node["metadata"] / f"{ARGO_ID}.json"

    first = publish_metadata(record_location=str(ARGO_METADATA))
    (msg,) = subscriber.wait_for(1)
    _assert_valid(msg)
    assert subscriber.topics == [TOPIC]
    assert first.rel == "canonical" and msg["id"] == first.notification_id
    props = msg["properties"]
    assert props["data_id"] == f"wis2/fr-ifremer-argo/metadata/{ARGO_ID}"
    assert props["metadata_id"] == ARGO_ID
    assert props["datetime"] == "2025-08-20T14:00:00Z"
    (link,) = msg["links"]
    assert link["rel"] == "canonical"
    assert link["type"] == "application/geo+json"
    assert link["href"] == f"{BASE_URL}/{ARGO_ID}.json"
    # the served file holds exactly the announced bytes
    assert served.read_bytes() == raw
    assert link["length"] == len(served.read_bytes())
    assert props["integrity"] == {"method": "sha512", "value": _sha512_b64(served.read_bytes())}

    second = publish_metadata(record_location=str(ARGO_METADATA), operation="create")
    messages = subscriber.wait_for(2)
    assert len(messages) == 2
    _assert_valid(messages[1])
    assert second.rel == "update" and messages[1]["links"][0]["rel"] == "update"
    assert messages[1]["id"] != messages[0]["id"]
    assert messages[1]["properties"]["data_id"] == props["data_id"]

    third = publish_metadata(record_id=ARGO_ID, operation="delete")
    messages = subscriber.wait_for(3)
    assert len(messages) == 3
    _assert_valid(messages[2])
    deletion = messages[2]
    assert third.rel == "deletion"
    assert deletion["links"][0]["rel"] == "deletion"
    assert deletion["links"][0]["href"] == link["href"]
    assert deletion["properties"]["metadata_id"] == ARGO_ID
    assert not served.exists(), "the deleted record is no longer served"
    ledger = SqliteLedger.in_dir(node["results"]).get(props["data_id"])
    assert ledger is not None and ledger.rel == "deletion"

    # published again after its deletion: a new first publication
    again = publish_metadata(record_location=str(ARGO_METADATA))
    assert again.rel == "canonical"
    assert subscriber.wait_for(4)[3]["links"][0]["rel"] == "canonical"


def test_pasted_record_served_elsewhere(node, subscriber, monkeypatch) -> None:
    monkeypatch.delenv("WIS2_METADATA_DIR")
    monkeypatch.delenv("WIS2_METADATA_BASE_URL")
    record = Wcmp2Record.model_validate_json(DEMO.read_bytes())

    with pytest.raises(Exception, match="public_url"):
        publish_metadata(record=record)

    url = "https://www.example.org/argo/demo-metadata.json"
    result = publish_metadata(record=record, public_url=url)
    (msg,) = subscriber.wait_for(1)
    _assert_valid(msg)
    assert result.rel == "canonical" and result.served_path is None
    assert msg["links"][0]["href"] == url
    assert msg["links"][0]["length"] == len(record.to_bytes())
    assert msg["properties"]["integrity"]["value"] == _sha512_b64(record.to_bytes())
    assert msg["properties"]["datetime"] == "2026-11-27T00:00:00Z"  # properties.updated


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (
            lambda r: r.__setitem__("id", "urn:wmo:md:fr-ifremer-argo"),
            "identifier 'urn:wmo:md:fr-ifremer-argo'",
        ),
        (
            lambda r: r["links"][0].__setitem__(
                "channel", "origin/a/wis2/de-dwd/data/core/weather/surface-based-observations/synop"
            ),
            "channel 'origin/a/wis2/de-dwd/data/core/weather/surface-based-observations/synop'",
        ),
        (
            lambda r: r["links"][0].__setitem__(
                "channel", "origin/a/wis2/fr-ifremer-argo/data/core/not-a-discipline/x"
            ),
            "origin/a/wis2/fr-ifremer-argo/data/core/not-a-discipline/x",
        ),
    ],
    ids=["broken-identifier", "other-centre-channel", "invalid-channel"],
)
def test_invalid_record_fails_and_nothing_is_published(node, subscriber, change, named) -> None:
    record = json.loads(DEMO.read_text(encoding="utf-8"))
    change(record)
    state = publish_metadata(record=record, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception) as err:
        state.result()
    assert named in str(err.value), str(err.value)
    time.sleep(1.5)
    assert subscriber.messages == []
    assert not list(node["metadata"].glob("*")) if node["metadata"].exists() else True
    assert SqliteLedger.in_dir(node["results"]).all() == {}


def test_republish_sends_an_update_for_each_current_record(node, subscriber) -> None:
    demo = json.loads(DEMO.read_text(encoding="utf-8"))
    demo["id"] = "urn:wmo:md:fr-ifremer-argo:demo-profiles"
    publish_metadata(record_location=str(ARGO_METADATA))
    publish_metadata(record=demo)
    gone = dict(demo, id="urn:wmo:md:fr-ifremer-argo:withdrawn")
    publish_metadata(record=gone)
    publish_metadata(record_id=gone["id"], operation="delete")
    assert len(subscriber.wait_for(4)) == 4

    result = republish_metadata()
    messages = subscriber.wait_for(6)
    assert len(messages) == 6
    updates = messages[4:]
    for msg in updates:
        _assert_valid(msg)
        assert msg["links"][0]["rel"] == "update"
    assert {m["properties"]["metadata_id"] for m in updates} == {ARGO_ID, demo["id"]}
    assert {p.record_id for p in result.republished} == {ARGO_ID, demo["id"]}
    # still exactly the announced bytes on disk
    for msg in updates:
        name = msg["properties"]["metadata_id"] + ".json"
        data = (node["metadata"] / name).read_bytes()
        assert msg["links"][0]["length"] == len(data)
        assert msg["properties"]["integrity"]["value"] == _sha512_b64(data)
    time.sleep(1)
    assert len(subscriber.messages) == 6, "the deleted record is not republished"


def test_unreachable_broker_fails_the_run_and_records_nothing(node, monkeypatch) -> None:
    from chain.processes import free_port

    block = f"md-down-{uuid.uuid4().hex[:8]}"
    MqttBroker(host="127.0.0.1", port=free_port("127.0.0.1"), username="publisher").save(block)
    monkeypatch.setenv("WIS2_BROKER_BLOCK", block)
    monkeypatch.setenv("WIS2_PUBLISH_RETRIES", "0")
    state = publish_metadata(record_location=str(ARGO_METADATA), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="cannot reach broker"):
        state.result()
    assert SqliteLedger.in_dir(node["results"]).all() == {}, "only a successful publish is recorded"


def test_edited_record_is_an_update_then_its_withdrawal_stops_the_republication(
    node, subscriber
) -> None:
    """The three notifications of a record's life, in order: canonical, update (the edited
    record: new bytes, new integrity, a later pubtime), deletion (with the metadata_id); the
    daily republication then publishes nothing for it."""
    record = json.loads(DEMO.read_text(encoding="utf-8"))
    record["id"] = "urn:wmo:md:fr-ifremer-argo:edited"
    publish_metadata(record=record)
    edited = json.loads(json.dumps(record))
    edited["properties"]["title"] += " (corrected)"
    edited["properties"]["updated"] = "2026-12-01T00:00:00Z"
    publish_metadata(record=edited)
    publish_metadata(record_id=record["id"], operation="delete")
    messages = subscriber.wait_for(3)
    assert [m["links"][0]["rel"] for m in messages] == ["canonical", "update", "deletion"]
    for message in messages:
        _assert_valid(message)
        assert message["properties"]["metadata_id"] == record["id"]
    first, update, deletion = messages
    assert len({m["properties"]["data_id"] for m in messages}) == 1
    assert update["properties"]["integrity"] != first["properties"]["integrity"]
    assert update["properties"]["datetime"] == "2026-12-01T00:00:00Z"
    pubtimes = [datetime.fromisoformat(m["properties"]["pubtime"].replace("Z", "+00:00"))
                for m in messages]
    assert pubtimes == sorted(pubtimes) and len(set(pubtimes)) == 3
    assert "integrity" not in deletion["properties"]

    result = republish_metadata()
    assert result.republished == [] and result.failed == {}
    time.sleep(1)
    assert len(subscriber.messages) == 3, "a withdrawn record is not republished"


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The samples of /metrics as a Prometheus scrape reads them."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metadata_notifications_are_counted_in_the_flow_metrics(node, subscriber) -> None:
    """publish-metadata counts on the worker's /metrics as the data flows do: published,
    failed by reason (with the failed checks), and the run-to-PUBACK histogram; labelled with
    the record's centre and its dataset (the record's id here: no dataset description has it);
    the ledger keeps the PUBACK time the delivery monitor times the relays from."""
    server = serve_metrics("127.0.0.1", 0, FLOW_METRICS, "test")
    assert server is not None
    try:
        record = json.loads(DEMO.read_text(encoding="utf-8"))
        record["id"] = f"urn:wmo:md:fr-ifremer-argo:metrics-{uuid.uuid4().hex[:8]}"
        bad = json.loads(json.dumps(record))
        bad["id"] = record["id"] + "-bad"
        bad["links"][0]["channel"] = ("origin/a/wis2/de-dwd/data/core/weather/"
                                      "surface-based-observations/synop")
        ours = frozenset({("centre_id", "fr-ifremer-argo"), ("dataset", record["id"])})
        theirs = frozenset({("centre_id", "fr-ifremer-argo"), ("dataset", bad["id"])})
        before = scrape(server.port)

        first = publish_metadata(record=record)
        publish_metadata(record=record)  # an update: published again
        assert publish_metadata(record=bad, return_state=True).is_failed()
        subscriber.wait_for(2)
        after = scrape(server.port)
    finally:
        server.stop()

    def added(name: str, labels: frozenset[tuple[str, str]]) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    assert added("wis2_chain_notifications_published_total", ours) == 2
    assert added("wis2_chain_notifications_skipped_total", ours) == 0
    assert added("wis2_chain_event_to_puback_seconds_count", ours) == 2
    assert added("wis2_chain_notifications_failed_total",
                 theirs | {("reason", "validation")}) == 1
    assert added("wis2_chain_notifications_published_total", theirs) == 0
    checks = [dict(labels)["check"] for name, labels in after
              if name == "wis2_chain_validation_failures_total"
              and {("dataset", bad["id"])} <= labels]
    assert checks, "the failed checks of the record are counted"
    entry = SqliteLedger.in_dir(node["results"]).get(first.data_id)
    assert entry is not None
    puback_at = (entry.model_extra or {})["puback_at"]
    assert datetime.fromisoformat(puback_at).tzinfo is not None  # ISO UTC, milliseconds


def _claim_holders(url: str) -> list[int]:
    """The sessions of this flow's claims that hold an advisory lock (`PostgresLedger`)."""
    with psycopg.connect(url, autocommit=True) as conn:
        return [row[0] for row in conn.execute(
            "SELECT l.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted "
            "AND a.application_name = 'wis2-chain claim'").fetchall()]


def _waiting(url: str, locktype: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = %s AND NOT granted",
                           (locktype,)).fetchone()
    return int(row[0]) if row else 0


def _until(condition: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_a_claim_lost_with_the_ledgers_connection_is_confirmed_before_publishing(
        node, subscriber, monkeypatch, tmp_path: Path) -> None:
    """Issue 29: the run's claim of a record (a PostgreSQL advisory lock) dies with its
    connection while the run decides the relation (its read of the ledger held behind a table
    lock: made, not raced), and another run takes the record and records it meanwhile. Before
    publishing, the run confirms its claim: it waits for the other holder, reads the ledger
    again, finds the record published since and ends `Unavailable` (`ClaimLost`, scheduled
    again by the recovery) instead of announcing it as canonical a second time; its rerun
    announces an update."""
    if problem := postgres_problem():
        pytest.fail(f"PostgreSQL is needed (make postgresql): {problem}")
    with PostgresCluster(log_path=tmp_path / "postgres.log") as cluster:
        cluster.create_database("ledger")
        url = f"postgresql://{PG_USER}@{cluster.host}:{cluster.port}/ledger"
        monkeypatch.setenv("WIS2_LEDGER_URL", url)
        assert open_ledger(url).all() == {}  # its table created by the flows' ledger
        other = PostgresLedger(url)  # another run, on another host
        data_id = metadata_data_id("fr-ifremer-argo", ARGO_ID)
        states: list[Any] = []
        run = threading.Thread(target=contextvars.copy_context().run, args=(lambda: states.append(
            publish_metadata(record_location=str(ARGO_METADATA), return_state=True)),))
        with psycopg.connect(url) as locker:
            locker.execute("LOCK TABLE publications IN ACCESS EXCLUSIVE MODE")
            run.start()
            _until(lambda: _claim_holders(url) and _waiting(url, "relation"),
                   "the run did not claim the record and read the ledger")
            (holder,) = _claim_holders(url)
            locker.execute("SELECT pg_terminate_backend(%s)", (holder,))  # the claim is lost
            with other.claim([data_id], timeout=60):
                locker.commit()  # the run reads the ledger: never published, canonical
                _until(lambda: _waiting(url, "advisory"),
                       "the run did not confirm its claim before publishing")
                other.record(data_id, notification_id="another-run", rel="canonical",
                             pubtime="2025-08-20T14:00:00Z", kind="wcmp2-record")
        run.join(120)
        (state,) = states
        assert state.is_failed() and state.name == "Unavailable", state
        with pytest.raises(ClaimLost):
            state.result()
        assert subscriber.settle() == [], "published on a lost claim"

        rerun = publish_metadata(record_location=str(ARGO_METADATA))
        assert rerun.rel == "update"
        (message,) = subscriber.wait_for(1)
        assert message["links"][0]["rel"] == "update" and message["id"] == rerun.notification_id
        entry = open_ledger(url).get(data_id)
        assert entry is not None and entry.notification_id == rerun.notification_id
