"""Did WIS2 get it? The delivery monitor (a real `python -m delivery` process) against the node's
real broker, two Global Broker simulators (each a real mosquitto and a relay), a Global Cache and
a Catalogue simulator (tests/fixtures/wis2_global.py), and a real Prometheus scraping it.

The Brokers miss messages by data_id, never by timing: Broker A loses the 'missed' file for good
(away), Broker B loses its first copy (disconnected then) and relays the redelivery; nobody
relays the 'lost' file. The test publishes as the chain does (publisher account, QoS 1)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from broker.launcher import RunningBroker, start_broker
from chain.delivery_store import DeliveryStore, records_location
from chain.metrics import DeliveryMetrics
from chain.mqtt import MqttError, connect, publish_once
from chain.processes import ManagedProcess, free_port, port_is_open
from delivery.service import Session
from delivery.settings import global_broker
from localnode.postgres import PG_USER, PostgresCluster
from tests.fixtures.broker import TEST_CENTRE_ID, broker_test_config
from tests.fixtures.paths import DATA, REPO
from tests.fixtures.pki import self_signed
from tests.fixtures.wis2_global import (
    CatalogueSim,
    Collector,
    FileServer,
    GlobalBrokerSim,
    GlobalCacheSim,
    Prometheus,
    integrity_value,
    program,
)
from wis2.delivery import CACHE_MISMATCH, CACHE_NOT_EXPECTED, CACHED, RELAYED, UNDELIVERED
from wis2.metadata_notification import build_metadata_notification
from wis2.notification import rfc3339

pytestmark = pytest.mark.integration

CORE = f"origin/a/wis2/{TEST_CENTRE_ID}/data/core/ocean/surface-based-observations/" \
       "drifting-ocean-profilers"
RECOMMENDED = f"origin/a/wis2/{TEST_CENTRE_ID}/data/recommended/ocean/" \
              "surface-based-observations/drifting-ocean-profilers"
METADATA_ID = "urn:wmo:md:fr-ifremer-argo:cor:msg:argo"
RELAY_TIMEOUT = 4.0
DASHBOARD = REPO / "deploy" / "grafana" / "wis2-chain-dashboard.json"


def wait_for(what: str, condition: Callable[[], Any], timeout: float = 90.0) -> Any:
    """Poll `condition` until it is truthy (an upper bound, never a sleep the test relies on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def notification(name: str, files: FileServer, directory: Path) -> dict[str, Any]:
    data = f"profile {name}\n".encode()
    (directory / f"{name}.nc").write_bytes(data)
    return {
        "id": str(uuid.uuid4()),
        "conformsTo": ["http://wis.wmo.int/spec/wnm/1/conf/core"],
        "type": "Feature", "geometry": None,
        "properties": {
            "data_id": f"wis2/{TEST_CENTRE_ID}/data/core/argo/{name}.nc",
            "metadata_id": METADATA_ID, "pubtime": rfc3339(datetime.now(UTC)),
            "datetime": "2026-12-05T00:00:00Z",
            "integrity": {"method": "sha512", "value": integrity_value(data)}},
        "links": [{"href": f"{files.url}/{name}.nc", "rel": "canonical",
                   "type": "application/x-netcdf", "length": len(data)}],
    }


@contextmanager
def running_world(mqtt_broker: RunningBroker, tmp_path: Path,
                  ledger_url: str | None = None) -> Iterator[dict[str, Any]]:
    """The node's broker, two Global Brokers, a Cache, a Catalogue, the monitor, Prometheus;
    the delivery records beside the SQLite ledger of WIS2_RESULTS_DIR, or in the PostgreSQL
    database of `ledger_url` (WIS2_LEDGER_URL)."""
    started: list[Any] = []
    files_dir = tmp_path / "files"
    files_dir.mkdir()
    try:
        files = FileServer(files_dir)
        started.append(files)
        node_everyone = mqtt_broker.connection("everyone")
        gb_a = GlobalBrokerSim("gb-a", tmp_path, node_everyone).start(TEST_CENTRE_ID)
        started.append(gb_a)
        gb_b = GlobalBrokerSim("gb-b", tmp_path, node_everyone).start(TEST_CENTRE_ID)
        started.append(gb_b)
        cache = GlobalCacheSim("gc-sim.example.org", gb_a, [gb_a, gb_b], TEST_CENTRE_ID).start()
        started.append(cache)
        catalogue = CatalogueSim(gb_a, TEST_CENTRE_ID).start()
        started.append(catalogue)
        subscriber_b = Collector(gb_b, [f"origin/a/wis2/{TEST_CENTRE_ID}/#"])
        started.append(subscriber_b)
        subscriber_a = Collector(gb_a, [f"origin/a/wis2/{TEST_CENTRE_ID}/#"])
        started.append(subscriber_a)

        publisher = mqtt_broker.connection("publisher")
        metrics_port = free_port()
        results = tmp_path / "results"
        env = {
            "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
            "HOME": str(tmp_path),
            "WIS2_DELIVERY_CENTRE_ID": TEST_CENTRE_ID,
            "WIS2_DELIVERY_GLOBAL_BROKERS": json.dumps([gb_a.url, gb_b.url]),
            "WIS2_DELIVERY_RELAY_TIMEOUT": str(RELAY_TIMEOUT),
            "WIS2_DELIVERY_MAX_REDELIVERIES": "1",
            "WIS2_DELIVERY_CHECK_INTERVAL": "0.5",
            "WIS2_DELIVERY_METRICS_PORT": str(metrics_port),
            "WIS2_DELIVERY_CLIENT_ID": f"delivery-test-{uuid.uuid4().hex[:8]}",
            "WIS2_MQTT_HOST": publisher.host, "WIS2_MQTT_PORT": str(publisher.port),
            "WIS2_MQTT_USERNAME": "publisher",
            "WIS2_MQTT_PASSWORD": publisher.password.get_secret_value(),  # type: ignore[union-attr]
            "WIS2_RESULTS_DIR": str(results),
            "WIS2_DATASETS_DIR": str(DATA / "datasets"),
        }
        if ledger_url is not None:
            env["WIS2_LEDGER_URL"] = ledger_url
        monitor = ManagedProcess("delivery-monitor", [sys.executable, "-m", "delivery"],
                                 tmp_path / "delivery-monitor.log", env=env, cwd=tmp_path,
                                 ready=lambda: port_is_open("127.0.0.1", metrics_port))
        started.append(monitor)
        monitor.start(90)
        store = DeliveryStore(records_location(
            ledger_url or str(results / "publication-ledger.sqlite3")))
        # the monitor's three sessions are up: its health says so
        wait_for("the monitor connected to the three brokers",
                 lambda: all(health(metrics_port)["connected"].values()))
        prometheus = Prometheus(tmp_path / "prometheus", [f"127.0.0.1:{metrics_port}"]).start()
        started.append(prometheus)
        yield {"gb_a": gb_a, "gb_b": gb_b, "cache": cache, "catalogue": catalogue,
               "files": files, "files_dir": files_dir, "store": store, "monitor": monitor,
               "publish": lambda topic, message: publish_once(publisher, topic,
                                                              json.dumps(message)),
               "subscriber_a": subscriber_a, "subscriber_b": subscriber_b,
               "prometheus": prometheus, "env": env}
    finally:
        for part in reversed(started):
            part.stop()


@pytest.fixture
def world(mqtt_broker: RunningBroker, tmp_path: Path) -> Iterator[dict[str, Any]]:
    with running_world(mqtt_broker, tmp_path) as parts:
        yield parts


def health(port: int) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as answer:
            return json.load(answer)
    except urllib.error.HTTPError as exc:  # 503 while degraded: the same JSON
        return json.load(exc)


def dashboard_queries() -> dict[str, str]:
    """{panel title: its first query}, Grafana's variables set for this node."""
    panels = json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]
    return {panel["title"]: panel["targets"][0]["expr"]
            .replace("$centre_id", TEST_CENTRE_ID).replace("$dataset", ".*")
            .replace("$__rate_interval", "1m").replace("$__range", "1h")
            for panel in panels if panel.get("targets")}


def by_label(result: list[dict[str, Any]], label: str) -> dict[str, float]:
    return {series["metric"].get(label, ""): float(series["value"][1]) for series in result}


def test_relays_caches_reports_redelivery_and_undelivered(world: dict[str, Any]) -> None:
    store: DeliveryStore = world["store"]
    gb_a: GlobalBrokerSim = world["gb_a"]
    gb_b: GlobalBrokerSim = world["gb_b"]
    files, files_dir = world["files"], world["files_dir"]

    good = notification("good", files, files_dir)
    corrupt = notification("corrupt", files, files_dir)
    recommended = notification("recommended", files, files_dir)
    missed = notification("missed", files, files_dir)
    lost = notification("lost", files, files_dir)
    world["cache"].corrupt.add(corrupt["properties"]["data_id"])
    gb_a.miss_all.update({missed["properties"]["data_id"], lost["properties"]["data_id"]})
    gb_b.miss_first.add(missed["properties"]["data_id"])
    gb_b.miss_all.add(lost["properties"]["data_id"])
    record = json.loads((DATA / "demo-metadata.json").read_text(encoding="utf-8"))
    served = json.dumps(record).encode()
    metadata = build_metadata_notification(record, served, href=f"{files.url}/argo.json",
                                           rel="canonical").to_dict()

    for topic, message in ((CORE, good), (CORE, corrupt), (RECOMMENDED, recommended),
                           (f"origin/a/wis2/{TEST_CENTRE_ID}/metadata", metadata),
                           (CORE, missed), (CORE, lost)):
        world["publish"](topic, message)

    def state(message: dict[str, Any]) -> Any:
        """The message's record, once the monitor recorded it (it may be a moment behind)."""
        return wait_for(f"{message['id']} recorded", lambda: store.get(message["id"]))

    # relayed by both Brokers, cached by the Cache; the corrupt copy flagged
    for message in (good, corrupt, recommended, metadata):
        wait_for(f"{message['properties']['data_id']} relayed by both Brokers", lambda m=message:
                 len(store.events([m["id"]], "relay")) == 2)
        assert state(message).state == RELAYED
    wait_for("the cache copy of 'good'", lambda: state(good).cache_state == CACHED)
    wait_for("the corrupt cache copy flagged",
             lambda: state(corrupt).cache_state == CACHE_MISMATCH)
    assert state(recommended).cache_state == CACHE_NOT_EXPECTED
    cache_events = store.events([good["id"]], "cache")
    assert [e.source for e in cache_events] == ["gc-sim.example.org"]
    assert cache_events[0].detail["notification_id"] != good["id"]  # the Cache's own id
    wait_for("the Catalogue's report", lambda: store.events([metadata["id"]], "report"))

    # 'missed': lost by A for good and by B's first copy; sent again with the same id and
    # pubtime, B relays it to its subscriber; A (which saw it) does not
    relayed = wait_for("'missed' redelivered and relayed by B",
                       lambda: state(missed).state == RELAYED and state(missed))
    assert relayed.redeliveries == 1
    assert [e.source for e in store.events([missed["id"]], "relay")] == [
        f"127.0.0.1:{gb_b.mosquitto.port}"]
    got = wait_for("B's subscriber got 'missed'", lambda: [
        m for _t, m in world["subscriber_b"].messages if m["id"] == missed["id"]])
    assert got == [missed]  # the exact message: same id, same pubtime
    wait_for("both relays saw 'missed' twice", lambda: gb_a.seen.count(missed["id"]) == 2
             and gb_b.seen.count(missed["id"]) == 2)
    assert missed["id"] not in world["subscriber_a"].ids()  # A drops it: nothing in flight

    # 'lost': nobody relays it: sent again once, then undelivered
    undelivered = wait_for("'lost' undelivered", lambda: state(lost).state == UNDELIVERED
                           and state(lost))
    assert undelivered.redeliveries == 1 and undelivered.undelivered_at
    wait_for("A saw 'lost' twice", lambda: gb_a.seen.count(lost["id"]) == 2)

    # redeliveries so far: 'missed' and 'lost' once each; the others only on a machine so slow
    # that no relay came within RELAY_TIMEOUT (the Brokers then drop the repeated id)
    redelivered = sum(state(m).redeliveries for m in (good, corrupt, recommended, metadata,
                                                       missed, lost))

    # the operator's CLI
    done = subprocess.run([str(Path(sys.executable).with_name("wis2-chain")), "delivery",
                           "status", lost["properties"]["data_id"]], capture_output=True,
                          text=True, env=world["env"], timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "undelivered" in done.stdout and lost["id"] in done.stdout

    # the cause fixed (B accepts it now), the operator sends it again: the same message
    gb_b.miss_all.discard(lost["properties"]["data_id"])
    done = subprocess.run([str(Path(sys.executable).with_name("wis2-chain")), "delivery",
                           "resend", lost["properties"]["data_id"]], capture_output=True,
                          text=True, env=world["env"], timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    wait_for("'lost' relayed by B after the resend", lambda: state(lost).state == RELAYED)
    got = wait_for("B's subscriber got 'lost'", lambda: [
        m for _t, m in world["subscriber_b"].messages if m["id"] == lost["id"]])
    assert got == [lost]

    # the dashboard's queries, asked to a real Prometheus scraping the monitor
    queries = dashboard_queries()
    prometheus: Prometheus = world["prometheus"]
    broker_a, broker_b = (f"127.0.0.1:{gb.mosquitto.port}" for gb in (gb_a, gb_b))
    expected = {
        "Relayed per Global Broker": ("broker", {broker_a: 4.0, broker_b: 6.0}),
        "Not relayed per Global Broker": ("broker", {broker_a: 2.0, broker_b: 0.0}),
        "Cached per Global Cache": ("cache", {"gc-sim.example.org": 1.0}),
        "Cache integrity mismatches": ("cache", {"gc-sim.example.org": 1.0}),
        "Redelivered": ("dataset", {"argo": float(redelivered)}),
        "Undelivered": ("dataset", {"argo": 1.0}),  # a counter: given up once
        "Catalogue reports": ("dataset", {"argo": 1.0}),
    }
    for title, (label, values) in expected.items():
        wait_for(f"Prometheus: {title} = {values}",
                 lambda q=queries[title], lb=label, v=values: by_label(
                     prometheus.query(q), lb) == v)
    delays = wait_for("the relay delay histogram", lambda: by_label(prometheus.query(
        queries["Relays (delay histogram count)"]), "broker"))
    assert delays == {broker_a: 4.0, broker_b: 6.0}


def test_a_killed_monitor_gets_what_happened_meanwhile(world: dict[str, Any]) -> None:
    """SIGKILL the monitor; 5 notifications are published, relayed by both Brokers and cached
    while it is dead; restarted, its persistent sessions deliver the node's copies, the relays
    and the cache copies it missed: every record relayed by both and cached, each id reaching
    B's subscriber once. Before the kill, Broker A's relay of 'early' reached the monitor ahead
    of the node's own copy (which is published only once the monitor is dead): kept in the
    delivery store, the restarted monitor matches it with the node's copy."""
    store: DeliveryStore = world["store"]
    gb_a: GlobalBrokerSim = world["gb_a"]
    gb_b: GlobalBrokerSim = world["gb_b"]
    monitor: ManagedProcess = world["monitor"]
    files, files_dir = world["files"], world["files_dir"]
    first = notification("first", files, files_dir)
    world["publish"](CORE, first)
    wait_for("'first' relayed by both", lambda: len(store.events([first["id"]], "relay")) == 2)

    # 'early': A's relay is all the monitor will ever get of it from a Global Broker (the
    # simulators' relays of the node's copy miss it), and it comes before the node's copy
    early = notification("early", files, files_dir)
    gb_a.miss_all.add(early["properties"]["data_id"])
    gb_b.miss_all.add(early["properties"]["data_id"])
    publish_once(gb_a.connection("early-relay"), CORE, json.dumps(early))
    kept = wait_for("A's early relay kept in the delivery store", lambda: [
        e for e in store.early() if e.kind == "relay" and e.match_key == early["id"]])

    monitor.kill()
    world["publish"](CORE, early)  # the node's own copy, queued in the monitor's session
    during = [notification(f"during-{i}", files, files_dir) for i in range(5)]
    for message in during:
        world["publish"](CORE, message)
    ids = {m["id"] for m in during}
    data_ids = {m["properties"]["data_id"] for m in during}
    wait_for("both Brokers relayed the 5", lambda: ids <= set(gb_a.relayed) & set(gb_b.relayed))
    wait_for("the Cache cached the 5", lambda: data_ids <= set(world["cache"].cached))
    assert all(store.get(i) is None for i in ids)  # nothing recorded while dead

    monitor.start(90)
    for message in during:
        wait_for(f"{message['id']} relayed by both and cached", lambda m=message: (
            len(store.events([m["id"]], "relay")) == 2
            and store.get(m["id"]).cache_state == CACHED))  # type: ignore[union-attr]
    received = wait_for("B's subscriber got the 5", lambda: ids <= set(
        world["subscriber_b"].ids()) and world["subscriber_b"].ids())
    assert all(received.count(i) == 1 for i in ids)
    relays = wait_for("'early' recorded with A's early relay",
                      lambda: store.events([early["id"]], "relay"))
    assert [e.source for e in relays] == [f"127.0.0.1:{gb_a.mosquitto.port}"]
    assert relays[0].seen_at == kept[0].seen_at  # the relay received before the kill
    assert store.get(early["id"]).state == RELAYED  # type: ignore[union-attr]
    assert not [e for e in store.early() if e.match_key == early["id"]]


def test_the_monitor_records_into_postgresql(mqtt_broker: RunningBroker, tmp_path: Path,
                                             postgres_cluster: PostgresCluster) -> None:
    """WIS2_LEDGER_URL set: the monitor keeps its records in the ledger's PostgreSQL database
    (none in SQLite), and `wis2-chain delivery status` reads them there."""
    postgres_cluster.create_database("delivery_monitor")
    url = (f"postgresql://{PG_USER}@{postgres_cluster.host}:{postgres_cluster.port}/"
           "delivery_monitor")
    with running_world(mqtt_broker, tmp_path, ledger_url=url) as world:
        store: DeliveryStore = world["store"]
        assert store.location == url
        good = notification("good", world["files"], world["files_dir"])
        world["publish"](CORE, good)
        wait_for("'good' relayed by both Brokers and cached", lambda: (
            len(store.events([good["id"]], "relay")) == 2
            and store.get(good["id"]).cache_state == CACHED))  # type: ignore[union-attr]
        done = subprocess.run([str(Path(sys.executable).with_name("wis2-chain")), "delivery",
                               "status", good["properties"]["data_id"]], capture_output=True,
                              text=True, env=world["env"], timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0].startswith(f"{good['id']}  {RELAYED}  cache: {CACHED}")
        sources = {line.split()[1] for line in lines[2:]
                   if line.split()[0] in ("relay", "cache")}
        assert sources == {f"127.0.0.1:{world['gb_a'].mosquitto.port}",
                           f"127.0.0.1:{world['gb_b'].mosquitto.port}", "gc-sim.example.org"}
        assert not list((tmp_path / "results").glob("*.sqlite3"))  # nothing beside


def test_global_brokers_over_verified_tls(tmp_path: Path) -> None:
    """mqtts:// Global Brokers: the certificate is verified (the given CA, else the system's),
    the `everyone` account is the default, and the session receives what the Broker relays."""
    ca, cert, key = self_signed(tmp_path / "pki")
    other_ca, _cert, _key = self_signed(tmp_path / "other-pki")
    broker = start_broker(broker_test_config(certfile=cert, keyfile=key, cafile=ca),
                          tmp_path / "broker")
    stop = threading.Event()
    session = None
    try:
        url = f"mqtts://localhost:{broker.tls_port}"
        for refused in (global_broker(url), global_broker(url, ca_certs=str(other_ca))):
            with pytest.raises(MqttError, match="certificate verify failed"):
                connect(refused.connection())
        got: list[str] = []
        watched = global_broker(url, ca_certs=str(ca), client_id_prefix="tls-test")
        session = Session(watched.name, watched.connection(), f"tls-test-{uuid.uuid4().hex[:8]}",
                          [f"origin/a/wis2/{TEST_CENTRE_ID}/#"],
                          lambda topic, _payload: got.append(topic), 60, DeliveryMetrics())
        session.start(stop)
        wait_for("the TLS session", lambda: session.connected)
        # published until one arrives: the subscription follows the connection
        wait_for("a message over TLS", lambda: publish_once(
            broker.connection("publisher"), CORE, b"{}") or got)
        assert set(got) == {CORE}
    finally:
        stop.set()
        if session is not None:
            session.stop()
        broker.stop()


def test_the_scrape_configuration_is_valid_for_prometheus() -> None:
    """deploy/prometheus/prometheus.yml as Debian's promtool reads it."""
    done = subprocess.run([program("promtool"), "check", "config",
                           str(REPO / "deploy" / "prometheus" / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
