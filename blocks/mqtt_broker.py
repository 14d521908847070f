"""`MqttBroker` block: how the flows reach the node's MQTT broker (credentials kept as a secret).

The block is a `chain.mqtt.PublisherConnection` (the fields are defined there once)."""

from __future__ import annotations

from prefect.blocks.core import Block

from chain.mqtt import MqttConnection, PublisherConnection


class MqttBroker(Block, PublisherConnection):
    """The MQTT broker the chain publishes WIS2 notifications on (MQTT 5, QoS 1)."""

    _block_type_name = "MQTT Broker"
    _block_type_slug = "mqtt-broker"
    _description = "Connection to the WIS2 node's MQTT broker (the password is stored as a secret)."

    @classmethod
    def from_connection(cls, conn: MqttConnection) -> MqttBroker:
        return cls(**conn.connection().model_dump())
