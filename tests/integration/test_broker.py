"""The node broker, as its clients see it: a real mosquitto with the rendered production config.

MQTT 5 is used wherever a refusal must be seen: mosquitto silently drops a forbidden publish from
an MQTT 3.1.1 client, but answers an MQTT 5 one with a "Not authorized" PUBACK. Each refusal is
also checked from the other side: a subscriber allowed to see the topic receives nothing.
Rendering the configuration and the settings alone: tests/unit/broker/test_launcher.py.
"""

from __future__ import annotations

import ipaddress
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from pydantic import SecretStr

from broker.launcher import (
    RunningBroker,
    render_config,
    start_broker,
)
from chain.mqtt import MqttConnection, MqttError, Publisher, PublishRefused, connect, new_client
from chain.processes import ManagedProcess, port_is_open
from tests.fixtures.broker import broker_test_config, self_signed

CENTRE = "fr-ifremer-argo"
ORIGIN = f"origin/a/wis2/{CENTRE}"
DATA_TOPIC = f"{ORIGIN}/data/core/ocean/surface-based-observations/drifting-ocean-profilers"
EVENT_TOPIC = "diffusion/files/argo/coriolis"


# ---------------------------------------------------------------------------------- helpers


@dataclass
class Subscriber:
    """A connected MQTT 5 client that collects what it receives."""

    client: mqtt.Client
    messages: queue.Queue[mqtt.MQTTMessage] = field(default_factory=queue.Queue)

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0) -> list[int]:
        """Subscribe and return the SUBACK reason codes (values)."""
        done = threading.Event()
        codes: list[int] = []

        def on_subscribe(client, userdata, mid, reason_codes, properties):
            codes.extend(rc.value for rc in reason_codes)
            done.set()

        self.client.on_subscribe = on_subscribe
        result, _mid = self.client.subscribe(topic, qos=qos)
        assert result == mqtt.MQTT_ERR_SUCCESS
        assert done.wait(timeout), f"no SUBACK for {topic}"
        return codes

    def get(self, timeout: float = 5.0) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def drain(self, quiet: float = 0.5) -> list[mqtt.MQTTMessage]:
        got = []
        while True:
            try:
                got.append(self.messages.get(timeout=quiet))
            except queue.Empty:
                return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def open_subscriber(
    conn: MqttConnection,
    client_id: str | None = None,
    *,
    clean_start: bool = True,
    session_expiry: int = 0,
) -> Subscriber:
    client = new_client(conn, client_id)
    sub = Subscriber(client)
    client.on_message = lambda c, u, msg: sub.messages.put(msg)
    connect(conn, client=client, clean_start=clean_start, session_expiry=session_expiry)
    return sub


@pytest.fixture
def subscribers() -> Iterator[list[Subscriber]]:
    opened: list[Subscriber] = []
    yield opened
    for sub in opened:
        sub.close()


def watch(subscribers: list[Subscriber], conn: MqttConnection, topic: str) -> Subscriber:
    sub = open_subscriber(conn)
    subscribers.append(sub)
    assert sub.subscribe(topic) == [1], f"{conn.username} should be allowed to read {topic}"
    return sub


def assert_refused_and_unseen(
    refused: MqttConnection, topic: str, witness: Subscriber, marker: MqttConnection,
    marker_topic: str,
) -> None:
    """`refused` gets Not authorized on `topic`; `witness` (allowed to read it) sees only the
    marker published afterwards by an allowed client."""
    with Publisher(refused) as pub, pytest.raises(PublishRefused) as info:
        pub.publish(topic, b"forbidden")
    assert "Not authorized" in info.value.reason
    with Publisher(marker) as pub:
        pub.publish(marker_topic, b"marker")
    first = witness.get()
    assert (first.topic, first.payload) == (marker_topic, b"marker")
    assert witness.drain(0.3) == []


# ----------------------------------------------------------------- listening addresses


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                raw = bytes.fromhex(address)
                # the kernel prints each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(str(ipaddress.ip_address(raw)) if len(raw) == width // 2 else address)
    return found


def test_every_listener_binds_to_the_configured_address_only(
    session_broker: RunningBroker,
) -> None:
    # mosquitto 2.0 binds a websockets listener to all interfaces unless socket_domain is set
    assert _listening_addresses(session_broker.port) == {"127.0.0.1"}
    assert _listening_addresses(session_broker.ws_port) == {"127.0.0.1"}


# --------------------------------------------------------------------- roles and ACLs


def test_event_flow_fileserver_to_listener(
    session_broker: RunningBroker, subscribers: list[Subscriber]
) -> None:
    listener = watch(subscribers, session_broker.connection("listener"), "diffusion/files/#")
    with Publisher(session_broker.connection("fileserver")) as pub:
        pub.publish(EVENT_TOPIC, b'{"specversion": "1.0"}')
    msg = listener.get()
    assert (msg.topic, msg.payload) == (EVENT_TOPIC, b'{"specversion": "1.0"}')


def test_publisher_reaches_everyone_and_reads_its_own_topics(
    session_broker: RunningBroker, subscribers: list[Subscriber]
) -> None:
    everyone = watch(subscribers, session_broker.connection("everyone"), "origin/a/wis2/#")
    own = watch(subscribers, session_broker.connection("publisher"), f"{ORIGIN}/#")
    with Publisher(session_broker.connection("publisher")) as pub:
        pub.publish(DATA_TOPIC, b"wnm")
        pub.publish(f"{ORIGIN}/metadata", b"metadata wnm")
    for sub in (everyone, own):
        got = {(m.topic, m.payload) for m in (sub.get(), sub.get())}
        assert got == {(DATA_TOPIC, b"wnm"), (f"{ORIGIN}/metadata", b"metadata wnm")}


def test_fileserver_cannot_publish_notifications(
    session_broker: RunningBroker, subscribers: list[Subscriber]
) -> None:
    everyone = watch(subscribers, session_broker.connection("everyone"), "origin/a/wis2/#")
    assert_refused_and_unseen(
        session_broker.connection("fileserver"), DATA_TOPIC, everyone,
        session_broker.connection("publisher"), DATA_TOPIC,
    )


def test_publisher_cannot_publish_events(
    session_broker: RunningBroker, subscribers: list[Subscriber]
) -> None:
    listener = watch(subscribers, session_broker.connection("listener"), "diffusion/files/#")
    assert_refused_and_unseen(
        session_broker.connection("publisher"), EVENT_TOPIC, listener,
        session_broker.connection("fileserver"), EVENT_TOPIC,
    )


def test_publisher_cannot_publish_for_another_centre(
    session_broker: RunningBroker, subscribers: list[Subscriber]
) -> None:
    everyone = watch(subscribers, session_broker.connection("everyone"), "origin/a/wis2/#")
    assert_refused_and_unseen(
        session_broker.connection("publisher"), "origin/a/wis2/de-dwd/data/core/weather", everyone,
        session_broker.connection("publisher"), DATA_TOPIC,
    )


def test_listener_cannot_publish_events(
    session_broker: RunningBroker, subscribers: list[Subscriber]
) -> None:
    listener = watch(subscribers, session_broker.connection("listener"), "diffusion/files/#")
    assert_refused_and_unseen(
        session_broker.connection("listener"), EVENT_TOPIC, listener,
        session_broker.connection("fileserver"), EVENT_TOPIC,
    )


@pytest.mark.parametrize("topic", [DATA_TOPIC, f"{ORIGIN}/metadata", EVENT_TOPIC, "anything"])
def test_everyone_cannot_publish_anywhere(
    session_broker: RunningBroker, subscribers: list[Subscriber], topic: str
) -> None:
    # The monitor account cannot read these topics, so the witness is a role that can.
    if topic.startswith("origin/"):
        witness = watch(subscribers, session_broker.connection("everyone"), "origin/a/wis2/#")
        marker, marker_topic = session_broker.connection("publisher"), DATA_TOPIC
    elif topic.startswith("diffusion/"):
        witness = watch(subscribers, session_broker.connection("listener"), "diffusion/files/#")
        marker, marker_topic = session_broker.connection("fileserver"), EVENT_TOPIC
    else:
        with Publisher(session_broker.connection("everyone")) as pub, pytest.raises(PublishRefused):
            pub.publish(topic, b"x")
        return
    assert_refused_and_unseen(
        session_broker.connection("everyone"), topic, witness, marker, marker_topic
    )


# Mosquitto's acl_file never refuses a SUBSCRIBE (SUBACK grants it, for MQTT 5 too): it filters
# delivery instead (eclipse-mosquitto/mosquitto#2042). So a forbidden subscription is checked by
# what matters: the subscriber receives nothing, while a control subscriber with rights does.
CONTROL = {"origin/": "everyone", "diffusion/": "listener", "$SYS/": "monitor"}
SOURCE = {"origin/": ("publisher", DATA_TOPIC), "diffusion/": ("fileserver", EVENT_TOPIC)}


@pytest.mark.parametrize(
    ("role", "subscription", "published", "delivered"),
    [
        ("everyone", "origin/a/wis2/#", DATA_TOPIC, True),
        ("everyone", f"{ORIGIN}/data/core/#", DATA_TOPIC, True),
        ("everyone", "#", DATA_TOPIC, True),
        ("everyone", "#", EVENT_TOPIC, False),
        ("everyone", "diffusion/files/#", EVENT_TOPIC, False),
        ("everyone", "$SYS/#", "$SYS/broker/version", False),
        ("listener", "diffusion/files/#", EVENT_TOPIC, True),
        ("listener", "origin/a/wis2/#", DATA_TOPIC, False),
        ("fileserver", "diffusion/files/#", EVENT_TOPIC, False),
        ("publisher", f"{ORIGIN}/#", DATA_TOPIC, True),
        ("publisher", "diffusion/files/#", EVENT_TOPIC, False),
        ("monitor", "$SYS/#", "$SYS/broker/version", True),
        ("monitor", "origin/a/wis2/#", DATA_TOPIC, False),
    ],
)
def test_subscribers_receive_only_what_the_acl_lets_them_read(
    session_broker: RunningBroker, subscribers: list[Subscriber],
    role: str, subscription: str, published: str, delivered: bool,
) -> None:
    prefix = next(p for p in CONTROL if published.startswith(p))
    subject = open_subscriber(session_broker.connection(role))  # type: ignore[arg-type]
    subscribers.append(subject)
    assert subject.subscribe(subscription) == [1]
    control = watch(subscribers, session_broker.connection(CONTROL[prefix]), published)
    if prefix in SOURCE:  # $SYS/broker/version is retained: both get it on subscribing
        source, topic = SOURCE[prefix]
        with Publisher(session_broker.connection(source)) as pub:  # type: ignore[arg-type]
            pub.publish(topic, b"payload")
    assert control.get(timeout=15).topic == published
    got = [m.topic for m in subject.drain(0.5)]
    if delivered:
        assert published in got
    else:
        assert got == [], f"{role} received {got}"


def test_monitor_reads_broker_statistics(
    session_broker: RunningBroker, subscribers: list[Subscriber]
) -> None:
    monitor = watch(subscribers, session_broker.connection("monitor"), "$SYS/broker/version")
    msg = monitor.get(timeout=15)
    assert b"mosquitto" in msg.payload


@pytest.mark.parametrize(
    "change",
    [
        {"password": SecretStr("wrong")},
        {"username": "nobody"},
        {"username": None, "password": None},
    ],
    ids=["wrong-password", "unknown-user", "anonymous"],
)
def test_bad_credentials_are_refused_at_connect(
    session_broker: RunningBroker, change: dict
) -> None:
    conn = session_broker.connection("publisher").model_copy(update=change)
    with pytest.raises(MqttError, match="refused the connection"):
        connect(conn, timeout=5)


# ------------------------------------------------------------------------ websockets


def test_websockets_publish_and_subscribe(
    session_broker: RunningBroker, subscribers: list[Subscriber]
) -> None:
    everyone = watch(
        subscribers, session_broker.connection("everyone", "websockets"), "origin/a/wis2/#"
    )
    with Publisher(session_broker.connection("publisher", "websockets")) as pub:
        pub.publish(DATA_TOPIC, b"over websockets")
        with pytest.raises(PublishRefused):
            pub.publish(EVENT_TOPIC, b"forbidden over websockets")
    msg = everyone.get()
    assert (msg.topic, msg.payload) == (DATA_TOPIC, b"over websockets")


# ------------------------------------------------------------------------ durability


def test_persistent_session_survives_a_broker_restart(mqtt_broker: RunningBroker) -> None:
    conn = mqtt_broker.connection("everyone")
    client_id = f"global-broker-{uuid.uuid4().hex[:8]}"
    sub = open_subscriber(conn, client_id, clean_start=False, session_expiry=3600)
    assert sub.subscribe("origin/a/wis2/#", qos=1) == [1]
    sub.close()

    with Publisher(mqtt_broker.connection("publisher")) as pub:
        for i in range(100):
            pub.publish(f"{DATA_TOPIC}/{i % 7}", f"event {i}".encode(), qos=1)

    mqtt_broker.restart()

    sub = open_subscriber(conn, client_id, clean_start=False, session_expiry=3600)
    try:
        received = [sub.get(timeout=10).payload.decode() for _ in range(100)]
        received += [m.payload.decode() for m in sub.drain(1.0)]
    finally:
        sub.close()
    assert sorted(received) == sorted(f"event {i}" for i in range(100))
    assert len(received) == 100, "a message was delivered twice"


def test_password_rotation_and_reload(mqtt_broker: RunningBroker) -> None:
    old = mqtt_broker.connection("publisher")
    rotated = mqtt_broker.config.model_copy(update={"publisher_password": SecretStr("rotated")})
    render_config(rotated, mqtt_broker.run_dir)
    mqtt_broker.reload()
    new = old.model_copy(update={"password": SecretStr("rotated")})
    deadline = time.monotonic() + 10
    while True:  # SIGHUP is handled asynchronously
        try:
            connect(new, timeout=5).disconnect()
            break
        except MqttError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    with pytest.raises(MqttError, match="refused the connection"):
        connect(old, timeout=5)
    # the other accounts are untouched
    connect(mqtt_broker.connection("fileserver"), timeout=5).disconnect()


# ------------------------------------------------------------------------------ TLS


@pytest.fixture
def tls_broker(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RunningBroker]:
    ca, cert, key = self_signed(tmp_path / "pki")
    broker = start_broker(
        broker_test_config(certfile=cert, keyfile=key, cafile=ca), tmp_path / "broker"
    )
    try:
        yield broker
    finally:
        broker.stop()
        if getattr(getattr(request.node, "rep_call", None), "failed", False):
            request.node.add_report_section("teardown", "broker log", broker.tail(80))


def test_tls_listeners(tls_broker: RunningBroker, subscribers: list[Subscriber]) -> None:
    assert tls_broker.tls_port is not None and tls_broker.wss_port is not None
    rendered = (tls_broker.run_dir / "mosquitto.conf").read_text()
    assert f"listener {tls_broker.tls_port} 127.0.0.1" in rendered
    assert _listening_addresses(tls_broker.tls_port) == {"127.0.0.1"}
    assert _listening_addresses(tls_broker.wss_port) == {"127.0.0.1"}

    everyone = watch(subscribers, tls_broker.connection("everyone", tls=True), "origin/a/wis2/#")
    with Publisher(tls_broker.connection("publisher", "websockets", tls=True)) as pub:
        pub.publish(DATA_TOPIC, b"over wss")
    msg = everyone.get()
    assert (msg.topic, msg.payload) == (DATA_TOPIC, b"over wss")


def test_tls_port_refuses_plain_mqtt(tls_broker: RunningBroker) -> None:
    assert tls_broker.tls_port is not None
    plain = tls_broker.connection("everyone").model_copy(update={"port": tls_broker.tls_port})
    with pytest.raises(MqttError):
        connect(plain, timeout=3)


def test_tls_client_without_the_ca_is_refused(tls_broker: RunningBroker) -> None:
    untrusting = tls_broker.connection("everyone", tls=True).model_copy(update={"ca_certs": None})
    with pytest.raises(MqttError):
        connect(untrusting, timeout=3)


# ------------------------------------------------------------------- wis2-broker command


def test_wis2_broker_command_renders_and_runs_mosquitto(tmp_path: Path) -> None:
    config = broker_test_config()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WIS2_BROKER_")}
    env.update(
        WIS2_BROKER_HOST="127.0.0.1",
        WIS2_BROKER_MQTT_PORT=str(config.mqtt_port),
        WIS2_BROKER_WS_PORT=str(config.ws_port),
        WIS2_BROKER_PUBLISHER_PASSWORD="pub-secret",
    )
    command = str(Path(sys.executable).with_name("wis2-broker"))
    run_dir = tmp_path / "run"

    rendered = subprocess.run(
        [command, "--run-dir", str(run_dir), "--render-only"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )
    assert rendered.returncode == 0, rendered.stderr
    assert rendered.stdout.strip() == str(run_dir / "mosquitto.conf")
    assert "WIS2_BROKER_FILESERVER_PASSWORD" in rendered.stderr  # warned: no password

    process = ManagedProcess(
        "wis2-broker", [command, "--run-dir", str(run_dir)], tmp_path / "wis2-broker.log",
        env=env, cwd=tmp_path, ready=lambda: port_is_open("127.0.0.1", config.mqtt_port),
    )
    process.start(timeout=30)
    try:
        publisher = MqttConnection(
            host="127.0.0.1", port=config.mqtt_port, username="publisher",
            password=SecretStr("pub-secret"),
        )
        connect(publisher, timeout=5).disconnect()
        fileserver = publisher.model_copy(update={"username": "fileserver"})
        with pytest.raises(MqttError, match="refused the connection"):
            connect(fileserver, timeout=5)
    finally:
        assert process.stop() == 0, process.tail()
    assert (run_dir / "data" / "mosquitto.db").is_file()
