"""compose.yml brought up for real on a Docker Engine (issue 23): the README's commands, the
demo over MQTTS, the UI behind TLS, the bundle volume, container faults and an upgrade in place.

The images compose.yml names come from Docker Hub, which this machine cannot reach: the test
runs stand-ins built from Debian (deploy/standins/, tagged with the same names) and the chain's
own image from the project Dockerfile; the official images themselves are never pulled here.
One node (one compose project) serves every test of this file, in order; each fault scenario
has its own events. Where no Docker Engine can run, every test here is skipped with the reason.

Fault scenarios: a burst of BURST distinct events whose files the gated `demo-files` service
holds (flow runs provably in flight), one container fault, then every notification counted on
MQTTS by an `everyone` subscriber that checks the broker's certificate.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.collect import Collector
from bench.events import BenchEvent, EventFactory
from bench.faults import wait_for_broker_save
from bench.intake import read_counters
from chain.failures import UNAVAILABLE
from chain.mqtt import Publisher, publish_once
from tests.fixtures.broker import TEST_CENTRE_ID
from tests.fixtures.compose_node import FILES_PORT, ComposeNode, docker, wait
from tests.fixtures.docker_engine import build_images, docker_engine
from tests.fixtures.paths import REPO
from wis2.dataset import load_dataset

# The first test also builds the images (minutes on a fresh machine) and starts the node.
pytestmark = pytest.mark.timeout(1800)

BURST = 200
EVENT_TOPIC = "diffusion/files/coriolis/argo/csv"
DELIVERY_TIMEOUT = 420  # upper bound for a burst after a fault (a slow, shared machine)
RESULTS = REPO / "run" / "test-output" / "compose-faults.json"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeNode]:
    work = tmp_path_factory.mktemp("compose")
    with docker_engine(work):
        started = time.monotonic()
        build_images(work / "build.log")
        built = time.monotonic()
        compose_node = ComposeNode(work / "node")
        try:
            # README: `docker compose up -d` (docker-compose 1.29 here)
            compose_node.compose("up", "-d", timeout=900)
            compose_node.timings = {"build_s": round(built - started, 1),
                                    "up_s": round(time.monotonic() - built, 1)}
            yield compose_node
        finally:
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            (RESULTS.parent / "compose-node.log").write_text(compose_node.logs(tail=2000))
            compose_node.compose("--profile", "demo", "down", "-v", "--remove-orphans",
                                 timeout=600, check=False)


@pytest.fixture(scope="module")
def collector(node: ComposeNode) -> Iterator[Collector]:
    """Everything on origin/a/wis2/<centre-id>/# (data and metadata), over MQTTS as everyone."""
    collecting = Collector(node.everyone(), TEST_CENTRE_ID)
    collecting.topic = f"origin/a/wis2/{TEST_CENTRE_ID}/#"
    with collecting:
        yield collecting


@pytest.fixture(scope="module")
def factory() -> EventFactory:
    return EventFactory(load_dataset("argo"), tag=f"c{time.time_ns() % 10**8}", files_url=f"http://demo-files:{FILES_PORT}",
                        real_files=True)


@pytest.fixture(scope="module")
def figures() -> dict[str, Any]:
    return {}


def report(request: pytest.FixtureRequest, figures: dict[str, Any], name: str,
           result: dict[str, Any]) -> None:
    """The scenario's figures: in the test output, and in RESULTS as they come."""
    figures[name] = result
    request.node.user_properties.append(("compose figures", f"{name}: {json.dumps(result)}"))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")


# ---- the README's commands --------------------------------------------------------------------
def test_readme_commands_publish_the_sample_over_mqtts(
    node: ComposeNode, collector: Collector, request: pytest.FixtureRequest,
    figures: dict[str, Any],
) -> None:
    """`docker compose up -d` (the fixture), then the demo command: the WCMP2 record, then the
    sample event whose file the demo-files service serves; both received on 8883 as everyone
    (certificate checked) and valid for the simulated Global Broker."""
    started = time.monotonic()
    node.compose("--profile", "demo", "run", "--rm", "argo-event-diffusion", timeout=600)
    wait("the sample's notification on MQTTS", lambda: _demo_ids(collector)[1], 300,
         lambda: node.logs("prefect-worker", "prefect-worker-2", "listener", "listener-2"))
    metadata, data = _demo_ids(collector)
    assert metadata, "no metadata notification"
    assert collector.first_arrival(metadata[0]) < collector.first_arrival(data[0])
    wait("the Global Broker's validation of both", lambda: len(
        [r for r in node.global_broker_records() if r["valid"]]) >= 2, 60,
        lambda: node.logs("wis2-global-broker"))
    records = node.global_broker_records()
    assert any(r["topic"].endswith("/metadata") and r["valid"] for r in records), records
    sample = [r for r in records if "D6990001_001" in json.dumps(r["message"])]
    assert sample and all(r["valid"] for r in sample), sample
    (link,) = [x for x in sample[0]["message"]["links"] if x["rel"] == "canonical"]
    assert link["href"].startswith(f"http://demo-files:{FILES_PORT}/files/")
    report(request, figures, "startup", {**node.timings,
                                         "demo_s": round(time.monotonic() - started, 1)})


def test_the_delivery_monitor_records_the_demo_in_postgresql(
    node: ComposeNode, collector: Collector,
) -> None:
    """The delivery-monitor service saw both demo notifications on the node's broker (its
    metrics on the published loopback port), recorded them in the ledger's PostgreSQL, and
    `wis2-chain delivery status` in its container tells an operator about the sample."""
    metadata, data = _demo_ids(collector)
    assert metadata and data

    def recorded() -> float:
        text = httpx.get(node.delivery_metrics_url, timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("wis2_chain_delivery_recorded_total{"))

    wait("the monitor records both notifications", lambda: recorded() >= 2, 120,
         lambda: node.logs("delivery-monitor"))
    rows = node.compose("exec", "-T", "postgres", "psql", "-U", "prefect", "-d", "ledger", "-Atc",
                        "SELECT data_id FROM deliveries").stdout.split()
    assert data[0] in rows and metadata[0] in rows, rows
    status = node.compose("exec", "-T", "delivery-monitor", "wis2-chain", "delivery", "status",
                          data[0]).stdout
    assert f"topic origin/a/wis2/{TEST_CENTRE_ID}/data/" in status, status


def _demo_ids(collector: Collector) -> tuple[list[str], list[str]]:
    with collector._lock:
        ids = list(collector.arrivals)
    return [i for i in ids if "/metadata/" in i], [i for i in ids if "D6990001" in i]


def test_the_ui_answers_over_tls_and_asks_for_the_login(node: ComposeNode) -> None:
    with httpx.Client(base_url=node.ui_url, verify=str(node.ca), timeout=30) as ui:
        assert ui.get("/api/health").status_code == 200
        assert ui.post("/api/flow_runs/filter", json={"limit": 1}).status_code == 401
        user, password = node.env["PREFECT_AUTH_STRING"].split(":", 1)
        assert ui.post("/api/flow_runs/filter", json={"limit": 1},
                       auth=(user, password)).status_code == 200
        page = ui.get("/")
        assert page.status_code == 200 and "<html" in page.text.lower()
    # plain HTTP on that port: nginx's "plain HTTP request was sent to HTTPS port"
    plain = httpx.get(node.ui_url.replace("https", "http") + "/api/health", timeout=10)
    assert plain.status_code == 400 and "HTTPS" in plain.text


def test_bundles_come_from_the_mounted_directory_else_online(node: ComposeNode) -> None:
    for service in ("prefect-worker", "prefect-worker-2", "wis2-global-broker"):
        assert "WIS2 bundles installed from /bundles" in node.logs(service, tail=5000), service
    # WIS2_BUNDLE_DIR unset: nothing mounted there, the online syncs are tried (no network for
    # this container: they fail, naming the setting)
    done = docker_run("--network", "none", "wis2-chain:0.1.0",
                      "wis2-chain", "bundles", "install", "--from-if-present", "/bundles")
    assert done.returncode == 1
    assert "online bundle sync failed" in done.stderr and "WIS2_BUNDLE_DIR" in done.stderr


def docker_run(*args: str) -> subprocess.CompletedProcess[str]:
    return docker_run_quiet("run", "--rm", *args)


def docker_run_quiet(*args: str) -> subprocess.CompletedProcess[str]:
    """`docker <args>`, its outcome returned (not checked)."""
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=300,
                          check=False)


# ---- faults ------------------------------------------------------------------------------------
def publish(node: ComposeNode, events: list[BenchEvent]) -> None:
    """As the data centre's file server, over MQTTS: QoS 1, each acknowledged."""
    with Publisher(node.fileserver()) as pub:
        for event in events:
            pub.publish(EVENT_TOPIC, event.payload, qos=1)


def worker_ip(node: ComposeNode, service: str) -> str:
    return node.inspect(service, "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}")


def burst_in_flight(node: ComposeNode, factory: EventFactory, phase: str,
                    only: str | None = None) -> list[BenchEvent]:
    """BURST events published with the gate closed, every one acknowledged by a listener (in
    a flow run), and downloads held at the gate; with `only`, the other worker is paused while
    the runs are taken, so that `only` holds them all."""
    events = factory.batch(phase, BURST)
    before = read_counters(node.metrics_urls())
    paused = None
    if only is not None:
        paused = "prefect-worker-2" if only == "prefect-worker" else "prefect-worker"
        docker("pause", node.container(paused))
    node.close_gate()
    try:
        publish(node, events)
        wait("the listeners acknowledge the burst", lambda: (
            c := read_counters(node.metrics_urls())).received - before.received >= BURST
            and c.in_flight == 0, 600, lambda: node.logs("listener", "listener-2"))
        if only is None:
            wait("downloads held at the gate", lambda: node.gate()["held"] >= 1, 600)
        else:
            address = worker_ip(node, only)
            wait(f"{only} holds downloads at the gate",
                 lambda: node.gate()["held_by"].get(address, 0) >= 1, 600,
                 lambda: json.dumps(node.gate()) + node.logs(only))
    finally:
        if paused is not None:
            docker("unpause", node.container(paused))
    return events


def count(node: ComposeNode, collector: Collector, events: list[BenchEvent], fault_at: float,
          settle: float = 5.0) -> dict[str, Any]:
    """Lost / files with a second message id / repeats of one id / recovery (the last
    notification, counted from the fault: the kill, the cut), once every event arrived, or every
    flow run of the events ended (what is missing then stays missing), or the deadline."""
    data_ids = [e.data_id for e in events]
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while not collector.wait_for(data_ids, min(deadline, time.monotonic() + 15)):
        if time.monotonic() >= deadline or runs_finished(node, events):
            break
    time.sleep(settle)  # a second message would come right after
    arrivals = [t for t in map(collector.first_arrival, data_ids) if t is not None]
    second_ids = repeats = 0
    for data_id in data_ids:
        copies, distinct = collector.copies(data_id)
        second_ids += distinct > 1
        repeats += copies - distinct
    lost = len(events) - len(arrivals)
    left_failed = failed_runs(node, events)
    wall_fault = time.time() - (time.monotonic() - fault_at)
    return {"events": len(events), "lost": lost, "second_ids": second_ids, "repeats": repeats,
            "recovery_s": None if lost or not arrivals else round(max(arrivals) - wall_fault, 1),
            "runs_failed": left_failed}


def check(result: dict[str, Any]) -> None:
    assert result["lost"] == 0 and result["second_ids"] == 0 and not result["runs_failed"], result


def crash_and_count(node: ComposeNode, collector: Collector, factory: EventFactory,
                    service: str, phase: str, only: str | None = None) -> dict[str, Any]:
    events = burst_in_flight(node, factory, phase, only)
    held = node.gate()["held"]
    restarts = node.restart_count(service)
    node.crash(service)
    killed_at = time.monotonic()
    node.open_gate()
    back_at = wait(f"{service} restarted by Docker", lambda: node.restarted(service, restarts)
                   and (service not in HEALTHCHECKED or node.healthy(service)), 900,
                   lambda: node.logs(service))
    result = count(node, collector, events, killed_at)
    result.update(held_downloads=held, down_s=round(back_at - killed_at, 1))
    return result


# Back once healthy (they answer again); a worker is back once running (its setup, then its
# recovery of the runs of its name, are part of the recovery time).
HEALTHCHECKED = ("postgres", "redis", "prefect-server")


@pytest.mark.parametrize(("service", "only"), [
    ("prefect-worker", "prefect-worker"),  # it holds every run of the burst
    ("prefect-server", None),
    ("postgres", None),
    ("redis", None),
])
def test_crash_mid_burst(node: ComposeNode, collector: Collector, factory: EventFactory,
                         service: str, only: str | None, request: pytest.FixtureRequest,
                         figures: dict[str, Any]) -> None:
    """The container's main process SIGKILLed with the burst's runs held at the gate, the gate
    opened at once: every event published, no file with a second message id."""
    result = crash_and_count(node, collector, factory, service, service, only)
    report(request, figures, f"{service} SIGKILL", result)
    check(result)


def test_broker_crash_with_the_listeners_away(
    node: ComposeNode, collector: Collector, factory: EventFactory,
    request: pytest.FixtureRequest, figures: dict[str, Any],
) -> None:
    """The listeners stopped; the burst acknowledged by the broker (queued in their persistent
    sessions) and saved to its database; mosquitto SIGKILLed, restarted by Docker; the
    listeners started again."""
    events = factory.batch("broker", BURST)
    node.compose("stop", "listener", "listener-2")
    publish(node, events)
    acked = time.monotonic()
    volume = json.loads(docker("volume", "inspect", f"{node.project}_broker-run"))[0]
    saved = wait_for_broker_save(Path(volume["Mountpoint"]) / "data" / "mosquitto.db",
                                 events[-1].name.encode(), 60)
    assert saved is not None, "mosquitto never saved the last event it acknowledged"
    restarts = node.restart_count("mosquitto")
    node.crash("mosquitto")
    killed_at = time.monotonic()
    wait("mosquitto restarted by Docker", lambda: node.restarted("mosquitto", restarts), 120,
         lambda: node.logs("mosquitto"))
    resubscribed(node, collector)
    node.compose("start", "listener", "listener-2")
    back_at = time.monotonic()
    result = count(node, collector, events, killed_at)
    result.update(saved_after_ack_s=round(saved - acked, 2), down_s=round(back_at - killed_at, 1))
    report(request, figures, "mosquitto SIGKILL, listeners away", result)
    check(result)


def resubscribed(node: ComposeNode, collector: Collector) -> None:
    """The collector's subscription is back: a probe published on its topic reaches it."""
    probe = f"probe-{time.time_ns()}"
    payload = json.dumps({"id": probe, "properties": {"data_id": probe}})
    topic = f"origin/a/wis2/{TEST_CENTRE_ID}/data/core/probe"

    def seen() -> bool:
        if collector.first_arrival(probe) is None:
            publish_once(node.publisher(), topic, payload, qos=1)
            time.sleep(1)
        return collector.first_arrival(probe) is not None

    wait("the MQTTS subscriber is back", seen, 120)


def test_network_partition_of_a_worker_host(
    node: ComposeNode, collector: Collector, factory: EventFactory,
    request: pytest.FixtureRequest, figures: dict[str, Any],
) -> None:
    """prefect-worker-2 holds every run of the burst at the gate; it is cut off the compose
    network for 60 s (`docker network disconnect`), the gate opens, then it is connected
    again: its stranded runs are recovered by the other worker, its claims and results do not
    let a second message id through."""
    events = burst_in_flight(node, factory, "partition", only="prefect-worker-2")
    held = node.gate()["held"]
    worker = node.container("prefect-worker-2")
    docker("network", "disconnect", node.network, worker)
    cut_at = time.monotonic()
    node.open_gate()
    time.sleep(60)  # the partition's length, not a wait for something
    docker("network", "connect", node.network, worker)
    back_at = time.monotonic()
    result = count(node, collector, events, cut_at, settle=10)
    result.update(held_downloads=held, partition_s=round(back_at - cut_at, 1))
    report(request, figures, "prefect-worker-2 network partition 60 s", result)
    check(result)


def test_upgrade_in_place(node: ComposeNode, collector: Collector, factory: EventFactory,
                          request: pytest.FixtureRequest, figures: dict[str, Any]) -> None:
    """A new chain image and `docker compose up -d` over the same volumes: the files already
    published (announced again by new events) give nothing, new files are published."""
    old_image = docker("image", "inspect", "-f", "{{.Id}}", "wis2-chain:0.1.0").strip()
    started = time.monotonic()
    build_images(node.work / "upgrade-build.log", "--label", f"wis2.test.build={time.time_ns()}")
    assert docker("image", "inspect", "-f", "{{.Id}}", "wis2-chain:0.1.0").strip() != old_image
    node.compose("up", "-d", timeout=900)
    docker_run_quiet("rmi", old_image)  # replaced: no container uses it any more
    wait("prefect-worker deployed again", lambda: node.healthy("prefect-worker"), 300)
    upgraded_s = round(time.monotonic() - started, 1)
    again = [factory.make("prefect-worker", n) for n in range(20)]  # new event ids, same files
    new = factory.batch("upgrade", 20)
    copies_before = {e.data_id: collector.copies(e.data_id)[0] for e in again}
    assert all(copies_before.values())
    before = read_counters(node.metrics_urls())
    publish(node, again + new)
    wait("the listeners acknowledge the events", lambda: (
        c := read_counters(node.metrics_urls())).received - before.received >= len(again + new)
        and c.in_flight == 0, 600, lambda: node.logs("listener", "listener-2"))
    result = count(node, collector, new, time.monotonic())
    wait("every run of the replayed events finished", lambda: runs_finished(node, again), 300)
    time.sleep(3)
    republished = sum(collector.copies(e.data_id)[0] > copies_before[e.data_id] for e in again)
    result["published_s"] = result.pop("recovery_s")  # from the listeners' acknowledgement
    result.update(upgrade_s=upgraded_s, announced_again=republished)
    report(request, figures, "upgrade in place", result)
    assert result["lost"] == 0 and republished == 0 and not result["runs_failed"], result


def event_runs(node: ComposeNode, events: list[BenchEvent]) -> list[dict[str, Any]] | None:
    """The flow runs handling one of `events` (by event id); None while the API is away."""
    wanted = {json.loads(e.payload)["id"] for e in events}
    user, password = node.env["PREFECT_AUTH_STRING"].split(":", 1)
    try:
        with httpx.Client(base_url=node.ui_url, verify=str(node.ca), auth=(user, password),
                          timeout=30) as api:
            answer = api.post("/api/flow_runs/filter", json={
                "sort": "EXPECTED_START_TIME_DESC", "limit": 200})
            answer.raise_for_status()
            runs = answer.json()
    except httpx.HTTPError:  # the server being restarted
        return None
    return [run for run in runs if run_event_ids(run) & wanted]


def run_event_ids(run: dict[str, Any]) -> set[str]:
    parameters = run.get("parameters") or {}
    return {e.get("id") for e in parameters.get("events") or [parameters.get("event") or {}]}


def runs_finished(node: ComposeNode, events: list[BenchEvent]) -> bool:
    """Every flow run handling one of `events` is in a final state: not an `Unavailable`
    failure, which the workers' recovery reschedules (chain/failures.py)."""
    runs = event_runs(node, events)
    if runs is None:
        return False
    wanted = {json.loads(e.payload)["id"] for e in events}
    for run in runs:
        if run["state_type"] not in FINAL or run["state_name"] == UNAVAILABLE:
            return False
    return set().union(*map(run_event_ids, runs)) >= wanted


FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def failed_runs(node: ComposeNode, events: list[BenchEvent]) -> list[str]:
    """Once every run of `events` is final: those left Failed, Crashed or Cancelled (what an
    operator would have to replay), as "name: state"."""
    wait("every run of the burst final", lambda: runs_finished(node, events), 300)
    runs = event_runs(node, events) or []
    return [f"{run['name']}: {run['state_name']}" for run in runs
            if run["state_type"] != "COMPLETED"]


def test_workers_racing_for_a_run_is_harmless(
    node: ComposeNode, request: pytest.FixtureRequest, figures: dict[str, Any]
) -> None:
    """Both workers poll the pool; when both take the same Scheduled run, the server lets one
    set it Pending and refuses the other ("Aborted submission ... PENDING state cannot
    transition to a PENDING state"): the loser drops it. Seen here after the bursts above, and
    no scenario published a second message id for a file."""
    logs = node.logs("prefect-worker", "prefect-worker-2", tail=100000)
    aborted = logs.count("Aborted submission")
    report(request, figures, "workers racing", {"aborted_submissions": aborted})
    errors = [line for line in logs.splitlines()
              if "Aborted submission" in line and "PENDING" not in line]
    assert not errors, errors[:5]
