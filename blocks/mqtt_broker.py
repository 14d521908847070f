"""`MqttBroker` block: how the flows reach the node's MQTT broker (credentials kept as a secret)."""

from __future__ import annotations

from typing import Literal

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from chain.mqtt import MqttConnection


class MqttBroker(Block):
    """The MQTT broker the chain publishes WIS2 notifications on (MQTT 5, QoS 1)."""

    _block_type_name = "MQTT Broker"
    _block_type_slug = "mqtt-broker"
    _description = "Connection to the WIS2 node's MQTT broker (the password is stored as a secret)."

    host: str = Field(default="127.0.0.1", description="Broker host name or address")
    port: int = Field(default=1883, ge=1, le=65535, description="Broker port")
    transport: Literal["tcp", "websockets"] = Field(default="tcp", description="tcp or websockets")
    ws_path: str = Field(default="/mqtt", description="WebSocket path (websockets only)")
    tls: bool = Field(default=False, description="Use TLS")
    ca_certs: str | None = Field(default=None, description="CA bundle file for TLS")
    username: str | None = Field(default="publisher", description="Account allowed to publish")
    password: SecretStr | None = Field(default=None, description="Password of that account")
    client_id_prefix: str = Field(default="wis2-chain", description="MQTT client id prefix")

    def connection(self) -> MqttConnection:
        """The connection parameters for `chain.mqtt` (Publisher, connect)."""
        return MqttConnection(**self.model_dump(include=_SHARED_FIELDS))

    @classmethod
    def from_connection(cls, conn: MqttConnection) -> MqttBroker:
        return cls(**conn.model_dump(include=_SHARED_FIELDS))


# The fields a block and a connection have in common (all of the block's settings).
_SHARED_FIELDS = set(MqttBroker.model_fields) & set(MqttConnection.model_fields)
