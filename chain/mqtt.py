"""MQTT client plumbing shared by the flows, the listener, the demo and the tests (paho-mqtt 2).

`MqttConnection` says how to reach a broker; `connect` opens an MQTT 5 session (falling back to
MQTT 3.1.1 when the broker refuses version 5); `Publisher` publishes with QoS 1 and waits for the
PUBACK, raising `PublishRefused` when the broker answers with a failure reason code.
"""

from __future__ import annotations

import logging
import ssl
import threading
import uuid
from typing import Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import BaseModel, Field, SecretStr

log = logging.getLogger(__name__)


class MqttConnection(BaseModel):
    """How to reach and log in to a broker. The password is a secret: never logged.

    The one definition of a broker connection: the `MqttBroker` block and the listener's settings
    are connections (they subclass it), `ChainSettings.mqtt` holds one."""

    host: str = Field(default="127.0.0.1", description="Broker host name or address")
    port: int = Field(default=1883, ge=1, le=65535, description="Broker port")
    transport: Literal["tcp", "websockets"] = Field(default="tcp", description="tcp or websockets")
    ws_path: str = Field(default="/mqtt", description="WebSocket path (websockets only)")
    tls: bool = Field(default=False, description="Use TLS")
    ca_certs: str | None = Field(default=None, description="CA bundle file for TLS")
    tls_insecure: bool = Field(default=False, description="Skip host name check (tests only)")
    username: str | None = Field(default=None, description="Account name")
    password: SecretStr | None = Field(default=None, description="Password of that account")
    client_id_prefix: str = Field(default="wis2-chain", description="MQTT client id prefix")
    keepalive: int = Field(default=60, description="Seconds between keep-alive pings")

    def connection(self) -> MqttConnection:
        """This connection as a plain `MqttConnection` (from a subclass: a block, settings)."""
        fields = set(MqttConnection.model_fields)
        return MqttConnection.model_validate(self.model_dump(include=fields))

    def describe(self) -> str:
        scheme = ("ws" if self.transport == "websockets" else "mqtt") + ("s" if self.tls else "")
        return f"{scheme}://{self.username or ''}@{self.host}:{self.port}"


class PublisherConnection(MqttConnection):
    """A connection of the chain's publishing account (the flows' default)."""

    username: str | None = Field(default="publisher", description="Account allowed to publish")


class MqttError(RuntimeError):
    """Connection or protocol failure."""


class PublishRefused(MqttError):
    """The broker answered a publish with a failure reason code (MQTT 5)."""

    def __init__(self, topic: str, reason: ReasonCode | int | str) -> None:
        self.topic = topic
        self.reason = str(reason)
        super().__init__(f"broker refused publish on {topic!r}: {self.reason}")


def new_client_id(conn: MqttConnection, role: str = "client") -> str:
    return f"{conn.client_id_prefix}-{role}-{uuid.uuid4().hex[:12]}"


def new_client(
    conn: MqttConnection,
    client_id: str | None = None,
    protocol: int = mqtt.MQTTv5,
) -> mqtt.Client:
    """A configured, not yet connected client (callback API version 2)."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id or new_client_id(conn),
        protocol=protocol,
        transport=conn.transport,
    )
    if conn.transport == "websockets":
        client.ws_set_options(path=conn.ws_path)
    if conn.tls:
        client.tls_set(ca_certs=conn.ca_certs, cert_reqs=ssl.CERT_REQUIRED)
        if conn.tls_insecure:
            client.tls_insecure_set(True)
    if conn.username:
        client.username_pw_set(
            conn.username, conn.password.get_secret_value() if conn.password else None
        )
    return client


def connect_properties(session_expiry: int) -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry
    return props


def connect(
    conn: MqttConnection,
    client_id: str | None = None,
    *,
    clean_start: bool = True,
    session_expiry: int = 0,
    timeout: float = 10.0,
    client: mqtt.Client | None = None,
) -> mqtt.Client:
    """Connect (MQTT 5, else 3.1.1), start the network loop and wait for a successful CONNACK."""
    client = client or new_client(conn, client_id)
    connected = threading.Event()
    outcome: dict[str, object] = {}

    previous_on_connect = client.on_connect

    def on_connect(c, userdata, flags, reason_code, properties):
        outcome["reason"] = reason_code
        connected.set()
        if previous_on_connect is not None:
            previous_on_connect(c, userdata, flags, reason_code, properties)

    client.on_connect = on_connect
    try:
        if client.protocol == mqtt.MQTTv5:
            client.connect(
                conn.host, conn.port, keepalive=conn.keepalive, clean_start=clean_start,
                properties=connect_properties(session_expiry),
            )
        else:
            client.connect(conn.host, conn.port, keepalive=conn.keepalive)
    except (OSError, ssl.SSLError) as exc:
        raise MqttError(f"cannot reach broker {conn.describe()}: {exc}") from exc
    client.loop_start()
    if not connected.wait(timeout):
        client.loop_stop()
        client.disconnect()
        raise MqttError(f"no CONNACK from {conn.describe()} within {timeout}s")
    client.on_connect = previous_on_connect
    reason = outcome["reason"]
    if getattr(reason, "is_failure", False):
        client.loop_stop()
        client.disconnect()
        raise MqttError(f"broker {conn.describe()} refused the connection: {reason}")
    return client


class Publisher:
    """A connected client that publishes and waits for each acknowledgement.

    Use as a context manager: ``with Publisher(conn) as pub: pub.publish(topic, payload)``.
    """

    def __init__(self, conn: MqttConnection, client_id: str | None = None, timeout: float = 10.0):
        self.conn = conn
        self.timeout = timeout
        self._acks: dict[int, ReasonCode | None] = {}
        self._cond = threading.Condition()
        self.client = new_client(conn, client_id or new_client_id(conn, "publisher"))
        self.client.on_publish = self._on_publish

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self._cond:
            self._acks[mid] = reason_code
            self._cond.notify_all()

    def __enter__(self) -> Publisher:
        connect(self.conn, client=self.client, timeout=self.timeout)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        """Publish and wait for PUBACK (QoS 1) or for the write (QoS 0)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise MqttError(f"publish on {topic!r} failed: {mqtt.error_string(info.rc)}")
        with self._cond:
            if not self._cond.wait_for(lambda: info.mid in self._acks, timeout=self.timeout):
                raise MqttError(f"no acknowledgement for publish on {topic!r} in {self.timeout}s")
            reason = self._acks.pop(info.mid)
        if reason is not None and getattr(reason, "is_failure", False):
            raise PublishRefused(topic, reason)
        log.debug("published on %s (qos %s)", topic, qos)


def publish_once(
    conn: MqttConnection, topic: str, payload: bytes | str, qos: int = 1, timeout: float = 10.0
) -> None:
    """Connect, publish one message, wait for its acknowledgement, disconnect."""
    with Publisher(conn, timeout=timeout) as publisher:
        publisher.publish(topic, payload, qos=qos)
