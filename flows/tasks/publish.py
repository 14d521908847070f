"""Task: publish one notification with MQTT 5 / QoS 1 and wait for the broker's PUBACK.

Cached by notification id: a notification the broker acknowledged is never sent twice (retried
runs, re-runs and redelivered events reuse the receipt). Connection failures and refusals are
retried with exponential backoff.
"""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import task
from prefect.logging import get_run_logger
from pydantic import BaseModel

from blocks.loading import load_block
from blocks.mqtt_broker import MqttBroker
from blocks.register import broker_block_from_settings
from chain.mqtt import MqttConnection, Publisher
from chain.settings import ChainSettings
from wis2.notification import Notification

from .caching import PUBLISH_CACHE


class BrokerReceipt(BaseModel):
    """The broker's acknowledgement (PUBACK) of one notification: the publish task's result."""

    notification_id: str
    data_id: str
    topic: str
    rel: str | None
    published_at: str  # when the PUBACK came (`puback_time`; seconds only before 2026-12)
    bytes: int


def puback_time() -> str:
    """Now, as the PUBACK time the chain records (ISO UTC, milliseconds)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def puback_extra(puback_at: str | None) -> dict[str, str]:
    """The ledger entry's extra field holding the PUBACK time of its notification, read by the
    delivery monitor (`delivery.monitor.ledger_puback_time`) to time the Global Brokers' relays."""
    return {"puback_at": puback_at} if puback_at else {}


PublishReceipt = BrokerReceipt  # its name until 2026-11: publish results cached then


def load_broker_connection(settings: ChainSettings) -> tuple[MqttConnection, str]:
    """The `MqttBroker` block named in the settings (else the WIS2_MQTT_* settings) and where
    the connection came from."""
    try:
        block = load_block(MqttBroker, settings.broker_block, settings.block_cache_seconds)
    except ValueError as exc:
        if "Unable to find block document" not in str(exc):
            raise
        return broker_block_from_settings(settings).connection(), "WIS2_MQTT_* settings"
    return block.connection(), f"block mqtt-broker/{settings.broker_block}"


@task(name="publish-notification", cache_policy=PUBLISH_CACHE, persist_result=True)
def publish_notification_task(
    notification: Notification, topic: str, connection: MqttConnection, timeout: float = 10.0
) -> BrokerReceipt:
    """Publish one notification (QoS 1) and return the receipt once the broker acknowledged it."""
    payload = notification.to_json().encode("utf-8")
    with Publisher(connection, timeout=timeout) as publisher:
        publisher.publish(topic, payload, qos=1)
    get_run_logger().info(
        "published %s on %s via %s", notification.id, topic, connection.describe()
    )
    return BrokerReceipt(
        notification_id=notification.id,
        data_id=notification.properties.data_id,
        topic=topic,
        rel=notification.rel,
        published_at=puback_time(),
        bytes=len(payload),
    )
