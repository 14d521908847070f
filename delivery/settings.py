"""Settings of the delivery monitor: env vars `WIS2_DELIVERY_*` and `.env`.

The node's own broker (where the monitor reads what the chain published and sends redeliveries)
and the delivery records' place come from the chain's settings (`WIS2_MQTT_*`, the publisher
account; `WIS2_RESULTS_DIR` / `WIS2_LEDGER_URL`)."""

from __future__ import annotations

from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from chain.mqtt import MqttConnection
from wis2.topics import CENTRE_ID_PATTERN

SCHEMES = {"mqtts": ("tcp", True), "mqtt": ("tcp", False), "wss": ("websockets", True),
           "ws": ("websockets", False)}
DEFAULT_PORTS = {"mqtts": 8883, "mqtt": 1883, "wss": 443, "ws": 80}


class GlobalBroker(MqttConnection):
    """A watched Global Broker, from its URL."""

    name: str = Field(description="host:port, the `broker` label of the metrics and records")
    url: str = Field(description="The URL without credentials")


def global_broker(url: str, ca_certs: str | None = None,
                  client_id_prefix: str = "wis2-chain-delivery") -> GlobalBroker:
    """`mqtts://[user:password@]host[:port][/ws-path]`; no account: `everyone`/`everyone` (the
    WIS2 default). mqtts and wss verify the server's certificate (system CAs or `ca_certs`)."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise ValueError(f"{url!r}: a Global Broker URL is mqtts://host:port (or mqtt://, wss://, "
                         "ws://) with an optional user:password@")
    transport, tls = SCHEMES[parts.scheme]
    port = parts.port or DEFAULT_PORTS[parts.scheme]
    return GlobalBroker(
        host=parts.hostname, port=port, transport=transport, tls=tls,
        ws_path=parts.path or "/mqtt", ca_certs=ca_certs if tls else None,
        username=unquote(parts.username) if parts.username else "everyone",
        password=SecretStr(unquote(parts.password) if parts.password else "everyone"),
        client_id_prefix=client_id_prefix, name=f"{parts.hostname}:{port}",
        url=f"{parts.scheme}://{parts.hostname}:{port}{parts.path}",
    )


class DeliverySettings(BaseSettings):
    """Configuration of the delivery monitor (`WIS2_DELIVERY_*`)."""

    model_config = SettingsConfigDict(env_prefix="WIS2_DELIVERY_", env_file=".env",
                                      extra="ignore")

    centre_id: str = Field(
        pattern=CENTRE_ID_PATTERN,
        description="The node's WIS2 centre-id: the monitor watches origin/, cache/ and monitor/"
        "a/wis2/<centre-id>/# on each Global Broker")
    global_brokers: list[str] = Field(
        default_factory=list,
        description="Global Brokers to watch, a JSON list of URLs: mqtts://host:8883 (account "
        "everyone/everyone unless user:password@ is given; TLS verified); mqtt:// for tests")
    ca_certs: str | None = Field(
        default=None, description="CA bundle verifying the Global Brokers' certificates "
        "(unset: the system's)")
    client_id: str = Field(
        default="wis2-chain-delivery",
        description="Base of the monitor's MQTT client ids (fixed: each broker keeps its "
        "persistent session; one monitor per node)")
    session_expiry: int = Field(
        default=259200, ge=0,
        description="Seconds each broker keeps the monitor's session and queue while it is away")
    relay_timeout: float = Field(
        default=300.0, gt=0,
        description="Seconds after a (re)sending without a relay by any watched Broker before "
        "the notification is sent again")
    max_redeliveries: int = Field(
        default=3, ge=0,
        description="Times a notification is sent again (same id, same pubtime) before it is "
        "reported undelivered")
    not_relayed_window: float = Field(
        default=86400.0, gt=0,
        description="Seconds of publications the metric wis2_chain_not_relayed (undelivered per "
        "Global Broker) counts over")
    check_interval: float = Field(
        default=10.0, gt=0, description="Seconds between two checks for overdue notifications")
    metrics_host: str = Field(default="127.0.0.1", description="Address of /metrics, /healthz")
    metrics_port: int = Field(default=9466, ge=0, le=65535,
                              description="Port of /metrics and /healthz (0: any free port)")
    log_level: str = Field(default="INFO", description="Logging level")
    log_format: Literal["logfmt", "json"] = Field(default="logfmt", description="Log format")

    @field_validator("global_brokers")
    @classmethod
    def _urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            global_broker(url)
        return urls

    def brokers(self) -> list[GlobalBroker]:
        return [global_broker(url, self.ca_certs, self.client_id) for url in self.global_brokers]
